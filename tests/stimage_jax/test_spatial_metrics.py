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


def _squidpy_moran(adata, genes, coords, n_neighs, adjacency=None):
    """squidpy.gr.spatial_autocorr (Moran's I, row-standardised) on squidpy's own grid graph,
    or on ``adjacency`` (binary, spots × spots) when given."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import squidpy as sq

        b = adata[:, genes].copy()
        b.obsm["spatial"] = np.asarray(coords, float)
        sq.gr.spatial_neighbors(b, coord_type="grid", n_neighs=n_neighs)
        if adjacency is not None:
            b.obsp["spatial_connectivities"] = sp.csr_matrix(adjacency, dtype=np.float64)
        sq.gr.spatial_autocorr(b, mode="moran", genes=genes, n_perms=None, transformation=True)
    return b.obsp["spatial_connectivities"], b.uns["moranI"].loc[genes, "I"].to_numpy()


@pytest.mark.real_data
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_moran_i_obs_and_pred_equal_squidpy_with_the_same_grid_weights(her2st_root, shared):
    """`stimage evaluate`'s moran_i_obs / moran_i_pred equal squidpy's Moran's I to 1e-6 with
    the same weights. HER2ST C6 (legacy ST): squidpy's own grid graph (4 neighbours on the
    array) is our graph, checked edge by edge. Visium fixture: its 100 spots are scattered
    over the array, where squidpy's grid rule (6 nearest within 1.3 x the median distance)
    links spots that are not array neighbours, so squidpy is given our 6-neighbour hex graph."""
    from data_pipelines.slides import read_her2st, read_visium
    from stimage_jax.metrics import evaluate
    from stimage_jax.spatial_metrics import spatial_weights

    cases = []
    c6 = read_her2st(her2st_root, "C6", require_image=True)
    cases.append((c6, ["ERBB2", "CD74", "B2M", "FASN"], np.c_[c6.obs["array_col"], c6.obs["array_row"]], 4, False))
    vis = read_visium(shared / "data" / "visium_fixture")
    tot = np.asarray(vis.X.sum(0)).ravel()
    cases.append((vis, list(vis.var_names[np.argsort(-tot)[:4]]), vis.obsm["spatial"], 6, True))
    rng = np.random.default_rng(0)
    for truth, genes, coords, k, ours in cases:
        truth = truth[:, genes].copy()
        pred = truth.copy()
        pred.X = np.asarray(truth.X.toarray(), np.float32) * rng.uniform(0.5, 1.5, truth.shape).astype(np.float32)
        table, _ = evaluate(pred, truth)
        w, _ = spatial_weights(truth)
        adj = (w > 0).astype(np.float64) if ours else None
        conn, ref_obs = _squidpy_moran(truth, genes, coords, k, adj)
        assert abs((w > 0).astype(int) - (conn > 0).astype(int)).sum() == 0  # the same neighbours
        assert w.nnz > 0
        _, ref_pred = _squidpy_moran(pred, genes, coords, k, adj)
        got = table.set_index("gene").loc[genes]
        np.testing.assert_allclose(got["moran_i_obs"].to_numpy(float), ref_obs, atol=1e-6)
        np.testing.assert_allclose(got["moran_i_pred"].to_numpy(float), ref_pred, atol=1e-6)
