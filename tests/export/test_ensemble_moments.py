"""Ensemble moments (the one NumPy implementation every runtime uses): law of total
variance, checked by Monte Carlo and by hand."""

import numpy as np
from scipy.stats import nbinom

from export.runtime.moments import ensemble_moments_np as ensemble_moments


def test_one_member_equals_single_model(rng):
    mu = rng.gamma(2.0, 3.0, size=(1, 7, 4))
    r = rng.gamma(2.0, 1.0, size=(1, 7, 4))
    mom = ensemble_moments(mu, r)
    np.testing.assert_allclose(mom["mean"], mu[0], rtol=1e-6)
    np.testing.assert_allclose(mom["var_aleatoric"], mu[0] + mu[0] ** 2 / r[0], rtol=1e-6)
    assert np.all(np.asarray(mom["var_epistemic"]) == 0)


def test_total_variance_is_mixture_variance(rng):
    mu = np.array([[[2.0]], [[6.0]], [[10.0]]])
    r = np.array([[[1.5]], [[4.0]], [[20.0]]])
    mom = {k: float(np.asarray(v).squeeze()) for k, v in ensemble_moments(mu, r).items()}
    assert mom["mean"] == np.float32(6.0)
    assert np.isclose(mom["var_epistemic"], np.var([2.0, 6.0, 10.0]))
    # Sample the equal-weight NB mixture and compare its variance.
    m = rng.integers(0, 3, size=400_000)
    draws = nbinom.rvs(r.ravel()[m], r.ravel()[m] / (r.ravel()[m] + mu.ravel()[m]), random_state=1)
    assert np.isclose(draws.mean(), mom["mean"], rtol=0.01)
    assert np.isclose(draws.var(), mom["var_total"], rtol=0.02)
