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
from data_pipelines.slides.common import (DROPPED, IMAGE_SCALE, LIBRARY_ID, PLATFORM, as_count_matrix,
                                          image_size, library_metadata, unique_names)

__all__ = ["read_visium", "read_10x_h5", "VISIUM_SPOT_UM"]

VISIUM_SPOT_UM = 55.0
_POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_10x_h5(path: str | Path) -> ad.AnnData:
    """Space Ranger feature-barcode matrix (v3 h5) → AnnData with gene symbols, int32 CSR.

    The file stores features × barcodes in CSC (``matrix/data, indices, indptr, shape``);
    transposed it is barcodes × features CSR. Only "Gene Expression" features are kept;
    ``var["gene_ids"]`` holds the Ensembl ids, ``var_names`` the (made unique) symbols.
    """
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"count matrix {path} not found")
    try:
        with h5py.File(path, "r") as f:
            g = f["matrix"]
            shape = tuple(g["shape"][:])  # (features, barcodes)
            m = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=shape)
            barcodes = [b.decode() for b in g["barcodes"][:]]
            feats = g["features"]
            names = [b.decode() for b in feats["name"][:]]
            ids = [b.decode() for b in feats["id"][:]]
            ftype = [b.decode() for b in feats["feature_type"][:]]
    except (OSError, KeyError) as e:
        raise StimageError(f"{path} is not a Space Ranger v3 h5 matrix ({type(e).__name__}: {e})") from None
    keep = np.array([t == "Gene Expression" for t in ftype])
    var_names = unique_names(np.asarray(names)[keep], str(path))
    X = as_count_matrix(m.T.tocsr()[:, keep], str(path), barcodes, var_names)
    var = pd.DataFrame({"gene_ids": np.asarray(ids)[keep]}, index=var_names)
    return ad.AnnData(X=X, obs=pd.DataFrame(index=barcodes), var=var)


def _positions(spatial: Path) -> pd.DataFrame:
    """Spot table indexed by barcode; Space Ranger >= 2 writes a header, older versions none."""
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    if new.is_file():
        path, pos = new, pd.read_csv(new)
    elif old.is_file():
        path, pos = old, pd.read_csv(old, header=None, names=_POS_COLS)
    else:
        raise StimageError(f"no tissue_positions.csv or tissue_positions_list.csv in {spatial}")
    missing = set(_POS_COLS) - set(pos.columns)
    if missing:
        raise StimageError(f"{path} lacks column(s) {sorted(missing)}")
    return pos.assign(barcode=pos["barcode"].astype(str)).set_index("barcode")


def read_visium(path: str | Path, *, image: str | Path | None = None,
                library_id: str | None = None) -> ad.AnnData:
    """A Space Ranger folder → AnnData of its in-tissue spots.

    Returns n_spots × n_genes, ``X`` int32 CSR, ``obs_names`` ``<library_id>_<barcode>``
    (library_id defaults to the folder name). ``obsm["spatial"]`` (n_spots, 2) float64 is
    always in full-resolution pixels (x = pxl_col, y = pxl_row). Without ``image`` (a
    full-resolution H&E), ``spatial/tissue_hires_image.png`` is used and
    ``uns["stimage"]["image_scale"]`` records its ``tissue_hires_scalef`` (image-file px per
    full-res px) so tiling maps full-resolution coordinates onto it; with ``image`` it is 1.0.
    mpp (µm per full-res px) = 55 µm / spot_diameter_fullres.
    """
    path = Path(path)
    if not path.is_dir():
        raise StimageError(f"Space Ranger folder {path} not found")
    library_id = library_id or path.name
    adata = read_10x_h5(path / "filtered_feature_bc_matrix.h5")
    spatial = path / "spatial"
    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.is_file():
        raise StimageError(f"scale factors {sf_path} not found")
    try:
        sf = json.loads(sf_path.read_text())
        spot_px = float(sf[keys.SPOT_DIAMETER_FULLRES])
        hires_scale = float(sf["tissue_hires_scalef"])
    except (ValueError, KeyError, TypeError) as e:
        raise StimageError(f"{sf_path} lacks a valid {e} (needs spot_diameter_fullres, tissue_hires_scalef)") from None
    if spot_px <= 0 or hires_scale <= 0:
        raise StimageError(f"{sf_path}: scale factors must be positive "
                           f"(spot_diameter_fullres={spot_px}, tissue_hires_scalef={hires_scale})")
    pos = _positions(spatial)
    pos = pos[pos["in_tissue"] == 1]
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
    adata.obs[keys.ARRAY_ROW] = pos["array_row"].astype(int).to_numpy()
    adata.obs[keys.ARRAY_COL] = pos["array_col"].astype(int).to_numpy()
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
