"""CRPS, PIT coverage and sparsification error against brute-force references."""

import numpy as np
import pytest
from scipy.stats import nbinom, poisson

from export.runtime.moments import predictive_interval
from stimage_jax.uncertainty_metrics import (
    interval_coverage_curve, nb_mixture_crps, nb_mixture_crps_per_gene, nb_mixture_pit, pit_coverage,
    pit_coverage_from_pit, sparsification_error,
)


def _params(rng, m, n, g, r=None):
    mu = rng.gamma(2.0, 3.0, size=(m, n, g))
    r = rng.uniform(0.5, 5.0, size=(m, n, g)) if r is None else np.full((m, n, g), float(r))
    return mu, r


def _draw(rng, mu, r):
    """One count per spot from its equal-weight NB mixture."""
    pick = rng.integers(0, mu.shape[0], size=mu.shape[1:])
    mu_s = np.take_along_axis(mu, pick[None], 0)[0]
    r_s = np.take_along_axis(r, pick[None], 0)[0]
    return rng.negative_binomial(r_s, r_s / (r_s + mu_s)).astype(np.float64)


def _crps_brute(y, mu, r, kmax=3000):
    k = np.arange(kmax + 1)[:, None, None, None]
    f = nbinom.cdf(k, r[None], (r / (r + mu))[None]).mean(1)  # (K, N, G)
    return np.square(f - (y[None] <= k[:, 0])).sum(0)


