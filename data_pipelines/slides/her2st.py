"""Reader for HER2ST legacy ST (Andersson et al. 2021) in its original repository layout.

ROOT/data/ST-cnts/<S>.tsv.gz            counts, rows ``<x>x<y>`` (array coords), columns genes
ROOT/data/ST-spotfiles/<S>_selection.tsv  x y new_x new_y pixel_x pixel_y selected
ROOT/data/ST-imgs/<P>/<S>/*.jpg         full-resolution H&E (only C2..C6 in the public copy)
ROOT/data/ST-pat/lbl/<S>_labeled_coordinates.tsv  pathologist labels (A1 B1 C1 D1 E1 F1 G2 H1)
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import (DROPPED, IMAGE_SCALE, LIBRARY_ID, PLATFORM, as_count_matrix, describe_cell,
                                          image_size, library_metadata, unique_names)

__all__ = ["read_her2st", "her2st_sections", "LEGACY_ST_PITCH_UM", "LEGACY_ST_SPOT_UM"]

LEGACY_ST_PITCH_UM = 200.0   # centre-to-centre distance of the legacy ST array, µm
LEGACY_ST_SPOT_UM = 100.0    # spot diameter, µm
_SEL_COLS = {"x", "y", "new_x", "new_y", "pixel_x", "pixel_y"}


def her2st_sections(root: str | Path) -> list[str]:
    """Sections with a counts file under ROOT (``data/ST-cnts/<S>.tsv.gz``)."""
    cnt = Path(root) / "data" / "ST-cnts"
    return sorted(p.name.split(".")[0] for p in cnt.glob("*.tsv.gz"))


def _fit_px_per_unit(array_coord: np.ndarray, pixel: np.ndarray) -> float:
    """Least-squares slope (image px per array unit) of pixel against array coordinate."""
    a = np.c_[np.ones_like(array_coord), array_coord]
    return float(np.linalg.lstsq(a, pixel, rcond=None)[0][1])


def _read_counts(path: Path, section: str) -> pd.DataFrame:
    """Spots × genes table with the gene symbols exactly as written.

    pandas silently renames a repeated column ``G`` to ``G.1``; the header is therefore read
    by hand so duplicates are made unique the scanpy way (``G-1``) and reported.
    """
    try:
        with gzip.open(path, "rt") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        counts = pd.read_csv(path, sep="\t", index_col=0)
    except Exception as e:
        raise StimageError(f"cannot read counts {path}: {type(e).__name__}: {e}") from None
    if len(header) - 1 != counts.shape[1]:
        raise StimageError(f"{path}: header has {len(header) - 1} genes but rows have {counts.shape[1]} values")
    counts.columns = unique_names(header[1:], f"section {section} ({path.name})")
    counts.index = counts.index.astype(str)
    if counts.index.duplicated().any():
        raise StimageError(f"{path}: spot {counts.index[counts.index.duplicated()][0]} appears twice")
    text = [j for j, t in enumerate(counts.dtypes) if t.kind not in "biuf"]
    if text:  # pandas keeps a column with any non-number as text; find the first such cell
        sub = counts.iloc[:, text]
        num = sub.apply(pd.to_numeric, errors="coerce")
        bad = (num.isna() & sub.notna()).to_numpy()
        if bad.any():
            r, c = map(int, np.argwhere(bad)[0])
            raise StimageError(f"{path}: count {sub.iat[r, c]!r} at spot {counts.index[r]}, gene {sub.columns[c]} "
                               f"is not a number ({int(bad.sum())} such value(s))")
        counts.iloc[:, text] = num
        counts = counts.astype(float)
    return counts



def _numeric(df: pd.DataFrame, cols, path: Path) -> pd.DataFrame:
    """``df[cols]`` as finite floats; a blank, text or infinite value is one error naming its row."""
    out = df.copy()
    for col in cols:
        v = pd.to_numeric(df[col], errors="coerce").astype(float)
        bad = ~np.isfinite(v.to_numpy())
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raw = df[col].iloc[i]
            # the file's own row number (1 = first data row), also after rows were dropped
            row = int(df.index[i]) + 1 if isinstance(df.index[i], (int, np.integer)) else i + 1
            raise StimageError(f"{path}: {col} is {describe_cell(raw)} in data row {row} ({int(bad.sum())} bad value(s))")
        out[col] = v
    return out


def _read_table(path: Path, what: str) -> pd.DataFrame:
    """A tab-separated table with a header, or one clear error (ragged, binary, empty)."""
    try:
        return pd.read_csv(path, sep="\t")
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise StimageError(f"cannot read {what} {path} ({type(e).__name__}: {msg})") from None


def _attach_labels(adata: ad.AnnData, lbl: Path, spots: pd.Index, section: str) -> dict:
    """Pathologist labels → ``obs[keys.LABEL]``; returns match statistics.

    The label file's ``x, y`` are the aligned array coordinates (identical to the selection
    file's ``new_x, new_y``, within 0.3 of an integer on the real data), so rounding them
    gives the ``<x>x<y>`` spot. Its ``pixel_x, pixel_y`` belong to the annotated image, a
    different pixel frame, and are not used.
    """
    lab = _read_table(lbl, "label file")
    if not {"x", "y", "label"} <= set(lab.columns):
        raise StimageError(f"{lbl} lacks columns x, y, label (has {list(lab.columns)})")
    rows = len(lab)
    lab = lab.dropna(subset=["x", "y", "label"])  # rows without a spot are counted, not errors
    lab = _numeric(lab, ["x", "y"], lbl)
    spot = (lab["x"].round().astype(int).astype(str) + "x" + lab["y"].round().astype(int).astype(str)).to_numpy()
    per_spot = pd.Series(lab["label"].astype(str).to_numpy(), index=spot).groupby(level=0)
    conflicts = int((per_spot.nunique() > 1).sum())
    labels = per_spot.first()
    matched = int(pd.Index(spot).isin(spots).sum())
    obs_lab = labels.reindex(spots)
    adata.obs[keys.LABEL] = pd.Categorical(obs_lab.to_numpy(), categories=sorted(labels.unique()))
    stats = {"label_rows": rows, "rows_without_xy": rows - len(lab), "rows_matched": matched,
             "spots_labelled": int(obs_lab.notna().sum()), "spots": len(spots), "conflicting_spots": conflicts}
    if stats["spots_labelled"] < len(spots) or conflicts:
        warnings.warn(f"{section}: labels for {stats['spots_labelled']}/{len(spots)} spots from {lbl.name} "
                      f"({matched}/{rows} label rows matched, {conflicts} spot(s) with conflicting labels)",
                      stacklevel=3)
    return stats


def read_her2st(root: str | Path, section: str, *, require_image: bool = False) -> ad.AnnData:
    """One HER2ST section → AnnData (integer counts, spot pixels, mpp, labels if any).

    Returns n_spots × n_genes: ``X`` int32 CSR raw counts; ``obs_names`` ``<S>_<x>x<y>``;
    ``obs`` sample / array_row (= y) / array_col (= x) and the pathologist label where a
    label file exists; ``obsm["spatial"]`` (n_spots, 2) float64 full-resolution pixel (x, y).

    µm per pixel is estimated from the array itself: ``pixel_x`` is fitted against
    ``new_x`` and ``pixel_y`` against ``new_y`` (the aligned array coordinates; on the real
    data pixel = a + b·new exactly, while the integer ``x``/``y`` are nominal and fit with
    residuals), and the 200 µm pitch is divided by the mean fitted px per array unit
    (≈ 0.688 µm/px for patients B–H, ≈ 0.917 for A). Spots counted but absent from the
    selection file, or centred outside the image, are dropped, reported in a warning and
    counted in ``uns["stimage"]["dropped"]``. Without an image the section is still read
    (``image_path`` "", one warning) unless ``require_image``.
    """
    root = Path(root)
    data = root / "data"
    cnt_path = data / "ST-cnts" / f"{section}.tsv.gz"
    if not cnt_path.is_file():
        avail = her2st_sections(root) if (data / "ST-cnts").is_dir() else []
        hint = f"; available: {', '.join(avail)}" if avail else f" (is {root} a HER2ST root?)"
        raise StimageError(f"no counts for section {section!r} at {cnt_path}{hint}")
    sel_path = data / "ST-spotfiles" / f"{section}_selection.tsv"
    if not sel_path.is_file():
        raise StimageError(f"spot file {sel_path} not found for section {section}")
    counts = _read_counts(cnt_path, section)
    sel = _read_table(sel_path, "spot file")
    missing_cols = _SEL_COLS - set(sel.columns)
    if missing_cols:
        raise StimageError(f"{sel_path} lacks column(s) {sorted(missing_cols)}")
    sel = _numeric(sel, sorted(_SEL_COLS), sel_path)

    sel = sel.assign(spot=sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str))
    sel = sel.drop_duplicates("spot").set_index("spot")
    in_sel = counts.index.isin(sel.index)
    dropped = {"not_in_selection": int((~in_sel).sum()), "outside_image": 0}
    if dropped["not_in_selection"]:
        warnings.warn(f"{section}: {dropped['not_in_selection']} of {len(counts)} counted spot(s) missing from "
                      f"{sel_path.name} dropped (e.g. {', '.join(counts.index[~in_sel][:3])})", stacklevel=2)
    counts = counts.loc[in_sel]
    if len(counts) < 2:
        raise StimageError(f"section {section}: {len(counts)} counted spot(s) found in {sel_path.name}; "
                           "cannot estimate µm per pixel")
    s = sel.loc[counts.index]
    # mpp from all counted spots (before the image cut): more points, same array.
    px_per_unit = np.mean([_fit_px_per_unit(s["new_x"].to_numpy(float), s["pixel_x"].to_numpy(float)),
                           _fit_px_per_unit(s["new_y"].to_numpy(float), s["pixel_y"].to_numpy(float))])
    # Under 1 px per array step the fit is degenerate (pixel coordinates all alike): the mpp
    # would be absurd (legacy ST's 200 µm pitch is ~290 px at 0.69 µm/px).
    if not np.isfinite(px_per_unit) or px_per_unit < 1.0:
        raise StimageError(f"{sel_path}: pixel coordinates do not grow with array coordinates "
                           f"(fitted {px_per_unit} px per array unit)")
    mpp = LEGACY_ST_PITCH_UM / px_per_unit

    img_dir = data / "ST-imgs" / section[0] / section
    imgs = sorted(img_dir.glob("*.jpg")) if img_dir.is_dir() else []
    image_path = ""
    if imgs:
        if len(imgs) > 1:
            warnings.warn(f"{section}: {len(imgs)} images in {img_dir}; using {imgs[0].name}", stacklevel=2)
        image_path = str(imgs[0].resolve())
        w, h = image_size(image_path)
        xy = s[["pixel_x", "pixel_y"]].to_numpy(float)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        dropped["outside_image"] = int((~inside).sum())
        if dropped["outside_image"]:
            warnings.warn(f"{section}: {dropped['outside_image']} spot(s) centred outside the "
                          f"{w}x{h} image dropped (e.g. {', '.join(s.index[~inside][:3])})", stacklevel=2)
        counts, s = counts.loc[inside], s.loc[inside]
    elif require_image:
        raise StimageError(f"section {section} has no H&E image under {img_dir} "
                           "(only C2-C6 have images in the public HER2ST copy)")
    else:
        warnings.warn(f"{section}: no H&E image under {img_dir}; counts and coordinates only "
                      "(cannot be tiled)", stacklevel=2)
    if len(counts) == 0:
        raise StimageError(f"section {section} has no spots left after dropping unmatched ones")

    obs_names = [f"{section}_{i}" for i in counts.index]
    var_names = list(counts.columns)
    X = as_count_matrix(counts.to_numpy(), f"section {section} ({cnt_path.name})", obs_names, var_names)
    obs = pd.DataFrame({keys.SAMPLE: pd.Categorical([section] * len(counts)),
                        keys.ARRAY_ROW: s["y"].astype(int).to_numpy(),
                        keys.ARRAY_COL: s["x"].astype(int).to_numpy()}, index=obs_names)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var_names))
    adata.obsm[keys.SPATIAL] = s[["pixel_x", "pixel_y"]].to_numpy(np.float64)

    stimage = {keys.MPP: mpp, keys.SPOT_DIAMETER_UM: LEGACY_ST_SPOT_UM, PLATFORM: "legacy_st",
               LIBRARY_ID: section, IMAGE_SCALE: 1.0, DROPPED: dropped}
    lbl = data / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"
    if lbl.is_file():
        stimage["labels"] = _attach_labels(adata, lbl, counts.index, section)

    adata.uns[keys.SPATIAL_UNS] = {section: {
        "scalefactors": {keys.SPOT_DIAMETER_FULLRES: LEGACY_ST_SPOT_UM / mpp, "tissue_hires_scalef": 1.0},
        "metadata": library_metadata(image_path, mpp, LEGACY_ST_SPOT_UM, 1.0, str(cnt_path.resolve()))}}
    adata.uns[keys.STIMAGE_UNS] = stimage
    return adata
