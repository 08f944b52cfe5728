"""Test-time augmentation of frozen features: a spot's features averaged over dihedral
views (rot90 × flip) of its tile.

Two forms with the same numbers: :func:`tta_features` (NumPy views, each view's features
cached by the view's content — training and JAX prediction) and :func:`tta_backbone` (the
views made inside the traced function, so an exported ONNX graph does the averaging itself
and every runtime gets it without code of its own).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from export.runtime.context import TTA_VIEWS, dihedral, view_order
from stimage_jax.features.extract import cached_features

__all__ = ["TTA_VIEWS", "tta_features", "tta_extract", "tta_backbone", "dihedral_jnp"]


def tta_features(backbone, tiles: np.ndarray, views: int, cache_stem: Path | None, *, batch_size: int = 32,
                 progress: bool = True, desc: str = "features") -> np.ndarray:
    """(N, H, W, 3) tiles → (N, D) mean of the features of ``views`` dihedral views
    (1: the tiles themselves; 4: rotations; 8: rotations and their flips). View ``t``'s
    features are cached at ``<cache_stem>__d<t>.npy`` (view 0 at ``<cache_stem>.npy``, the
    plain features' file), the stem naming the tiles' content digest and the weights."""
    order = view_order(views)
    total = None
    for t in order:
        path = None if cache_stem is None else \
            cache_stem.parent / (f"{cache_stem.name}.npy" if t == 0 else f"{cache_stem.name}__d{t}.npy")
        f = cached_features(backbone, dihedral(tiles, t) if t else tiles, path, batch_size=batch_size,
                            progress=progress,
                            desc=desc if views == 1 else f"{desc} view {t + 1}/{views}")
        total = f.astype(np.float64) if total is None else total + f
    return (total / len(order)).astype(np.float32)


def tta_extract(backbone, tiles: np.ndarray, views: int, *, batch_size: int = 32, progress: bool = True,
                desc: str = "features") -> np.ndarray:
    """Uncached :func:`tta_features` that makes the views one batch at a time (a section's
    tiles are never copied whole): (N, H, W, 3) → (N, D), the same sum in the same order."""
    from tqdm.auto import tqdm

    from stimage_jax.features.extract import extract_features

    order = view_order(views)
    out = np.zeros((len(tiles), backbone.num_features), np.float32)
    for s in tqdm(range(0, len(tiles), batch_size), desc=f"{desc} ({views} views)", disable=not progress,
                  leave=False):
        xb = np.asarray(tiles[s:s + batch_size])
        total = None
        for t in order:
            f = extract_features(backbone, dihedral(xb, t) if t else xb, batch_size=batch_size, progress=False)
            total = f.astype(np.float64) if total is None else total + f
        out[s:s + len(xb)] = total / len(order)
    return out


def dihedral_jnp(tiles, t: int):
    """:func:`export.runtime.context.dihedral` in jax.numpy (transposes and reversals, which
    export to ONNX): view ``t`` of (B, H, W, C) tiles."""
    out = jnp.rot90(tiles, k=t % 4, axes=(1, 2))
    return out[:, :, ::-1] if t >= 4 else out


def tta_backbone(backbone, tiles, views: int):
    """(B, H, W, 3) → (B, D): the backbone's features averaged over ``views`` dihedral views.
    A Python loop of backbone calls (not a batch of B·views): the graph keeps one symbolic
    batch size, and the sum runs in the same order as :func:`tta_features`."""
    order = view_order(views)
    total = None
    for t in order:
        f = backbone(dihedral_jnp(tiles, t) if t else tiles)
        total = f if total is None else total + f
    return total / len(order) if len(order) > 1 else total
