"""Reading stimage AnnData files back, with the checks every step relies on."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import pandas as pd

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import LIBRARY_ID, as_count_matrix

__all__ = ["read_h5ad", "validate_counts"]


def validate_counts(adata: ad.AnnData, where: str = "data") -> ad.AnnData:
    """Check raw counts and a sample id per spot; returns ``adata`` (modified in place).

    ``X`` (n_spots, n_genes) must be finite, non-negative and integer-valued; it becomes
    int32 CSR. The first offending spot and gene are named in the error. Without
    ``obs["sample"]`` every spot gets ``uns["stimage"]["library_id"]``, else the stem of
    ``where`` (the file name), with a warning saying so.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise StimageError(f"{where} is empty ({adata.n_obs} spots x {adata.n_vars} genes)")
    if adata.X is None:
        raise StimageError(f"{where} has no X matrix; raw counts are required")
    adata.X = as_count_matrix(adata.X, where, list(adata.obs_names), list(adata.var_names))
    if keys.SAMPLE not in adata.obs:
        lib = adata.uns.get(keys.STIMAGE_UNS, {}).get(LIBRARY_ID)
        sample, src = (str(lib), "uns['stimage']['library_id']") if lib else (Path(where).stem, "the file name")
        adata.obs[keys.SAMPLE] = pd.Categorical([sample] * adata.n_obs)
        warnings.warn(f"{where}: no obs[{keys.SAMPLE!r}]; set to {sample!r} from {src}", stacklevel=2)
    elif adata.obs[keys.SAMPLE].isna().any():
        i = int(adata.obs[keys.SAMPLE].isna().to_numpy().argmax())
        raise StimageError(f"{where}: obs[{keys.SAMPLE!r}] is empty at spot {adata.obs_names[i]}")
    return adata


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an .h5ad of raw counts; one clear error if missing, unreadable or not counts."""
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"data file {path} not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:
        raise StimageError(f"{path} is not a readable .h5ad ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return validate_counts(adata, str(path))
