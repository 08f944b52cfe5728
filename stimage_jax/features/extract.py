"""Tiles → backbone features, batched and jitted, cached per sample."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

__all__ = ["extract_features", "cached_features", "weights_fingerprint"]


@nnx.jit
def _forward(model, x):
    return model(x)


def extract_features(backbone, tiles: np.ndarray, *, batch_size: int = 32,
                     progress: bool = True, desc: str = "features") -> np.ndarray:
    """tiles (N, H, W, 3) uint8 → (N, D) float32, backbone in eval mode.

    The last batch is padded to ``batch_size`` so the forward pass compiles once.
    """
    backbone.eval()
    n = len(tiles)
    out = np.zeros((n, backbone.num_features), np.float32)
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        xb = np.asarray(tiles[s:s + batch_size])
        k = len(xb)
        if k < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - k, *xb.shape[1:]), xb.dtype)])
        out[s:s + k] = np.asarray(_forward(backbone, jnp.asarray(xb)))[:k]
    return out


def weights_fingerprint(path: str | os.PathLike | None) -> str:
    """First 10 hex chars of the weights file's full sha256 (or 'random'), so caches follow
    the weights: every byte counts (memoised per process by path, size and mtime)."""
    if path is None:
        return "random"
    from data_pipelines.fingerprint import file_digest

    return file_digest(path)[:10]


def cached_features(backbone, tiles: np.ndarray, cache_file: Path | None, **kw) -> np.ndarray:
    """Like :func:`extract_features`, reusing ``cache_file`` (.npy) when it matches."""
    if cache_file is not None and cache_file.exists():
        feats = np.load(cache_file)
        if feats.shape == (len(tiles), backbone.num_features):
            return feats
    feats = extract_features(backbone, tiles, **kw)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, feats)
        os.replace(tmp, cache_file)
    return feats
