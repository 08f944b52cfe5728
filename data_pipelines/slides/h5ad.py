"""Reading stimage AnnData files back, with the checks every step relies on."""

from __future__ import annotations

from pathlib import Path

import anndata as ad

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import as_count_matrix

__all__ = ["read_h5ad", "validate_counts"]


def validate_counts(adata: ad.AnnData, where: str = "data") -> ad.AnnData:
    """Raw counts in X (finite, >= 0, integer) as int32 CSR, and a sample id per spot."""
    if adata.n_obs == 0:
        raise StimageError(f"{where} has no spots")
    adata.X = as_count_matrix(adata.X, where, list(adata.obs_names), list(adata.var_names))
    if keys.SAMPLE not in adata.obs:
        lib = adata.uns.get(keys.STIMAGE_UNS, {}).get("library_id")
        adata.obs[keys.SAMPLE] = str(lib) if lib else Path(where).stem
    return adata


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an .h5ad of raw counts; one clear error if missing, unreadable or not counts."""
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"data file {path} not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:
        raise StimageError(f"{path} is not a readable .h5ad ({type(e).__name__})") from None
    return validate_counts(adata, str(path))
