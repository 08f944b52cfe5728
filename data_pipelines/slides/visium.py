"""Reader for 10x Genomics Visium Space Ranger output folders.

Reads ``filtered_feature_bc_matrix.h5`` directly with h5py (scanpy is not a dependency),
``spatial/tissue_positions_list.csv`` (Space Ranger < 2, no header) or
``spatial/tissue_positions.csv`` (>= 2, header) and ``scalefactors_json.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import (DROPPED, IMAGE_SCALE, LIBRARY_ID, PLATFORM, as_count_matrix, describe_cell,
                                          image_size, library_metadata, unique_names)

__all__ = ["read_visium", "read_10x_h5", "default_sample_id", "VISIUM_SPOT_UM"]

VISIUM_SPOT_UM = 55.0
_POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _check_csc(path: Path, shape, data, indices, indptr, n_barcodes: int, n_features: int) -> None:
    """The stored CSC matrix is consistent with its shape and name lists, else one clear error."""
    def bad(problem: str) -> StimageError:
        return StimageError(f"{path}: {problem}; not a valid Space Ranger matrix")

    if len(shape) != 2 or min(shape) < 0:
        raise bad(f"matrix/shape is {list(shape)}, expected (features, barcodes)")
    n_feat, n_bc = int(shape[0]), int(shape[1])
    if data.dtype.kind not in "biuf":
        raise StimageError(f"{path}: counts are stored as {data.dtype} (text?), not numbers; "
                           "raw integer counts are required")
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise bad(f"matrix/indices or indptr are {indices.dtype}/{indptr.dtype}, not integers")
    if len(indptr) != n_bc + 1:
        raise bad(f"matrix/indptr has {len(indptr)} entries for {n_bc} barcodes (needs {n_bc + 1})")
    if len(data) != len(indices) or (len(indptr) and (indptr[0] != 0 or indptr[-1] != len(data))):
        raise bad(f"matrix/data ({len(data)}), indices ({len(indices)}) and indptr (ends at "
                  f"{int(indptr[-1]) if len(indptr) else 'nothing'}) disagree")
    if len(indptr) > 1 and (np.diff(indptr) < 0).any():
        raise bad("matrix/indptr decreases")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_feat):
        raise bad(f"a feature index ({int(indices.max())}) is outside the shape's {n_feat} features")
    if n_barcodes != n_bc:
        raise bad(f"{n_barcodes} barcodes but the shape says {n_bc}")
    if n_features != n_feat:
        raise bad(f"{n_features} features but the shape says {n_feat}")


def read_10x_h5(path: str | Path) -> ad.AnnData:
    """Space Ranger feature-barcode matrix (v3 h5) → AnnData with gene symbols, int32 CSR.

    The file stores features × barcodes in CSC (``matrix/data, indices, indptr, shape``);
    transposed it is barcodes × features CSR. Only "Gene Expression" features are kept;
    ``var["gene_ids"]`` holds the Ensembl ids, ``var_names`` the (made unique) symbols.
    A matrix inconsistent with its shape, counts stored as text, or NaN/inf/negative/
    non-integer counts are one clear error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"count matrix {path} not found")
    try:
        with h5py.File(path, "r") as f:
            g = f["matrix"]
            shape = tuple(int(v) for v in g["shape"][:])  # (features, barcodes)
            data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
            barcodes = [b.decode() for b in g["barcodes"][:]]
            feats = g["features"]
            names = [b.decode() for b in feats["name"][:]]
            ids = [b.decode() for b in feats["id"][:]]
            ftype = [b.decode() for b in feats["feature_type"][:]]
    except (OSError, KeyError) as e:
        raise StimageError(f"{path} is not a Space Ranger v3 h5 matrix ({type(e).__name__}: {e})") from None
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        raise StimageError(f"{path} has a malformed matrix ({type(e).__name__}: {msg})") from None
    if not (len(names) == len(ids) == len(ftype)):
        raise StimageError(f"{path}: features/name, id and feature_type have {len(names)}, {len(ids)} "
                           f"and {len(ftype)} entries")
    _check_csc(path, shape, data, indices, indptr, len(barcodes), len(names))
    dup = pd.Index(barcodes).duplicated()
    if dup.any():
        raise StimageError(f"{path}: barcode {barcodes[int(np.flatnonzero(dup)[0])]} appears twice")
    m = sp.csc_matrix((data, indices, indptr), shape=shape)
    keep = np.array([t == "Gene Expression" for t in ftype], bool)
    var_names = unique_names(np.asarray(names)[keep], str(path))
    X = as_count_matrix(m.T.tocsr()[:, keep], str(path), barcodes, var_names)
    var = pd.DataFrame({"gene_ids": np.asarray(ids)[keep]}, index=var_names)
    return ad.AnnData(X=X, obs=pd.DataFrame(index=barcodes), var=var)


