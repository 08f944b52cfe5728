"""The NB regression head: backbone features → per-gene NB parameters."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Buffer", "NBHead", "init_head_from_data", "init_head_from_moments", "feature_moments",
           "merge_moments"]


class Buffer(nnx.Variable):
    """Non-trainable state fitted from data (feature standardisation); the optimiser skips it."""


class NBHead(nnx.Module):
    """features (B, D) → (log_mu, log_r), each (B, G).

    Features are standardised with training-set statistics held in the module (so an
    exported graph carries them), then one linear map per output, optionally after a
    hidden ReLU layer. ``log_mu`` and ``log_r`` are the NB mean and dispersion on the log
    link (see :mod:`stimage_jax.nb.distribution`).
    """

    def __init__(self, in_features: int, n_genes: int, *, rngs: nnx.Rngs,
                 hidden: int = 0, dropout: float = 0.0):
        self.in_features, self.n_genes = in_features, n_genes
        self.feat_mean = Buffer(jnp.zeros((in_features,), jnp.float32))
        self.feat_scale = Buffer(jnp.ones((in_features,), jnp.float32))
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs) if hidden else None
        width = hidden or in_features
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        # Small initial weights: the biases (set from the data) carry each gene's marginal
        # NB fit, and image features start as a small perturbation of it.
        init = nnx.initializers.normal(stddev=0.01)
        self.mu_out = nnx.Linear(width, n_genes, kernel_init=init, rngs=rngs)
        self.r_out = nnx.Linear(width, n_genes, kernel_init=init, rngs=rngs)

    def __call__(self, feats):
        h = (feats - self.feat_mean[...]) / self.feat_scale[...]
        if self.hidden is not None:
            h = nnx.relu(self.hidden(h))
        h = self.dropout(h)
        return self.mu_out(h), self.r_out(h)


def init_head_from_data(head: NBHead, feats: np.ndarray, counts: np.ndarray, *, loss: str = "nb") -> NBHead:
    """Set standardisation from training features and biases from each gene's marginal NB.

    feats: (N, D) float; counts: (N, G) raw counts. See :func:`init_head_from_moments`.
    """
    feats = np.asarray(feats, np.float64)
    return init_head_from_moments(head, feats.mean(0), feats.std(0), counts, loss=loss)


def init_head_from_moments(head: NBHead, feat_mean: np.ndarray, feat_std: np.ndarray, counts: np.ndarray, *,
                           loss: str = "nb") -> NBHead:
    """:func:`init_head_from_data` from the training features' mean and (population) standard
    deviation (D,) — e.g. accumulated batch by batch over a dataset that does not fit in
    memory (:func:`feature_moments`, :func:`merge_moments`). counts: (N, G) raw counts.

    Features constant in training get an infinite scale, i.e. weight zero. Dispersion by the
    method of moments, ``r = mean**2 / (var - mean)``, clipped to [0.01, 100] (Poisson-like
    genes get 100).
    """
    std = np.asarray(feat_std, np.float64)
    counts = np.asarray(counts, np.float64)
    # A feature (almost) constant over the training tiles — e.g. a ReLU channel that never
    # fires — carries nothing the head could learn, but dividing by its ~0 std would blow
    # any non-zero value on a new slide up by 1e6 and saturate the mean. Ignore it instead.
    alive = std > 1e-3 * (np.median(std[std > 0]) if np.any(std > 0) else 1.0)
    # Broadcasting also fills stacked heads (a leading member axis) with the same values.
    def fill(var, v):
        var[...] = jnp.broadcast_to(jnp.asarray(v, jnp.float32), var.shape)

    fill(head.feat_mean, np.asarray(feat_mean, np.float64))
    fill(head.feat_scale, np.where(alive, std, np.inf))
    mean = counts.mean(0) + 1e-3
    excess = np.maximum(counts.var(0) - mean, 1e-6)
    r = np.clip(mean**2 / excess, 0.01, 100.0)
    # The mean output starts at each gene's marginal fit on the scale the loss reads: the
    # log mean for NB; the mean of log1p counts for the MSE head (log(mean) would start a
    # rare gene below 0, where the clamped prediction is constant and gets no ranking).
    fill(head.mu_out.bias, np.log1p(counts).mean(0) if loss == "mse_log1p" else np.log(mean))
    fill(head.r_out.bias, np.log(r))
    return head


def feature_moments(feats: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(N, D) features → ``(n, mean, m2)`` in float64, ``m2 = Σ (x − mean)²`` per column."""
    x = np.asarray(feats, np.float64)
    if not len(x):
        return 0, np.zeros(x.shape[1:]), np.zeros(x.shape[1:])
    mean = x.mean(0)
    return len(x), mean, ((x - mean) ** 2).sum(0)


def merge_moments(parts) -> tuple[int, np.ndarray, np.ndarray]:
    """Combine ``(n, mean, m2)`` of disjoint chunks (Chan, Golub & LeVeque's pairwise update):
    the moments of their union, as :func:`feature_moments` of the concatenation would give
    (to float64 rounding). Population std = ``sqrt(m2 / n)``."""
    n, mean, m2 = 0, None, None
    for k, mu, q in parts:
        if not k:
            continue
        mu, q = np.asarray(mu, np.float64), np.asarray(q, np.float64)
        if mean is None:
            n, mean, m2 = int(k), mu.copy(), q.copy()
            continue
        tot = n + int(k)
        delta = mu - mean
        mean = mean + delta * (k / tot)
        m2 = m2 + q + delta ** 2 * (n * k / tot)
        n = tot
    if mean is None:
        raise ValueError("no features to combine")
    return n, mean, m2
