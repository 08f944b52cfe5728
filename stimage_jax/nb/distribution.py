"""Negative-binomial maths (pure functions, any float dtype).

Parameterisation: mean ``mu`` > 0 and dispersion (a.k.a. ``total_count``) ``r`` > 0,
with ``Var = mu + mu**2 / r``. The network predicts ``log mu`` and ``log r``.
Why mean/dispersion rather than the paper's (r, p): the prediction a user wants *is* the
mean, the log link is the GLM-standard one for counts, and the reference code's
``p = sigmoid(.)`` saturates to 1.0 in float32, where ``log1p(-p)`` gives -inf and the
loss NaN. Convert with :func:`to_total_count_probs` (TFP's ``NegativeBinomial(total_count,
probs)`` convention, where ``mean = r p / (1 - p)``).

The log-pmf avoids both failure modes:
- ``r log(r/(r+mu)) = -r log1p(mu/r)`` and ``k log(mu/(r+mu)) = -k log1p(r/mu)``: no
  ``1 - p`` is ever formed;
- ``log C(k+r-1, k) = -log(k+r) - betaln(r, k+1)``; ``betaln`` keeps float32 accurate
  where ``gammaln(k+r) - gammaln(r)`` cancels catastrophically (measured: float32 worst
  relative error 2.4e-4 vs 7.7e-3 for the gammaln form; float64 6e-7 vs scipy).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import betaln

__all__ = [
    "LOG_MU_RANGE", "LOG_R_RANGE", "nb_logpmf", "nb_nll", "nb_mean_var",
    "params_from_logits", "to_total_count_probs",
]

# Clip ranges for the network's raw outputs: exp(12) ≈ 1.6e5 counts is above any spot's
# total; r in [4.5e-5, 1.6e5] spans from extreme over-dispersion to ~Poisson.
LOG_MU_RANGE = (-12.0, 12.0)
LOG_R_RANGE = (-10.0, 12.0)


def params_from_logits(log_mu, log_r):
    """Raw head outputs → (mu, r), clipped to finite ranges. Shapes broadcast: (..., G)."""
    mu = jnp.exp(jnp.clip(log_mu, *LOG_MU_RANGE))
    r = jnp.exp(jnp.clip(log_r, *LOG_R_RANGE))
    return mu, r


def nb_logpmf(k, mu, r):
    """log P(K = k) for K ~ NB(mean=mu, dispersion=r). Shapes broadcast: (..., G).

    ``k`` non-negative integers stored as floats. Matches ``scipy.stats.nbinom.logpmf(k,
    r, r / (r + mu))``.
    """
    k = jnp.asarray(k, dtype=jnp.result_type(mu, r))
    pos = k > 0
    k_safe = jnp.where(pos, k, 1.0)  # betaln(r, 1) path is never used at k == 0
    log_binom = jnp.where(pos, -jnp.log(k_safe + r) - betaln(r, k_safe + 1.0), 0.0)
    log_fail = -r * jnp.log1p(mu / r)
    log_succ = jnp.where(pos, -k_safe * jnp.log1p(r / mu), 0.0)
    return log_binom + log_fail + log_succ


def nb_nll(k, log_mu, log_r, mask=None):
    """Mean negative log-likelihood over all entries (or the masked ones). k: (B, G)."""
    mu, r = params_from_logits(log_mu, log_r)
    ll = nb_logpmf(k, mu, r)
    if mask is None:
        return -jnp.mean(ll)
    mask = jnp.broadcast_to(mask, ll.shape)  # a (B, 1) row mask weighs every gene
    return -jnp.sum(ll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def nb_mean_var(mu, r):
    """(mean, variance) of NB(mu, r): variance = mu + mu**2 / r. Shapes: (..., G)."""
    return mu, mu + mu * mu / r


def to_total_count_probs(mu, r):
    """(total_count, probs) in TFP's convention (the STimage paper's r, p)."""
    return r, mu / (mu + r)
