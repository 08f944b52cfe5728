"""The NB regression head: backbone features → per-gene NB parameters."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Buffer", "NBHead", "init_head_from_data"]


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

    feats: (N, D) float; counts: (N, G) raw counts. Features constant in training get an
    infinite scale, i.e. weight zero. Dispersion by the method of moments,
    ``r = mean**2 / (var - mean)``, clipped to [0.01, 100] (Poisson-like genes get 100).
    """
    feats = np.asarray(feats, np.float64)
    counts = np.asarray(counts, np.float64)
    std = feats.std(0)
    # A feature (almost) constant over the training tiles — e.g. a ReLU channel that never
    # fires — carries nothing the head could learn, but dividing by its ~0 std would blow
    # any non-zero value on a new slide up by 1e6 and saturate the mean. Ignore it instead.
    alive = std > 1e-3 * (np.median(std[std > 0]) if np.any(std > 0) else 1.0)
    # Broadcasting also fills stacked heads (a leading member axis) with the same values.
    def fill(var, v):
        var[...] = jnp.broadcast_to(jnp.asarray(v, jnp.float32), var.shape)

    fill(head.feat_mean, feats.mean(0))
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
