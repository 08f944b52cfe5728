"""Ensemble moments and NB-mixture intervals in NumPy (no JAX: the ONNX runtime uses it).

The one implementation of the ensemble moments: the JAX and ONNX paths both reach it through
:func:`export.runtime.prediction.build_prediction`. Intervals come from the equal-weight mixture of the members' NB distributions:
``q_lo`` is the smallest count k with mixture CDF(k) >= (1 - level) / 2, ``q_hi`` the
smallest with CDF(k) >= (1 + level) / 2 (so the 80 % interval is [q10, q90]).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import nbinom

__all__ = ["ensemble_moments_np", "mixture_logpmf", "nb_mixture_quantile", "predictive_interval"]


def ensemble_moments_np(mu: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
    """mu, r: (M, N, G) → mean, var_aleatoric, var_epistemic, var_total, each (N, G)."""
    mu = np.asarray(mu, np.float64)
    r = np.asarray(r, np.float64)
    var = mu + mu * mu / r
    mean = mu.mean(0)
    ale = var.mean(0)
    epi = np.square(mu - mean).mean(0)
    return {"mean": mean, "var_aleatoric": ale, "var_epistemic": epi, "var_total": ale + epi}


def _mixture_cdf(k: np.ndarray, mu: np.ndarray, r: np.ndarray) -> np.ndarray:
    # scipy's nbinom(n=r, p=r/(r+mu)) counts failures: mean r(1-p)/p = mu.
    return nbinom.cdf(k[None], r, r / (r + mu)).mean(0)


def nb_mixture_quantile(mu: np.ndarray, r: np.ndarray, q: float) -> np.ndarray:
    """Smallest integer k with mixture CDF(k) >= q. mu, r: (M, N, G) → (N, G) float.

    The mixture quantile lies between the members' smallest and largest quantiles, so an
    integer bisection between those bounds is exact (about 20 CDF evaluations).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    mu = np.asarray(mu, np.float64)
    r = np.asarray(r, np.float64)
    p = r / (r + mu)
    member_q = nbinom.ppf(q, r, p)
    lo = np.maximum(member_q.min(0) - 1, -1)   # CDF(lo) < q (or lo = -1)
    hi = member_q.max(0)                        # CDF(hi) >= q
    while np.any(hi - lo > 1):
        mid = np.floor((lo + hi) / 2)
        ok = _mixture_cdf(mid, mu, r) >= q
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return hi


def predictive_interval(mu: np.ndarray, r: np.ndarray, level: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` interval of the NB mixture: (q_lo, q_hi), each (N, G)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    return (nb_mixture_quantile(mu, r, (1 - level) / 2), nb_mixture_quantile(mu, r, (1 + level) / 2))


def mixture_logpmf(k: np.ndarray, mu: np.ndarray, r: np.ndarray) -> np.ndarray:
    """log P(k) under the equal-weight mixture of members' NB. k (N, G); mu, r (M, N, G) → (N, G)."""
    from scipy.special import logsumexp

    mu = np.asarray(mu, np.float64)
    r = np.asarray(r, np.float64)
    lp = nbinom.logpmf(np.asarray(k)[None], r, r / (r + mu))
    return logsumexp(lp, axis=0) - np.log(mu.shape[0])