def _h5_library_id(path: Path) -> str | None:
    """The single library id Space Ranger records in the h5 (root attribute ``library_ids``)."""
    try:
        with h5py.File(path, "r") as f:
            ids = np.atleast_1d(f.attrs.get("library_ids", []))
    except (OSError, ValueError, TypeError, KeyError):  # h5py raises KeyError on a damaged object header
        return None
    ids = [v.decode() if isinstance(v, bytes) else str(v) for v in ids]
    ids = [v.strip() for v in ids if v.strip()]
    return ids[0] if len(ids) == 1 else None  # several (aggr) or none: not one sample's id


def _metrics_sample_id(folder: Path) -> str | None:
    """``Sample ID`` of Space Ranger's ``metrics_summary.csv``, when the folder has one."""
    path = folder / "metrics_summary.csv"
    if not path.is_file():
        return None
    try:
        vals = pd.read_csv(path, nrows=1, dtype=str).get("Sample ID")
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if vals is None or not len(vals) or pd.isna(vals.iloc[0]) or not str(vals.iloc[0]).strip():
        return None
    return str(vals.iloc[0]).strip()


def default_sample_id(path: str | Path) -> tuple[str, str]:
    """(sample id, where it came from) for a Space Ranger folder.

    The library id recorded in ``filtered_feature_bc_matrix.h5`` (one library), else the
    ``Sample ID`` of ``metrics_summary.csv``, else the folder name — its parent's name for
    the standard ``<id>/outs`` layout, where every folder would otherwise be ``outs``.
    """
    path = Path(path)
    lib = _h5_library_id(path / "filtered_feature_bc_matrix.h5")
    if lib:
        return lib, "the h5's library_ids"
    sid = _metrics_sample_id(path)
    if sid:
        return sid, "metrics_summary.csv"
    folder = path.resolve()
    if folder.name == "outs" and folder.parent.name:
        return folder.parent.name, "the folder above outs/"
    return folder.name, "the folder name"


_INT_COLS = ["in_tissue", "array_row", "array_col"]
_PX_COLS = ["pxl_row_in_fullres", "pxl_col_in_fullres"]



def _numeric_column(pos: pd.DataFrame, col: str, path: Path, integer: bool) -> pd.Series:
    """``pos[col]`` as numbers; a blank, text or non-finite value is one error naming the barcode."""
    raw = pos[col]
    v = pd.to_numeric(raw, errors="coerce").astype(float)
    bad = ~np.isfinite(v.to_numpy())
    if integer:
        bad |= np.isfinite(v.to_numpy()) & (v.to_numpy() != np.round(v.to_numpy()))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        val = raw.iloc[i]
        what = describe_cell(val, integer)
        raise StimageError(f"{path}: {col} is {what} for barcode {pos.index[i]} ({int(bad.sum())} bad value(s))")
    return v.astype(np.int64) if integer else v


def _positions(spatial: Path) -> pd.DataFrame:
    """Spot table indexed by barcode; Space Ranger >= 2 writes a header, older versions none.

    Every row's ``in_tissue`` and the in-tissue rows' grid and pixel coordinates must be
    numbers (grid ones integers); barcodes must be unique.
    """
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    try:
        if new.is_file():
            path, pos = new, pd.read_csv(new, dtype={"barcode": str})
        elif old.is_file():
            path, pos = old, pd.read_csv(old, header=None, names=_POS_COLS, dtype={"barcode": str})
        else:
            raise StimageError(f"no tissue_positions.csv or tissue_positions_list.csv in {spatial}")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        bad = new if new.is_file() else old
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise StimageError(f"cannot read {bad} ({type(e).__name__}: {msg})") from None
    missing = set(_POS_COLS) - set(pos.columns)
    if missing:
        raise StimageError(f"{path} lacks column(s) {sorted(missing)}")
    if pos["barcode"].isna().any():
        raise StimageError(f"{path}: a barcode is empty (row {int(pos['barcode'].isna().to_numpy().argmax()) + 1})")
    pos = pos.assign(barcode=pos["barcode"].astype(str)).set_index("barcode")
    if pos.index.duplicated().any():
        raise StimageError(f"{path}: barcode {pos.index[pos.index.duplicated()][0]} appears twice")
    pos["in_tissue"] = _numeric_column(pos, "in_tissue", path, integer=True)
    pos = pos[pos["in_tissue"] == 1].copy()
    for col in _INT_COLS[1:]:
        pos[col] = _numeric_column(pos, col, path, integer=True)
    for col in _PX_COLS:
        pos[col] = _numeric_column(pos, col, path, integer=False)
    return pos