def test_crps_matches_brute_force_scipy_sum(rng):
    mu, r = _params(rng, 3, 7, 4)
    mu[0, 0, 0] = 0.0  # a member with all mass at 0
    y = _draw(rng, mu, r)
    y[1, 1] = 60.0  # a count far in the tail
    got = nb_mixture_crps(y, mu, r)
    assert got.shape == (7, 4)
    np.testing.assert_allclose(got, _crps_brute(y, mu, r), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(nb_mixture_crps_per_gene(y, mu, r), got.mean(0))


def test_crps_point_mass_and_poisson_limit():
    # mu = 0: all mass at 0, CRPS = |y - 0|.
    y = np.array([[0.0, 1.0, 7.0]])
    np.testing.assert_allclose(nb_mixture_crps(y, np.zeros((2, 1, 3)), np.ones((2, 1, 3))), [[0.0, 1.0, 7.0]],
                               atol=1e-12)
    # r -> inf: NB -> Poisson(mu) (not a point mass); compare with a Poisson sum.
    mu = np.array([[[3.0, 12.0]]])
    y = np.array([[5.0, 4.0]])
    k = np.arange(200)[:, None]
    ref = np.square(poisson.cdf(k, mu[0, 0]) - (y[0] <= k)).sum(0)
    np.testing.assert_allclose(nb_mixture_crps(y, mu, np.full_like(mu, 1e7))[0], ref, rtol=1e-5)


def test_crps_equals_energy_form_by_monte_carlo():
    rng = np.random.default_rng(1)
    mu = np.array([[[4.0]], [[15.0]]])
    r = np.array([[[2.0]], [[0.8]]])
    y = np.array([[9.0]])
    s = 200_000
    x = _draw(rng, np.repeat(mu, s, 1)[..., 0], np.repeat(r, s, 1)[..., 0])
    x2 = _draw(rng, np.repeat(mu, s, 1)[..., 0], np.repeat(r, s, 1)[..., 0])
    mc = np.abs(x - y[0, 0]).mean() - 0.5 * np.abs(x - x2).mean()
    assert nb_mixture_crps(y, mu, r)[0, 0] == pytest.approx(mc, rel=0.03)


def test_crps_kmax_truncates_with_a_warning(rng):
    mu, r = _params(rng, 2, 3, 2)
    y = _draw(rng, mu, r)
    full = nb_mixture_crps(y, mu, r)
    with pytest.warns(RuntimeWarning, match="truncated"):
        cut = nb_mixture_crps(y, mu, r, kmax=2)
    assert np.all(cut <= full + 1e-12) and np.any(cut < full - 1e-3)
    np.testing.assert_allclose(cut, _crps_brute(y, mu, r, kmax=2), rtol=1e-7, atol=1e-12)


def test_crps_rejects_point_models_and_bad_shapes():
    with pytest.raises(ValueError, match="point model"):
        nb_mixture_crps(np.zeros((2, 1)), np.ones((1, 2, 1)), np.full((1, 2, 1), np.inf))
    with pytest.raises(ValueError, match="members"):
        nb_mixture_crps(np.zeros((2, 1)), np.ones((1, 3, 1)), np.ones((1, 3, 1)))


def test_pit_interval_and_fractional_coverage():
    mu, r = np.array([[[2.0]]]), np.array([[[1.5]]])
    lo, hi = nb_mixture_pit(np.array([[0.0]]), mu, r)
    assert lo[0, 0] == 0.0 and hi[0, 0] == pytest.approx(nbinom.pmf(0, 1.5, 1.5 / 3.5))
    # PIT uniform on [0.05, 0.25]; central 80 % = [0.1, 0.9] holds 0.15 / 0.2 of it.
    assert pit_coverage_from_pit(np.array([[0.05]]), np.array([[0.25]]), 0.8)[0] == pytest.approx(0.75)
    assert pit_coverage_from_pit(np.array([[0.5]]), np.array([[0.5]]), 0.8)[0] == 1.0  # zero width: a point


def test_pit_coverage_is_nominal_when_well_specified_and_low_when_too_narrow():
    rng = np.random.default_rng(2)
    mu, r = _params(rng, 3, 20_000, 1)
    y = _draw(rng, mu, r)
    assert pit_coverage(y, mu, r, 0.8)[0] == pytest.approx(0.8, abs=0.02)
    assert pit_coverage(y, mu, r, 0.5)[0] == pytest.approx(0.5, abs=0.02)
    # Overdispersed counts scored by a near-Poisson model: too narrow.
    assert pit_coverage(y, mu, np.full_like(r, 1e4), 0.8)[0] < 0.7


def test_coverage_curve_matches_predictive_interval(rng):
    mu, r = _params(rng, 2, 150, 3)
    y = _draw(rng, mu, r)
    levels = (0.3, 0.8, 0.95)
    curve = interval_coverage_curve(y, mu, r, levels)
    assert curve["interval"].shape == curve["pit"].shape == (3, 3)
    for i, level in enumerate(levels):
        lo, hi = predictive_interval(mu, r, level)
        np.testing.assert_array_equal(curve["interval"][i], ((y >= lo) & (y <= hi)).mean(0))
        np.testing.assert_allclose(curve["pit"][i], pit_coverage(y, mu, r, level))
    # Inclusive integer intervals cover at least nominally in expectation; PIT is exact.
    assert np.all(curve["interval"].mean(1) >= curve["pit"].mean(1) - 1e-12)


def _ause_loop(err, unc, n_bins):
    out = []
    for g in range(err.shape[1]):
        def curve(key):
            order = sorted(range(len(key)), key=lambda i: -key[i])  # stable: ties keep spot order
            vals = []
            for i in range(n_bins):
                keep = order[(i * len(key)) // n_bins:]
                vals.append(np.mean(err[keep, g]))
            return np.array(vals) / np.mean(err[:, g])

        d = curve(unc[:, g]) - curve(err[:, g])
        out.append(np.trapezoid(d, np.arange(n_bins) / n_bins))
    return np.array(out)


def test_sparsification_error_oracle_random_and_loop_reference(rng):
    err = rng.exponential(size=(203, 4)) ** 2
    perfect = sparsification_error(err, err)
    np.testing.assert_allclose(perfect["ause"], 0.0, atol=1e-12)
    assert perfect["curve_unc"].shape == (20, 4) and perfect["curve_unc"][0] == pytest.approx(1.0)
    noisy = err + rng.exponential(size=err.shape) * 3  # informative but imperfect
    random = rng.uniform(size=err.shape)
    a_noisy, a_rand = sparsification_error(err, noisy)["ause"], sparsification_error(err, random)["ause"]
    assert np.all(a_rand > 0.3) and np.all((a_noisy > 0) & (a_noisy < a_rand))
    for unc, n_bins in ((random, 20), (noisy, 7), (np.round(random * 3), 10)):  # the last has ties
        np.testing.assert_allclose(sparsification_error(err, unc, n_bins=n_bins)["ause"],
                                   _ause_loop(err, unc, n_bins), rtol=1e-10)


def test_sparsification_error_nan_when_nothing_to_rank(rng):
    err = rng.exponential(size=(30, 2))
    err[:, 1] = 0.0
    out = sparsification_error(err, np.c_[np.zeros(30), rng.uniform(size=30)])
    assert np.isnan(out["ause"]).all()  # gene 0: constant uncertainty; gene 1: no error at all


def test_uncertainty_maps_without_truth_and_their_errors(rng, tmp_path):
    import anndata as ad
    import matplotlib.image as mpimg
    import pandas as pd

    from data_pipelines.errors import StimageError
    from export.runtime.prediction import build_prediction
    from stimage_jax.plots import plot_calibration, plot_uncertainty_maps

    n = 12
    base = ad.AnnData(np.zeros((n, 1), np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]))
    base.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    mu, r = _params(rng, 2, n, 2)
    pred = build_prediction(base, mu, r, ["A", "B"], {})
    png = plot_uncertainty_maps(pred, "B", tmp_path / "u.png")
    h, w, _ = mpimg.imread(png).shape
    assert 2 * h < w < 4 * h  # three panels: no observed counts without a truth
    with pytest.raises(StimageError, match="'Z' is not in the prediction"):
        plot_uncertainty_maps(pred, "Z", tmp_path / "z.png")
    del pred.obsm["spatial"]
    with pytest.raises(StimageError, match="no obsm\\['spatial'\\]"):
        plot_uncertainty_maps(pred, "A", tmp_path / "z.png")
    del pred.layers["var_epistemic"]
    with pytest.raises(StimageError, match="no layer\\(s\\) var_epistemic"):
        plot_uncertainty_maps(pred, "A", tmp_path / "z.png")
    with pytest.raises(StimageError, match="columns"):
        plot_calibration(pd.DataFrame({"level": [0.5]}), tmp_path / "c.png")
    assert not (tmp_path / "z.png").exists() and not (tmp_path / "c.png").exists()
