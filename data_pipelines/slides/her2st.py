"""Reader for HER2ST legacy ST (Andersson et al. 2021) in its original repository layout.

ROOT/data/ST-cnts/<S>.tsv.gz            counts, rows ``<x>x<y>`` (array coords), columns genes
ROOT/data/ST-spotfiles/<S>_selection.tsv  x y new_x new_y pixel_x pixel_y selected
ROOT/data/ST-imgs/<P>/<S>/*.jpg         full-resolution H&E (only some sections)
ROOT/data/ST-pat/lbl/<S>_labeled_coordinates.tsv  pathologist labels (some sections)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import as_count_matrix, image_size, unique_names

__all__ = ["read_her2st", "her2st_sections", "LEGACY_ST_PITCH_UM", "LEGACY_ST_SPOT_UM"]

LEGACY_ST_PITCH_UM = 200.0   # centre-to-centre distance of the legacy ST array
LEGACY_ST_SPOT_UM = 100.0    # spot diameter


def her2st_sections(root: str | Path) -> list[str]:
    """Sections with a counts file under ROOT."""
    cnt = Path(root) / "data" / "ST-cnts"
    return sorted(p.name.split(".")[0] for p in cnt.glob("*.tsv.gz"))


def _fit_px_per_unit(array_coord: np.ndarray, pixel: np.ndarray) -> float:
    """Least-squares slope of pixel against (fitted, non-integer) array coordinates."""
    a = np.c_[np.ones_like(array_coord), array_coord]
    return float(np.linalg.lstsq(a, pixel, rcond=None)[0][1])


def read_her2st(root: str | Path, section: str, *, require_image: bool = False) -> ad.AnnData:
    """One HER2ST section → AnnData (integer counts, spot pixels, mpp, labels if any).

    µm per pixel is estimated from the array itself: pixel positions are fitted against
    ``new_x``/``new_y`` (the aligned array coordinates; the integer ``x``/``y`` are nominal),
    and the 200 µm pitch divided by the fitted pixels per array unit (≈ 0.69 for patient C).
    Spots counted but absent from the selection file, or centred outside the image, are
    dropped, reported in a warning and counted in ``uns["stimage"]["dropped"]``.
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
    try:
        counts = pd.read_csv(cnt_path, sep="\t", index_col=0)
        sel = pd.read_csv(sel_path, sep="\t")
    except Exception as e:
        raise StimageError(f"cannot read section {section}: {type(e).__name__}: {e}") from None
    missing_cols = {"x", "y", "new_x", "new_y", "pixel_x", "pixel_y"} - set(sel.columns)
    if missing_cols:
        raise StimageError(f"{sel_path} lacks column(s) {sorted(missing_cols)}")

    sel = sel.assign(spot=sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str))
    sel = sel.drop_duplicates("spot").set_index("spot")
    in_sel = counts.index.isin(sel.index)
    dropped = {"not_in_selection": int((~in_sel).sum()), "outside_image": 0}
    if dropped["not_in_selection"]:
        warnings.warn(f"{section}: {dropped['not_in_selection']} counted spot(s) missing from "
                      f"{sel_path.name} dropped (e.g. {', '.join(counts.index[~in_sel][:3])})", stacklevel=2)
    counts = counts.loc[in_sel]
    s = sel.loc[counts.index]
    px_per_unit = np.mean([_fit_px_per_unit(s["new_x"].to_numpy(float), s["pixel_x"].to_numpy(float)),
                           _fit_px_per_unit(s["new_y"].to_numpy(float), s["pixel_y"].to_numpy(float))])
    mpp = LEGACY_ST_PITCH_UM / px_per_unit

    patient = section[0]
    imgs = sorted((data / "ST-imgs" / patient / section).glob("*.jpg")) if (data / "ST-imgs").is_dir() else []
    image_path = ""
    if imgs:
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
        raise StimageError(f"section {section} has no H&E image under {data / 'ST-imgs' / patient / section}")
    else:
        warnings.warn(f"{section}: no H&E image; counts and coordinates only (cannot be tiled)", stacklevel=2)
    if len(counts) == 0:
        raise StimageError(f"section {section} has no spots left after dropping unmatched ones")

    obs_names = [f"{section}_{i}" for i in counts.index]
    var_names = unique_names(counts.columns, f"section {section}")
    X = as_count_matrix(counts.to_numpy(), f"section {section}", obs_names, var_names)
    obs = pd.DataFrame({keys.SAMPLE: pd.Categorical([section] * len(counts)),
                        keys.ARRAY_ROW: s["y"].astype(int).to_numpy(),
                        keys.ARRAY_COL: s["x"].astype(int).to_numpy()}, index=obs_names)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var_names))
    adata.obsm[keys.SPATIAL] = s[["pixel_x", "pixel_y"]].to_numpy(np.float64)

    lbl = data / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"
    if lbl.is_file():
        lab = pd.read_csv(lbl, sep="\t").dropna(subset=["x", "y"])
        # Label coordinates are the aligned (new_x, new_y); rounding recovers the grid spot.
        spot = lab["x"].round().astype(int).astype(str) + "x" + lab["y"].round().astype(int).astype(str)
        labels = pd.Series(lab["label"].to_numpy(), index=spot).groupby(level=0).first()
        adata.obs[keys.LABEL] = pd.Categorical(labels.reindex(counts.index).to_numpy())

    spot_fullres = LEGACY_ST_SPOT_UM / mpp
    adata.uns[keys.SPATIAL_UNS] = {section: {
        "scalefactors": {keys.SPOT_DIAMETER_FULLRES: spot_fullres, "tissue_hires_scalef": 1.0},
        "metadata": {keys.IMAGE_PATH: image_path, "source": str(cnt_path.resolve())}}}
    adata.uns[keys.STIMAGE_UNS] = {keys.MPP: mpp, keys.SPOT_DIAMETER_UM: LEGACY_ST_SPOT_UM,
                                   "platform": "legacy_st", "library_id": section, "image_scale": 1.0,
                                   "dropped": dropped}
    return adata
