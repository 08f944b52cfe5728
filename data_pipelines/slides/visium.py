"""Reader for 10x Genomics Visium Space Ranger output folders.

Reads ``filtered_feature_bc_matrix.h5`` directly with h5py (scanpy is not a dependency),
``spatial/tissue_positions_list.csv`` (Space Ranger < 2, no header) or
``spatial/tissue_positions.csv`` (>= 2, header) and ``scalefactors_json.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import as_count_matrix, image_size, unique_names

__all__ = ["read_visium", "read_10x_h5", "VISIUM_SPOT_UM"]

VISIUM_SPOT_UM = 55.0
_POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_10x_h5(path: str | Path) -> ad.AnnData:
    """Space Ranger feature-barcode matrix (v3 h5) → AnnData with gene symbols, int32 CSR."""
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
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    if new.is_file():
        pos = pd.read_csv(new)
    elif old.is_file():
        pos = pd.read_csv(old, header=None, names=_POS_COLS)
    else:
        raise StimageError(f"no tissue_positions(.csv|_list.csv) in {spatial}")
    return pos.set_index("barcode")


def read_visium(path: str | Path, *, image: str | Path | None = None,
                library_id: str | None = None) -> ad.AnnData:
    """A Space Ranger folder → AnnData of in-tissue spots.

    ``obsm["spatial"]`` is always in full-resolution pixels (x, y). Without ``image`` (a
    full-resolution H&E), the hires PNG is used and ``uns["stimage"]["image_scale"]`` records
    its ``tissue_hires_scalef`` so tiling maps full-resolution coordinates onto it.
    mpp = 55 µm / spot_diameter_fullres.
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
    sf = json.loads(sf_path.read_text())
    pos = _positions(spatial)
    pos = pos[pos["in_tissue"] == 1]
    common = adata.obs_names.intersection(pos.index)
    if len(common) == 0:
        raise StimageError(f"no in-tissue spot of {spatial} is in the count matrix")
    adata = adata[common].copy()
    pos = pos.loc[common]

    if image is not None:
        image_path, scale = Path(image), 1.0
    else:
        image_path, scale = spatial / "tissue_hires_image.png", float(sf["tissue_hires_scalef"])
    if not image_path.is_file():
        raise StimageError(f"image {image_path} not found (pass --image FULLRES)")
    w, h = image_size(image_path)
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    inside = (xy[:, 0] * scale < w) & (xy[:, 1] * scale < h) & (xy >= 0).all(1)
    if not inside.all():
        import warnings
        warnings.warn(f"{library_id}: {(~inside).sum()} spot(s) centred outside the image dropped", stacklevel=2)
        adata, pos, xy = adata[inside].copy(), pos[inside], xy[inside]

    adata.obs_names = [f"{library_id}_{b}" for b in adata.obs_names]
    adata.obs[keys.SAMPLE] = pd.Categorical([library_id] * adata.n_obs)
    adata.obs[keys.ARRAY_ROW] = pos["array_row"].astype(int).to_numpy()
    adata.obs[keys.ARRAY_COL] = pos["array_col"].astype(int).to_numpy()
    adata.obsm[keys.SPATIAL] = xy
    spot_px = float(sf[keys.SPOT_DIAMETER_FULLRES])
    adata.uns[keys.SPATIAL_UNS] = {library_id: {
        "scalefactors": dict(sf), "metadata": {keys.IMAGE_PATH: str(image_path.resolve()), "source": str(path.resolve())}}}
    adata.uns[keys.STIMAGE_UNS] = {keys.MPP: VISIUM_SPOT_UM / spot_px, keys.SPOT_DIAMETER_UM: VISIUM_SPOT_UM,
                                   "platform": "visium", "library_id": library_id, "image_scale": scale,
                                   "dropped": {"outside_image": int((~inside).sum())}}
    return adata
