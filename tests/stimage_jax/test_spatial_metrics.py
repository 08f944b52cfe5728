"""Moran's I and the spatial IoU against reference formulas and known patterns."""

import numpy as np
import pytest
import scipy.sparse as sp

from stimage_jax.spatial_metrics import grid_weights, knn_weights, morans_i, morans_i_bv, spatial_iou


def _moran_reference(x, W):
    n = len(x)
    z = x - x.mean()
    num = sum(W[i, j] * z[i] * z[j] for i in range(n) for j in range(n))
    return n / W.sum() * num / (z @ z)


def test_morans_i_matches_the_formula(rng):
    W = rng.uniform(0, 1, (15, 15)) * (rng.uniform(size=(15, 15)) < 0.3)
    np.fill_diagonal(W, 0)
    x = rng.normal(size=(15, 2))
    got = morans_i(x, sp.csr_matrix(W))
    assert got[0] == pytest.approx(_moran_reference(x[:, 0], W), rel=1e-10)
    assert got[1] == pytest.approx(_moran_reference(x[:, 1], W), rel=1e-10)


def test_known_patterns_on_a_square_grid():
    r, c = np.divmod(np.arange(100), 10)
    w = grid_weights(r, c, hexagonal=False)
    assert np.allclose(np.asarray(w.sum(1)).ravel(), 1.0)
    checker = ((r + c) % 2).astype(float)[:, None]
    assert morans_i(checker, w)[0] == pytest.approx(-1.0)
    gradient = (r + 0.0)[:, None]
    assert morans_i(gradient, w)[0] > 0.8
    # bivariate of a variable with itself is its univariate I under row-standardised weights
    x = np.c_[gradient[:, 0] + np.sin(c), checker[:, 0]]
    np.testing.assert_allclose(morans_i_bv(x, x, w), morans_i(x, w), rtol=1e-10)
    assert np.isnan(morans_i(np.ones((100, 1)), w)[0])


def test_hex_neighbours_and_knn():
    rows, cols = np.array([0, 0, 1, 1, 2]), np.array([0, 2, 1, 3, 0])
    w = grid_weights(rows, cols, hexagonal=True).toarray()
    # (0,0) touches (0,2) in its row and (1,1) below; (1,3) and (2,0) are two steps away
    np.testing.assert_allclose(w[0], [0, 0.5, 0.5, 0, 0])
    np.testing.assert_allclose(w[2], [0.25, 0.25, 0, 0.25, 0.25])  # (1,1) touches all four others
    k = knn_weights(np.c_[np.arange(10.0), np.zeros(10)], k=2).toarray()
    assert k[0, 1] == 0.5 and k[0, 2] == 0.5 and k[5, 4] == 0.5 and k[5, 6] == 0.5


def test_spatial_iou():
    r, c = np.divmod(np.arange(144), 12)
    blob = np.exp(-((r - 4.0) ** 2 + (c - 6.0) ** 2) / 8.0)[:, None]
    assert spatial_iou(blob, blob, r, c)[0] == 1.0
    assert spatial_iou(-blob, blob, r, c)[0] == 0.0
    shifted = np.exp(-((r - 5.0) ** 2 + (c - 6.0) ** 2) / 8.0)[:, None]
    assert 0.3 < spatial_iou(shifted, blob, r, c)[0] < 1.0
    assert np.isnan(spatial_iou(np.ones((144, 1)), blob, r, c)[0])
