"""SmoothGrad saliency (Smilkov et al. 2017) of a gene's predicted mean w.r.t. the tile.

The gradient of the ensemble's mean NB mean for one gene with respect to the input pixels
(float 0..255, the scale the backbones read), averaged over ``n_samples`` noisy copies
of the tile (Gaussian noise, ``noise`` × the tile's dynamic range): averaging removes the
high-frequency gradient noise of ReLU networks. The map is the absolute averaged gradient
summed over colour channels.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.errors import StimageError
from export.runtime.lime import gene_forward_fn  # forward-only, JAX-free (moved; this path still works)

__all__ = ["smoothgrad", "gene_mean_fn", "gene_forward_fn"]


def _gene_index(model, gene: str) -> int:
    if gene not in model.genes:
        raise StimageError(f"gene {gene!r} is not predicted by this model")
    if getattr(model, "embedding_sources", lambda: [])():
        raise StimageError("explanations need a model that reads tiles; this one reads precomputed embeddings")
    return model.genes.index(gene)


def gene_mean_fn(model, gene: str) -> Callable:
    """tiles float (B, H, W, 3) → (B,) the ensemble's mean NB mean of ``gene`` (for a
    classification model: its probability of high expression). Differentiable (JAX
    models: the model's own :func:`~stimage_jax.ensemble.model.forward`), traced op by
    op unless the caller jits it; an ONNX model gives its forward pass only."""
    from stimage_jax.classify import ClassifierModel
    from stimage_jax.ensemble.model import EnsembleModel, forward

    g = _gene_index(model, gene)
    if isinstance(model, ClassifierModel):
        ref = model.ref
        mean, scale = jnp.asarray(ref.mean), jnp.asarray(ref.scale)
        w, b = jnp.asarray(ref.coef[g]), float(ref.intercept[g])
        return lambda tiles: jax.nn.sigmoid(((model.backbone(tiles) - mean) / scale) @ w + b)
    if not isinstance(model, EnsembleModel):  # onnxruntime: forward passes only
        return gene_forward_fn(model, gene)
    sources = tuple(model.member_sources)
    return lambda tiles: forward(model.backbones, model.members, sources, model.point, tiles, model.tta)[0][:, :, g].mean(0)


def smoothgrad(fn: Callable, tile: np.ndarray, *, key: jax.Array, n_samples: int = 25,
               noise: float = 0.15) -> np.ndarray:
    """tile (H, W, 3) uint8/float → (H, W) float32 saliency.

    fn: tiles float (B, H, W, 3) → (B,) scalar outputs (independent per tile, so the
    gradient of their sum is each tile's own gradient). key: PRNG key for the noise.
    """
    x = jnp.asarray(tile, jnp.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise StimageError(f"tile must be (H, W, 3), got {tuple(x.shape)}")
    sigma = noise * (float(x.max()) - float(x.min()) or 255.0)
    eps = sigma * jax.random.normal(key, (n_samples, *x.shape), jnp.float32)
    grads = jax.jit(jax.grad(lambda b: jnp.sum(fn(b))))(x[None] + eps)
    return np.asarray(jnp.abs(grads.mean(0)).sum(-1), np.float32)
