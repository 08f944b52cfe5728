"""Ensemble moments: law of total variance over members' NB distributions.

For members m = 1..M with NB means ``mu_m`` and variances ``v_m`` (equal weights):
- mean       = mean_m mu_m
- aleatoric  = mean_m v_m                 (noise the data itself has)
- epistemic  = mean_m (mu_m - mean)**2    (members disagree: population variance, ddof=0)
- total      = aleatoric + epistemic      (= variance of the NB mixture)
A one-member ensemble therefore has epistemic exactly 0 and equals the single model.
"""

from __future__ import annotations

import jax.numpy as jnp

from stimage_jax.nb.distribution import nb_mean_var

__all__ = ["ensemble_moments"]


def ensemble_moments(mu, r) -> dict:
    """mu, r: (M, N, G) member NB parameters → dict of (N, G) arrays."""
    m, v = nb_mean_var(mu, r)
    mean = jnp.mean(m, axis=0)
    aleatoric = jnp.mean(v, axis=0)
    epistemic = jnp.mean(jnp.square(m - mean[None]), axis=0)
    return {"mean": mean, "var_aleatoric": aleatoric, "var_epistemic": epistemic,
            "var_total": aleatoric + epistemic}
