"""Spatial context in NumPy: neighbours, pooled features, smoothed members, dihedral views."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from data_pipelines.errors import StimageError
from export.runtime.context import context_features, dihedral, neighbour_index, pool_neighbours, smooth_members
from export.runtime.moments import ensemble_moments_np


def _grid(n_side: int, pitch: float = 100.0, jitter: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    xy = np.stack([c.ravel() * pitch, r.ravel() * pitch], 1).astype(float)
    return xy + rng.uniform(-jitter, jitter, xy.shape)


def test_neighbours_are_the_k_nearest_of_the_same_sample():
    xy = np.concatenate([_grid(6, jitter=10, seed=1), _grid(5, jitter=10, seed=2)])  # two overlapping sections
    samples = np.array(["a"] * 36 + ["b"] * 25)
    idx = neighbour_index(xy, samples, 4)
    for i in range(len(xy)):
        same = np.flatnonzero((samples == samples[i]) & (np.arange(len(xy)) != i))
        d = cdist(xy[i:i + 1], xy[same])[0]
        want = same[np.argsort(d, kind="stable")[:4]]
        assert set(idx[i]) == set(want), i
        assert (samples[idx[i]] == samples[i]).all()


def test_interior_grid_spot_has_its_four_grid_neighbours():
    xy = _grid(5)
    idx = neighbour_index(xy, np.zeros(25), 4)
    centre = 12  # row 2, col 2
    assert set(idx[centre]) == {7, 11, 13, 17}


def test_small_samples_pad_with_the_nearest():
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [50.0, 50.0]])
    idx = neighbour_index(xy, np.array([0, 0, 0, 1]), 4)
    assert list(idx[0]) == [1, 2, 1, 1] and list(idx[3]) == [3, 3, 3, 3]
    with pytest.raises(StimageError):
        neighbour_index(np.array([[0.0, np.nan]]), np.zeros(1), 2)


def test_context_features_and_smoothing_follow_their_formulas():
    rng = np.random.default_rng(0)
    xy = _grid(4)
    idx = neighbour_index(xy, np.zeros(16), 3)
    f = rng.normal(size=(16, 5)).astype(np.float32)
    cf = context_features(f, idx)
    assert cf.shape == (16, 10)
    np.testing.assert_array_equal(cf[:, :5], f)
    np.testing.assert_allclose(cf[:, 5:], np.stack([f[idx[i]].mean(0) for i in range(16)]), rtol=1e-5, atol=1e-7)
    mu = rng.gamma(2.0, 3.0, (3, 16, 7)).astype(np.float32)
    s = smooth_members(mu, idx, 0.3)
    want = 0.7 * mu + 0.3 * np.stack([[mu[m, idx[i]].mean(0) for i in range(16)] for m in range(3)])
    np.testing.assert_allclose(s, want, rtol=1e-5)
    assert smooth_members(mu, idx, 0.0) is mu
    np.testing.assert_allclose(pool_neighbours(mu[0], idx), np.stack([mu[0, idx[i]].mean(0) for i in range(16)]),
                               rtol=1e-6)
    with pytest.raises(StimageError):
        smooth_members(mu, idx, 1.5)


def test_smoothed_members_give_honest_mixture_moments():
    """Epistemic variance after smoothing is the spread of the smoothed member means."""
    rng = np.random.default_rng(1)
    idx = neighbour_index(_grid(4), np.zeros(16), 4)
    mu = rng.gamma(2.0, 3.0, (5, 16, 3))
    r = rng.gamma(3.0, 1.0, (5, 16, 3))
    s = smooth_members(mu, idx, 0.5)
    mom = ensemble_moments_np(s, r)
    np.testing.assert_allclose(mom["mean"], s.mean(0), rtol=1e-6)
    np.testing.assert_allclose(mom["var_epistemic"], s.var(0), rtol=1e-5)
    np.testing.assert_allclose(mom["var_aleatoric"], (s + s**2 / r).mean(0), rtol=1e-5)


def test_dihedral_views_are_the_eight_symmetries():
    t = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    views = [dihedral(t, k) for k in range(8)]
    np.testing.assert_array_equal(views[0], t)
    assert len({v.tobytes() for v in views}) == 8  # all distinct on an asymmetric tile
    np.testing.assert_array_equal(views[1][0, :, :, 0], np.rot90(t[0, :, :, 0]))
    np.testing.assert_array_equal(views[4][0, :, :, 0], t[0, :, ::-1, 0])
    with pytest.raises(StimageError):
        dihedral(t, 8)