def read_visium(path: str | Path, *, image: str | Path | None = None, sample_id: str | None = None,
                library_id: str | None = None) -> ad.AnnData:
    """A Space Ranger folder (``outs/``, or the folder holding it) → AnnData of its in-tissue spots.

    Returns n_spots × n_genes, ``X`` int32 CSR, ``obs_names`` ``<sample_id>_<barcode>`` (so
    samples concatenate without clashes), ``obs["sample"]`` and the ``uns["spatial"]`` key
    = ``sample_id``. ``sample_id`` defaults to :func:`default_sample_id`: the library id in
    the h5, else ``metrics_summary.csv``'s Sample ID, else the folder name (the parent's
    for ``<id>/outs``); ``library_id`` is its older name. ``obsm["spatial"]`` (n_spots, 2)
    float64 is always in full-resolution pixels (x = pxl_col, y = pxl_row). Without
    ``image`` (a full-resolution H&E), ``spatial/tissue_hires_image.png`` is used and
    ``uns["stimage"]["image_scale"]`` records its ``tissue_hires_scalef`` (image-file px per
    full-res px) so tiling maps full-resolution coordinates onto it; with ``image`` it is 1.0.
    mpp (µm per full-res px) = 55 µm / spot_diameter_fullres.
    """
    path = Path(path)
    if not path.is_dir():
        raise StimageError(f"Space Ranger folder {path} not found")
    if not (path / "filtered_feature_bc_matrix.h5").is_file() and (path / "outs").is_dir():
        path = path / "outs"  # given <id>/, read <id>/outs/
    if sample_id is not None and library_id is not None and str(sample_id) != str(library_id):
        raise StimageError(f"sample_id {sample_id!r} and library_id {library_id!r} disagree; give one")
    given = sample_id if sample_id is not None else library_id
    if given is not None:
        library_id = str(given).strip()
        if not library_id:
            raise StimageError("the sample id is empty")
    else:
        library_id, _ = default_sample_id(path)
    adata = read_10x_h5(path / "filtered_feature_bc_matrix.h5")
    spatial = path / "spatial"
    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.is_file():
        raise StimageError(f"scale factors {sf_path} not found")
    try:
        sf = json.loads(sf_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise StimageError(f"{sf_path} is not valid JSON ({type(e).__name__}: {e})") from None
    try:
        if not isinstance(sf, dict):
            raise TypeError("not an object")
        spot_px = float(sf[keys.SPOT_DIAMETER_FULLRES])
        hires_scale = float(sf["tissue_hires_scalef"])
    except (ValueError, KeyError, TypeError) as e:
        raise StimageError(f"{sf_path} lacks a valid {e} (needs spot_diameter_fullres, tissue_hires_scalef)") from None
    if not (np.isfinite(spot_px) and spot_px > 0 and np.isfinite(hires_scale) and hires_scale > 0):
        raise StimageError(f"{sf_path}: scale factors must be positive "
                           f"(spot_diameter_fullres={spot_px}, tissue_hires_scalef={hires_scale})")
    pos = _positions(spatial)  # in-tissue spots, validated
    common = adata.obs_names[adata.obs_names.isin(pos.index)]  # count-matrix order, as scanpy
    if len(common) == 0:
        raise StimageError(f"no in-tissue spot of {spatial} is in the count matrix")
    no_counts = int((~pos.index.isin(common)).sum())
    if no_counts:
        warnings.warn(f"{library_id}: {no_counts} in-tissue spot(s) have no counts "
                      f"(e.g. {pos.index[~pos.index.isin(common)][0]}); dropped", stacklevel=2)
    adata = adata[common].copy()
    pos = pos.loc[common]

    if image is not None:
        image_path, scale = Path(image), 1.0
    else:
        image_path, scale = spatial / "tissue_hires_image.png", hires_scale
    if not image_path.is_file():
        raise StimageError(f"image {image_path} not found (pass --image FULLRES)")
    w, h = image_size(image_path)
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    inside = (xy[:, 0] * scale < w) & (xy[:, 1] * scale < h) & (xy >= 0).all(1)
    if not inside.any():
        raise StimageError(f"no spot of {library_id} lies inside the {w}x{h} image {image_path} "
                           f"at image_scale {scale} (wrong image, or a full-resolution image without --image?)")
    if not inside.all():
        warnings.warn(f"{library_id}: {int((~inside).sum())} spot(s) centred outside the {w}x{h} image "
                      f"{image_path.name} dropped (e.g. {pos.index[~inside][0]})", stacklevel=2)
        adata, pos, xy = adata[inside].copy(), pos[inside], xy[inside]

    adata.obs_names = [f"{library_id}_{b}" for b in adata.obs_names]
    adata.obs[keys.SAMPLE] = pd.Categorical([library_id] * adata.n_obs)
    adata.obs[keys.ARRAY_ROW] = pos["array_row"].to_numpy(np.int64)
    adata.obs[keys.ARRAY_COL] = pos["array_col"].to_numpy(np.int64)
    adata.obsm[keys.SPATIAL] = xy
    mpp = VISIUM_SPOT_UM / spot_px
    adata.uns[keys.SPATIAL_UNS] = {library_id: {
        "scalefactors": dict(sf),
        "metadata": library_metadata(str(image_path.resolve()), mpp, VISIUM_SPOT_UM, scale, str(path.resolve()))}}
    adata.uns[keys.STIMAGE_UNS] = {keys.MPP: mpp, keys.SPOT_DIAMETER_UM: VISIUM_SPOT_UM,
                                   PLATFORM: "visium", LIBRARY_ID: library_id, IMAGE_SCALE: scale,
                                   DROPPED: {"no_counts": no_counts,
                                             "outside_image": int((~inside).sum())}}
    return adata
