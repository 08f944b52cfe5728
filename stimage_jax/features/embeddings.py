"""Precomputed per-spot embeddings (foundation models such as UNI or Virchow2) as features.

An embedding source is named by ``KEY``: ``adata.obsm[KEY]`` when present, otherwise a
folder ``KEY`` holding ``<sample>.npy`` with one row per spot in ``adata``'s order (what
a separate feature-extraction job typically writes). The NB head trains on them exactly as
on a frozen backbone's features.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from data_pipelines import keys
from data_pipelines.errors import StimageError

__all__ = ["load_embeddings", "embedding_source_name"]


def embedding_source_name(key: str) -> str:
    """A filesystem-safe source name for embeddings ``key`` (used in model folders)."""
    stem = Path(key).name or "embeddings"
    return "emb_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)


def load_embeddings(adata: ad.AnnData, key: str) -> np.ndarray:
    """(n_obs, D) float32 embeddings of ``adata``'s spots from ``obsm[key]`` or ``key/<sample>.npy``."""
    if key in adata.obsm:
        emb, where = np.asarray(adata.obsm[key]), f"obsm[{key!r}]"
    else:
        folder = Path(key)
        if not folder.is_dir():
            raise StimageError(f"embeddings {key!r}: neither an obsm key of the data nor a folder "
                               "of <sample>.npy files")
        if keys.SAMPLE not in adata.obs:
            raise StimageError(f"embeddings folder {folder} needs obs[{keys.SAMPLE!r}] to name the files")
        samples = adata.obs[keys.SAMPLE].astype(str).to_numpy()
        parts = {}
        for s in dict.fromkeys(samples):
            f = folder / f"{s}.npy"
            if not f.is_file():
                raise StimageError(f"embeddings file {f} not found (one <sample>.npy per sample)")
            try:
                parts[s] = np.load(f, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise StimageError(f"embeddings file {f} is unreadable: {e}") from None
            n_s = int((samples == s).sum())
            if parts[s].ndim != 2 or parts[s].shape[0] != n_s:
                raise StimageError(f"embeddings file {f} has shape {parts[s].shape}, expected ({n_s}, D): "
                                   "one row per spot of that sample")
        dims = {p.shape[1] for p in parts.values()}
        if len(dims) != 1:
            raise StimageError(f"embeddings in {folder} have different widths {sorted(dims)}")
        emb = np.zeros((adata.n_obs, dims.pop()), np.float32)
        for s, arr in parts.items():
            emb[samples == s] = arr
        where = str(folder)
    if emb.ndim != 2 or emb.shape[0] != adata.n_obs:
        raise StimageError(f"embeddings {where} have shape {emb.shape}, expected ({adata.n_obs}, D): "
                           "one row per spot")
    emb = np.asarray(emb, np.float32)
    if not np.isfinite(emb).all():
        raise StimageError(f"embeddings {where} contain NaN or inf")
    return emb
