"""Spatial metrics: Moran's I (uni- and bivariate) and the STimage spatial IoU.

Weights default to spot-grid neighbours: the 6 hexagonal neighbours for Visium
(array (r, c±2), (r±1, c±1)), the 4 rook neighbours for legacy ST and other square grids,
and k = 6 nearest neighbours in ``obsm["spatial"]`` when there is no grid. Rows are
standardised (each spot's weights sum to 1), as esda's default ``transformation="r"``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.ndimage import gaussian_filter

from data_pipelines import keys
from data_pipelines.errors import StimageError

__all__ = ["grid_weights", "knn_weights", "spatial_weights", "morans_i", "morans_i_bv", "spatial_iou"]

_HEX = ((0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1))
_ROOK = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _row_standardise(w: sp.csr_matrix) -> sp.csr_matrix:
    d = np.asarray(w.sum(1)).ravel()
    return sp.diags(np.where(d > 0, 1.0 / np.maximum(d, 1e-300), 0.0)) @ w


def grid_weights(rows: np.ndarray, cols: np.ndarray, *, hexagonal: bool) -> sp.csr_matrix:
    """(N, N) row-standardised neighbour weights on an integer spot grid."""
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols))}
    ii, jj = [], []
    for i, (r, c) in enumerate(zip(rows, cols)):
        for dr, dc in (_HEX if hexagonal else _ROOK):
            j = index.get((int(r) + dr, int(c) + dc))
            if j is not None:
                ii.append(i)
                jj.append(j)
    n = len(rows)
    return _row_standardise(sp.csr_matrix((np.ones(len(ii)), (ii, jj)), shape=(n, n)))


def knn_weights(xy: np.ndarray, k: int = 6) -> sp.csr_matrix:
    from scipy.spatial import cKDTree

    n = len(xy)
    k = min(k, n - 1)
    _, idx = cKDTree(xy).query(xy, k + 1)
    ii = np.repeat(np.arange(n), k)
    return _row_standardise(sp.csr_matrix((np.ones(n * k), (ii, idx[:, 1:].ravel())), shape=(n, n)))


def spatial_weights(adata) -> tuple[sp.csr_matrix, str]:
    """Weights for ``adata``'s spots and the rule used ("hex grid", "square grid", "kNN k=6")."""
    platform = str(adata.uns.get(keys.STIMAGE_UNS, {}).get(keys.PLATFORM, ""))
    if keys.ARRAY_ROW in adata.obs and keys.ARRAY_COL in adata.obs:
        hexagonal = platform == "visium"
        w = grid_weights(adata.obs[keys.ARRAY_ROW].to_numpy(), adata.obs[keys.ARRAY_COL].to_numpy(), hexagonal=hexagonal)
        return w, "hex grid" if hexagonal else "square grid"
    if keys.SPATIAL in adata.obsm:
        return knn_weights(np.asarray(adata.obsm[keys.SPATIAL], float)), "kNN k=6"
    raise StimageError("spatial metrics need obs array_row/array_col or obsm['spatial'] coordinates")


def _z(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    sd = x.std(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sd > 0, (x - x.mean(0)) / sd, np.nan)


def morans_i(x: np.ndarray, w: sp.csr_matrix) -> np.ndarray:
    """Moran's I per column. x (N, G); w (N, N) → (G,). NaN for a constant column.

    I = (N / S0) · zᵀWz / zᵀz with z the centred values and S0 the sum of weights.
    """
    z = _z(x)
    s0 = w.sum()
    return (x.shape[0] / s0) * np.einsum("ng,ng->g", z, w @ np.nan_to_num(z)) / np.einsum("ng,ng->g", z, z)


def morans_i_bv(x: np.ndarray, y: np.ndarray, w: sp.csr_matrix) -> np.ndarray:
    """Bivariate Moran's I of x with the spatial lag of y, per column (esda ``Moran_BV``):
    I = Σ zx · (W zy) / N with zx, zy standardised (population SD)."""
    zx, zy = _z(x), _z(y)
    out = np.einsum("ng,ng->g", np.nan_to_num(zx), w @ np.nan_to_num(zy)) / x.shape[0]
    return np.where(np.isnan(zx).any(0) | np.isnan(zy).any(0), np.nan, out)


def spatial_iou(pred: np.ndarray, truth: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                sigma: float = 1.0) -> np.ndarray:
    """The STimage paper's spatial IoU per gene.

    z-score prediction and truth, binarise at 0, lay them on the spot grid
    (array_row, array_col), Gaussian-filter both axes with ``sigma``, re-binarise at 0.5,
    intersection over union. NaN when a gene is constant or both maps are empty.
    """
    r = np.asarray(rows) - np.min(rows)
    c = np.asarray(cols) - np.min(cols)
    shape = (r.max() + 1, c.max() + 1)
    zp, zt = _z(pred), _z(truth)
    out = np.full(pred.shape[1], np.nan)
    for g in range(pred.shape[1]):
        if np.isnan(zp[:, g]).any() or np.isnan(zt[:, g]).any():
            continue
        maps = []
        for z in (zp[:, g], zt[:, g]):
            grid = np.zeros(shape)
            grid[r, c] = (z > 0).astype(float)
            maps.append(gaussian_filter(grid, sigma) > 0.5)
        union = np.logical_or(*maps).sum()
        if union:
            out[g] = np.logical_and(*maps).sum() / union
    return out
