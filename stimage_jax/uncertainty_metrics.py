"""Is the uncertainty any good? Proper scores and calibration for NB-mixture predictions.

Pure NumPy/SciPy (no JAX). The predictive distribution of a spot and gene is the
equal-weight mixture of the ensemble members' negative binomials, NB(mean mu, dispersion
r) with variance mu + mu²/r; member parameters ``mu``, ``r`` are shaped (M, N, G) —
members on axis 0, as in :mod:`export.runtime.moments` — and observed counts ``y`` (N, G).
Every function also accepts any trailing shape S: mu, r (M, *S), y S.

* :func:`nb_mixture_crps` — continuous ranked probability score for counts.
* :func:`nb_mixture_pit`, :func:`pit_coverage` — non-randomised PIT (Czado, Gneiting &
  Held 2009, *Biometrics* 65:1254) and the central-interval coverage derived from it.
* :func:`interval_coverage_curve` — interval and PIT coverage over nominal levels.
* :func:`sparsification_error` — sparsification curves and AUSE (Ilg et al. 2018, ECCV).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import xlogy

__all__ = [
    "nb_mixture_crps", "nb_mixture_crps_per_gene", "nb_mixture_pit", "pit_coverage",
    "pit_coverage_from_pit", "interval_coverage_curve", "sparsification_error",
    "DEFAULT_LEVELS", "CRPS_TOL", "CRPS_KMAX",
]

DEFAULT_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
CRPS_TOL = 1e-5        # the CRPS sum stops once the mixture CDF is within this of 1 (and k >= y)
CRPS_KMAX = 10**6      # ... and at this count at the latest when no kmax is given
_BLOCK_BUDGET = 1 << 18  # float64 elements per (k-block, member, element) work array (2 MB)
_CHUNK = 4096            # elements (spot x gene) summed together


def _params(y, mu, r) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y, np.float64)
    mu = np.asarray(mu, np.float64)
    r = np.asarray(r, np.float64)
    if mu.shape != r.shape or mu.ndim < 1 or mu.shape[1:] != y.shape:
        raise ValueError(f"mu {mu.shape} and r {r.shape} must be (members, *y.shape) with y {y.shape}")
    if not (np.isfinite(mu).all() and (mu >= 0).all()):
        raise ValueError("NB means mu must be finite and >= 0")
    if not (np.isfinite(r).all() and (r > 0).all()):
        raise ValueError("NB dispersions r must be finite and > 0 (a point model, r = inf, has no NB mixture)")
    if not np.isfinite(y).all():
        raise ValueError("observed counts must be finite")
    return y, mu, r


def _mixture_cdf(k: np.ndarray, mu: np.ndarray, r: np.ndarray) -> np.ndarray:
    from export.runtime.moments import _mixture_cdf as cdf  # one definition of the mixture CDF

    return cdf(k, mu, r)


def nb_mixture_crps(y, mu, r, *, kmax: int | None = None) -> np.ndarray:
    """CRPS of the NB mixture for count data, per spot: y (N, G), mu, r (M, N, G) → (N, G).

    CRPS(F, y) = Σ_{k≥0} (F(k) − 1{y ≤ k})², F the equal-weight mixture CDF — the discrete
    form of ∫ (F(x) − 1{y ≤ x})² dx, equal to E|X − y| − ½ E|X − X'| (lower is better,
    same units as the counts). ``y`` should be non-negative integer counts.

    Truncation: the sum for each element runs to the first K ≥ y with
    F(K) ≥ 1 − :data:`CRPS_TOL` (the dropped tail Σ_{k>K} (1 − F(k))² is then at most
    1e-5 · E[(X − K)⁺] ≤ 1e-5 · E[X]; measured relative error ~1e-9), and never past
    ``kmax`` (default :data:`CRPS_KMAX`).
    Elements cut off by the cap get a slight underestimate, and a warning.

    The NB pmf is built by the recurrence of its log coefficient, Σ_{j<k} log((r+j)/(j+1)),
    in blocks of k over the elements still running, so large counts and large r stay
    exact and elements with small counts finish early.
    """
    y, mu, r = _params(y, mu, r)
    shape, m = y.shape, mu.shape[0]
    cap = CRPS_KMAX if kmax is None else int(kmax)
    if cap < 0:
        raise ValueError(f"kmax must be >= 0, got {kmax}")
    yf, muf, rf = y.ravel(), mu.reshape(m, -1), r.reshape(m, -1)
    out, capped = np.zeros(yf.size), 0
    for s in range(0, yf.size, _CHUNK):  # bounded memory, cache-friendly work arrays
        sl = slice(s, s + _CHUNK)
        out[sl], c = _crps_flat(yf[sl], muf[:, sl], rf[:, sl], cap)
        capped += c
    if capped:
        warnings.warn(f"CRPS sum truncated at k = {cap} for {capped} element(s) whose NB mixture has "
                      f"mass beyond it or whose count exceeds it; those values are underestimates",
                      RuntimeWarning, stacklevel=2)
    return out.reshape(shape)


def _crps_flat(yf: np.ndarray, muf: np.ndarray, rf: np.ndarray, cap: int) -> tuple[np.ndarray, int]:
    """y (L,), mu, r (M, L) → (CRPS (L,), number of elements stopped by the cap)."""
    m = muf.shape[0]
    logp0 = -rf * np.log1p(muf / rf)          # r log(r / (r + mu)) = log P(0)
    q = muf / (rf + muf)                      # "success" probability of the k-recursion
    out = np.zeros(yf.size)
    active = np.arange(yf.size)
    logc = np.zeros((m, yf.size))             # log coefficient C(k + r - 1, k) at the block start
    f_prev = np.zeros(yf.size)                # F(k0 - 1)
    k0 = 0
    while active.size and k0 <= cap:
        b = int(np.clip(_BLOCK_BUDGET // (m * active.size), 8, 1 << 16))
        b = min(b, cap - k0 + 1)
        ks = np.arange(k0, k0 + b, dtype=np.float64)
        ra = rf[:, active]
        inc = np.log(ra[None] + ks[:, None, None]) - np.log1p(ks)[:, None, None]  # (b, M, A): term j = k
        lc = logc[:, active][None] + np.cumsum(inc, 0) - inc                     # exclusive: sum over j < k
        pmf = np.exp(lc + logp0[:, active][None] + xlogy(ks[:, None, None], q[:, active][None])).mean(1)
        f = np.minimum(f_prev[active][None] + np.cumsum(pmf, 0), 1.0)             # (b, A)
        ya = yf[active]
        out[active] += np.square(f - (ya[None] <= ks[:, None])).sum(0)
        logc[:, active] += inc.sum(0)
        f_prev[active] = f[-1]
        done = (f[-1] >= 1.0 - CRPS_TOL) & (ya <= k0 + b - 1)
        active = active[~done]
        k0 += b
    return out, int(active.size)


def nb_mixture_crps_per_gene(y, mu, r, *, kmax: int | None = None) -> np.ndarray:
    """Mean over spots (axis 0) of :func:`nb_mixture_crps`: y (N, G), mu, r (M, N, G) → (G,)."""
    return nb_mixture_crps(y, mu, r, kmax=kmax).mean(0)


def nb_mixture_pit(y, mu, r) -> tuple[np.ndarray, np.ndarray]:
    """Non-randomised PIT interval (F(y − 1), F(y)), each shaped like y (N, G).

    For a count y the probability integral transform is uniform on [F(y−1), F(y)]
    (Czado et al. 2009); under a calibrated forecast its mixture over y is U(0, 1).
    """
    y, mu, r = _params(y, mu, r)
    return _mixture_cdf(y - 1.0, mu, r), _mixture_cdf(y, mu, r)


def _central(level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    return (1.0 - level) / 2.0, (1.0 + level) / 2.0


def pit_coverage_from_pit(lo: np.ndarray, hi: np.ndarray, level: float) -> np.ndarray:
    """Mean over spots (axis 0) of the PIT mass inside the central interval: (N, G) → (G,).

    Each spot's PIT is uniform on [lo, hi]; the fraction of it in [(1−level)/2, (1+level)/2]
    is the spot's (fractional) coverage. A zero-width PIT (pmf underflow) counts as a point.
    """
    a, b = _central(level)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    width = hi - lo
    overlap = np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(width > 0, overlap / np.where(width > 0, width, 1.0), (lo >= a) & (lo <= b))
    return frac.mean(0)


def pit_coverage(y, mu, r, level: float = 0.8) -> np.ndarray:
    """PIT-based coverage of the central ``level`` interval per gene: y (N, G) → (G,).

    The expected share of each spot's non-randomised PIT that falls inside
    [(1−level)/2, (1+level)/2], averaged over spots. Unlike the inclusive interval
    [q_lo, q_hi] (which over-covers for small counts, where one count holds much mass),
    it equals ``level`` in expectation for a correctly specified model; lower means
    the predictive distribution is too narrow (or biased), higher too wide.
    """
    _central(level)
    lo, hi = nb_mixture_pit(y, mu, r)
    return pit_coverage_from_pit(lo, hi, level)


def interval_coverage_curve(y, mu, r, levels=DEFAULT_LEVELS) -> dict[str, np.ndarray]:
    """Coverage per nominal level, for a calibration plot: y (N, G), mu, r (M, N, G).

    Returns ``level`` (L,), ``interval`` (L, G) — fraction of spots with y inside the
    inclusive quantile interval [q_lo, q_hi] of :func:`export.runtime.moments.predictive_interval`
    — and ``pit`` (L, G) — :func:`pit_coverage`.

    The interval coverage is read off the PIT instead of bisecting quantiles per level:
    with q_lo the smallest k with F(k) ≥ a and q_hi the smallest with F(k) ≥ b,
    y ≥ q_lo ⇔ F(y) ≥ a and y ≤ q_hi ⇔ F(y − 1) < b (F monotone), so two CDF evaluations
    serve every level; tests check it against ``predictive_interval``.
    """
    lvl = np.asarray(levels, np.float64).ravel()
    if lvl.size == 0:
        raise ValueError("no levels given")
    lo, hi = nb_mixture_pit(y, mu, r)
    inside, pit = [], []
    for level in lvl:
        a, b = _central(float(level))
        inside.append(((hi >= a) & (lo < b)).mean(0))
        pit.append(pit_coverage_from_pit(lo, hi, float(level)))
    return {"level": lvl, "interval": np.asarray(inside), "pit": np.asarray(pit)}


def sparsification_error(err, unc, *, n_bins: int = 20) -> dict[str, np.ndarray]:
    """Sparsification curves and AUSE per gene: err, unc (N, G) → ause (G,).

    Spots are sorted by ``unc`` (descending; ties keep spot order) and the most uncertain
    fraction f = i / n_bins, i = 0 … n_bins − 1, is removed (⌊i·N / n_bins⌋ spots); the
    curve is the mean ``err`` of the rest, divided by the mean over all spots (f = 0) so
    genes are comparable. The oracle curve sorts by ``err`` itself. AUSE is the
    trapezoid area of (curve_unc − curve_oracle) over f ∈ [0, 1 − 1/n_bins]: 0 when the
    uncertainty ranks errors perfectly, ~0.5 for useless uncertainty on heavy-tailed
    errors. NaN for a gene whose ``unc`` is constant (nothing to rank) or whose mean
    error is 0.

    Returns ``ause`` (G,), ``fractions`` (n_bins,), ``curve_unc`` and ``curve_oracle``
    (n_bins, G).
    """
    err = np.asarray(err, np.float64)
    unc = np.asarray(unc, np.float64)
    if err.shape != unc.shape or err.ndim != 2:
        raise ValueError(f"err {err.shape} and unc {unc.shape} must both be (spots, genes)")
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    if not (np.isfinite(err).all() and np.isfinite(unc).all()):
        raise ValueError("errors and uncertainties must be finite")
    n = err.shape[0]
    if n == 0:
        raise ValueError("no spots")
    removed = (np.arange(n_bins) * n) // n_bins          # spots removed at each fraction
    fractions = np.arange(n_bins) / n_bins

    def curve(key: np.ndarray) -> np.ndarray:
        order = np.argsort(-key, axis=0, kind="stable")
        cs = np.concatenate([np.zeros((1, err.shape[1])), np.cumsum(np.take_along_axis(err, order, 0), 0)])
        return (cs[-1][None] - cs[removed]) / (n - removed)[:, None]

    c_unc, c_orc = curve(unc), curve(err)
    base = c_unc[0]                                       # mean error over all spots
    with np.errstate(invalid="ignore", divide="ignore"):
        c_unc, c_orc = c_unc / base, c_orc / base
    diff = c_unc - c_orc
    ause = ((diff[1:] + diff[:-1]) / 2 * np.diff(fractions)[:, None]).sum(0)
    bad = (base <= 0) | (unc.max(0) == unc.min(0))
    ause = np.where(bad, np.nan, ause)
    return {"ause": ause, "fractions": fractions, "curve_unc": c_unc, "curve_oracle": c_orc}
