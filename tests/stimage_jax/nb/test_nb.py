"""NB maths against scipy, and the failure modes of the reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import nbinom

from stimage_jax.nb import nb_logpmf, nb_mean_var, nb_nll, params_from_logits, to_total_count_probs

K = np.concatenate([np.arange(0, 60), np.logspace(2, 5, 25).round()])
R = np.logspace(-3, 4, 22)
MU = np.logspace(-3, 4, 15)
GRID = np.meshgrid(K, R, MU, indexing="ij")


def _scipy(k, r, mu):
    return nbinom.logpmf(k, r, r / (r + mu))


def test_logpmf_matches_scipy_float64():
    k, r, mu = GRID
    with jax.enable_x64(True):
        out = np.asarray(nb_logpmf(jnp.asarray(k), jnp.asarray(mu), jnp.asarray(r)))
    ref = _scipy(k, r, mu)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-12)


def test_logpmf_float32_accuracy_and_finite():
    k, r, mu = GRID
    out = np.asarray(nb_logpmf(*(jnp.asarray(a, jnp.float32) for a in (k, mu, r))), np.float64)
    ref = _scipy(k, r, mu)
    assert np.isfinite(out).all()
    rel = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-3)
    # float32 cannot do better where large terms cancel (k ~ mu ~ r ~ 1e4); typical is ~1e-6
    assert np.percentile(rel, 99) < 2e-5
    assert rel.max() < 1e-3


def test_logpmf_sums_to_one():
    mu, r = jnp.asarray([0.3, 5.0, 40.0]), jnp.asarray([0.5, 2.0, 100.0])
    k = jnp.arange(0, 3000.0)[:, None]
    total = jnp.exp(nb_logpmf(k, mu, r)).sum(0)
    np.testing.assert_allclose(np.asarray(total), 1.0, rtol=1e-4)


def test_no_nan_when_p_saturates():
    # The reference code's sigmoid-p parameterisation NaNs when p -> 1; here huge means and
    # tiny dispersions (p = mu/(mu+r) == 1.0 in float32) stay finite, gradients too.
    log_mu = jnp.asarray([[11.9, 12.0, 40.0]])
    log_r = jnp.asarray([[-10.0, -12.0, -50.0]])
    y = jnp.asarray([[0.0, 5.0, 1e5]])
    loss, grads = jax.value_and_grad(nb_nll, argnums=(1, 2))(y, log_mu, log_r)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    _, p = to_total_count_probs(*params_from_logits(log_mu, log_r))
    assert float(p.min()) == 1.0  # really saturated


def test_mean_var_and_conversion_match_scipy():
    mu, r = np.array([0.5, 3.0, 200.0]), np.array([0.1, 2.0, 50.0])
    m, v = nb_mean_var(mu, r)
    total, probs = to_total_count_probs(mu, r)
    # TFP probs p is the *success* probability; scipy's p is 1 - that.
    sm, sv = nbinom.stats(total, 1 - probs, moments="mv")
    np.testing.assert_allclose(m, sm, rtol=1e-12)
    np.testing.assert_allclose(v, sv, rtol=1e-12)


def test_nll_mask_ignores_padding():
    y = jnp.asarray([[1.0, 2.0], [100.0, 0.0]])
    lm, lr = jnp.zeros((2, 2)), jnp.zeros((2, 2))
    full = nb_nll(y[:1], lm[:1], lr[:1])
    masked = nb_nll(y, lm, lr, mask=jnp.asarray([[1.0], [0.0]]))
    assert float(full) == pytest.approx(float(masked), rel=1e-6)
