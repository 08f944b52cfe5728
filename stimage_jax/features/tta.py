"""Test-time augmentation of frozen features: a spot's features averaged over dihedral
views (rot90 × flip) of its tile, each view's features cached by the view's content."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError
from export.runtime.context import DIHEDRAL, dihedral
from stimage_jax.features.extract import cached_features

__all__ = ["TTA_VIEWS", "tta_features"]

TTA_VIEWS = (1, 4, 8)  # identity; the four rotations; all eight dihedral views


def tta_features(backbone, tiles: np.ndarray, views: int, cache_stem: Path | None, *, batch_size: int = 32,
                 progress: bool = True, desc: str = "features") -> np.ndarray:
    """(N, H, W, 3) tiles → (N, D) mean of the features of ``views`` dihedral views
    (1: the tiles themselves; 4: rotations; 8: rotations and their flips). View ``t``'s
    features are cached at ``<cache_stem>__d<t>.npy`` (view 0 at ``<cache_stem>.npy``, the
    plain features' file), the stem naming the tiles' content digest and the weights."""
    if views not in TTA_VIEWS:
        raise StimageError(f"--tta takes {', '.join(map(str, TTA_VIEWS))} views, got {views}")
    order = list(range(4)) if views == 4 else list(range(DIHEDRAL))[:views]
    total = None
    for t in order:
        path = None if cache_stem is None else \
            cache_stem.parent / (f"{cache_stem.name}.npy" if t == 0 else f"{cache_stem.name}__d{t}.npy")
        f = cached_features(backbone, dihedral(tiles, t) if t else tiles, path, batch_size=batch_size,
                            progress=progress, desc=f"{desc} view {t + 1}/{views}")
        total = f.astype(np.float64) if total is None else total + f
    return (total / len(order)).astype(np.float32)
