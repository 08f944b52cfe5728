"""NumPy moments/intervals: equal to an independent per-member scipy computation, and
exact quantiles."""

import numpy as np
import pytest
from scipy.stats import nbinom

from export.runtime.moments import ensemble_moments_np, nb_mixture_quantile, predictive_interval


@pytest.fixture
def members(rng):
    mu = rng.gamma(1.5, 4.0, size=(5, 9, 3))
    r = rng.gamma(2.0, 1.0, size=(5, 9, 3)) + 0.05
    return mu, r


def test_moments_equal_scipy_per_member(members):
    mu, r = members
    a = ensemble_moments_np(mu, r)
    dists = [nbinom(r[m], r[m] / (r[m] + mu[m])) for m in range(mu.shape[0])]
    means = np.stack([d.mean() for d in dists])
    np.testing.assert_allclose(a["mean"], means.mean(0), rtol=1e-10)
    np.testing.assert_allclose(a["var_aleatoric"], np.mean([d.var() for d in dists], axis=0), rtol=1e-10)
    np.testing.assert_allclose(a["var_epistemic"], np.var(means, axis=0, ddof=0), rtol=1e-10)
    np.testing.assert_allclose(a["var_total"], a["var_aleatoric"] + a["var_epistemic"], rtol=1e-12)


def test_quantile_is_smallest_k_reaching_level(members):
    mu, r = members
    for q in (0.1, 0.5, 0.9):
        k = nb_mixture_quantile(mu, r, q)
        cdf = lambda kk: nbinom.cdf(kk[None], r, r / (r + mu)).mean(0)
        assert np.all(cdf(k) >= q - 1e-12)
        assert np.all((k == 0) | (cdf(k - 1) < q))


def test_one_member_interval_is_nb_ppf(members):
    mu, r = members
    lo, hi = predictive_interval(mu[:1], r[:1], 0.8)
    p = r[0] / (r[0] + mu[0])
    np.testing.assert_array_equal(lo, nbinom.ppf(0.1, r[0], p))
    np.testing.assert_array_equal(hi, nbinom.ppf(0.9, r[0], p))


def test_interval_covers_nominal_fraction_of_draws(rng):
    mu = np.array([[[3.0]], [[12.0]]])
    r = np.array([[[2.0]], [[5.0]]])
    lo, hi = predictive_interval(mu, r, 0.8)
    m = rng.integers(0, 2, 200_000)
    draws = nbinom.rvs(r.ravel()[m], (r / (r + mu)).ravel()[m], random_state=3)
    cover = np.mean((draws >= lo.item()) & (draws <= hi.item()))
    assert 0.8 <= cover < 0.9  # discrete: at least nominal, not far above


def test_mixture_logpmf_is_log_of_mean_pmf(members, rng):
    from export.runtime.moments import mixture_logpmf

    mu, r = members
    k = rng.poisson(4.0, size=mu.shape[1:])
    ref = np.log(nbinom.pmf(k[None], r, r / (r + mu)).mean(0))
    np.testing.assert_allclose(mixture_logpmf(k, mu, r), ref, rtol=1e-10)
    np.testing.assert_allclose(mixture_logpmf(k, mu[:1], r[:1]), nbinom.logpmf(k, r[0], r[0] / (r[0] + mu[0])), rtol=1e-12)
