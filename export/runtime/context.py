"""Spatial context for spot predictions, in NumPy (shared by the JAX side and every runtime).

Expression is spatially smooth and the tissue around a spot carries signal its own tile
lacks (TRIPLEX, Hist2ST). Three image-only uses of the neighbourhood, none of which looks at
the held-out section's expression:

- :func:`neighbour_index`: the K nearest spots of each spot *within its own sample*
  (Euclidean on ``obsm["spatial"]``; on a Visium/ST grid the nearest are the grid
  neighbours);
- :func:`context_features`: ``[own features, mean of the K neighbours' features]`` — the
  NB head then sees the tile and its surroundings;
- :func:`smooth_members`: post hoc, per member, ``μ ← (1 − α)·μ_own + α·mean(μ_neighbours)``
  on the NB mean; the NB shape ``r`` is kept, so the mixture moments and the interval are
  recomputed from the smoothed members (honest: epistemic variance is the spread of the
  smoothed member means, aleatoric follows each member's smoothed mean).
- :func:`dihedral`: the 8 flips/rotations of a tile stack, for test-time augmentation.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["neighbour_index", "pool_neighbours", "context_features", "smooth_members", "dihedral", "DIHEDRAL",
           "TTA_VIEWS", "MAX_SMOOTH_K", "view_order", "check_smoothing"]

DIHEDRAL = 8
TTA_VIEWS = (1, 4, 8)  # identity; the four rotations; all eight dihedral views
MAX_SMOOTH_K = 64      # neighbours averaged in smoothing: a grid's ring is 4-8; more blurs tissue


def view_order(views: int) -> list[int]:
    """The dihedral views (indices for :func:`dihedral`) that ``views``-fold TTA averages."""
    if views not in TTA_VIEWS:
        raise StimageError(f"test-time augmentation takes {', '.join(map(str, TTA_VIEWS))} views, got {views}")
    return list(range(views))


def check_smoothing(d, where: str) -> dict:
    """A model's ``smoothing`` record ``{"alpha": float in [0, 1], "k": 1..MAX_SMOOTH_K}`` (None →
    off), validated; one StimageError line naming ``where`` otherwise."""
    if d is None:
        return {"alpha": 0.0, "k": 6}
    ok = (isinstance(d, dict) and isinstance(d.get("alpha"), (int, float)) and not isinstance(d.get("alpha"), bool)
          and 0.0 <= float(d["alpha"]) <= 1.0 and isinstance(d.get("k"), int) and not isinstance(d.get("k"), bool)
          and 1 <= d["k"] <= MAX_SMOOTH_K)
    if not ok:
        raise StimageError(f"{where}: 'smoothing' must be {{\"alpha\": a number in [0, 1], \"k\": a whole number "
                           f"in 1..{MAX_SMOOTH_K}}}, got {d!r}")
    return {"alpha": float(d["alpha"]), "k": int(d["k"])}


def neighbour_index(xy: np.ndarray, samples, k: int) -> np.ndarray:
    """(N, K) int64: for each spot the indices (into the N spots) of its K nearest spots of
    the same sample, nearest first, itself excluded. A sample with at most K spots lends
    each spot all the others, padded by repeating the nearest (a lone spot is its own
    neighbour). xy: (N, 2) coordinates; samples: (N,) labels."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise StimageError(f"neighbour context needs finite (N, 2) spot coordinates, got shape {xy.shape}")
    if k < 1:
        raise StimageError(f"neighbour context needs K >= 1, got {k}")
    samples = np.asarray(samples)
    out = np.empty((len(xy), k), np.int64)
    for s in np.unique(samples):
        rows = np.flatnonzero(samples == s)
        if len(rows) == 1:
            out[rows] = rows[0]
            continue
        # Extra candidates so that ties (equidistant grid neighbours) are broken the same way
        # everywhere — by the lower spot index — not by the KD-tree's traversal order.
        kk = min(k + 9, len(rows))
        dist, cand = cKDTree(xy[rows]).query(xy[rows], k=kk)
        cand = np.where(cand == np.arange(len(rows))[:, None], -1, cand)  # the spot itself
        dist = np.where(cand < 0, np.inf, np.round(dist, 6))
        order = np.lexsort((cand, dist), axis=1)
        nn = np.take_along_axis(cand, order, axis=1)[:, :min(k, len(rows) - 1)]
        if nn.shape[1] < k:
            nn = np.concatenate([nn, np.repeat(nn[:, :1], k - nn.shape[1], axis=1)], axis=1)
        out[rows] = rows[nn]
    return out


def pool_neighbours(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mean over each spot's neighbours: values (N, ...) and idx (N, K) → (N, ...)."""
    values = np.asarray(values)
    return values[idx].mean(axis=1, dtype=np.float64).astype(values.dtype, copy=False)


def context_features(features: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(N, D) features and (N, K) neighbours → (N, 2D) ``[own, mean of neighbours]``."""
    features = np.asarray(features)
    return np.concatenate([features, pool_neighbours(features, idx)], axis=1)


def smooth_members(member_mu: np.ndarray, idx: np.ndarray, alpha: float) -> np.ndarray:
    """(M, N, G) member NB means → the same smoothed towards the neighbours' means:
    ``(1 − α)·own + α·mean over idx``. α = 0 returns the input unchanged."""
    if not (0.0 <= alpha <= 1.0):
        raise StimageError(f"smoothing weight alpha must be in [0, 1], got {alpha}")
    mu = np.asarray(member_mu)
    if alpha == 0.0:
        return mu
    idx = np.asarray(idx)
    out = np.empty_like(mu)
    # Neighbour by neighbour and 64 genes at a time: a whole slide's (M, N, K, G) gather would
    # hold K copies of every member's predictions (5 × 10⁵ tiles × 6 × 250 genes = 3 GB).
    for g0 in range(0, mu.shape[-1], 64):
        part = mu[..., g0:g0 + 64]
        neigh = np.zeros(part.shape, np.float64)
        for k in range(idx.shape[1]):
            neigh += part[:, idx[:, k]]
        out[..., g0:g0 + 64] = (1.0 - alpha) * part + alpha * (neigh / idx.shape[1])
    return out


def dihedral(tiles: np.ndarray, t: int) -> np.ndarray:
    """View ``t`` (0..7) of (N, H, W, C) tiles: rot90 by ``t % 4``, then a horizontal flip
    when ``t >= 4``. View 0 is the identity."""
    if not 0 <= t < DIHEDRAL:
        raise StimageError(f"dihedral view must be in 0..7, got {t}")
    out = np.rot90(np.asarray(tiles), k=t % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if t >= 4 else out)
