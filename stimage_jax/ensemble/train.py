"""What an ensemble member is trained on and with: settings, losses, batches.

The training loop itself is :func:`stimage_jax.ensemble.stacked.fit_ensemble` (any number
of members, ``vmap`` or loop), which steps a :class:`~stimage_jax.training.TrainState`
through the shared jitted steps of :mod:`stimage_jax.training.loop`. It only sees arrays
``x`` (features, or uint8 tiles when fine-tuning; possibly a memmap) and counts ``y``.

Determinism: member ``m``'s data order in epoch ``e`` is ``permutation(fold_in(keys[m], e))``
and its dropout keys live in the train state, so a run killed after epoch ``e`` and resumed
from its checkpoint continues bit-identically to one never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stimage_jax.nb.distribution import nb_nll

__all__ = ["TrainConfig", "LOSSES", "SpotLoss", "adam", "padded_batches"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (Python config; stored in the model's ``model.json``)."""

    lr: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 10
    loss: str = "nb"                  # "nb" (raw counts) or "mse_log1p" (comparison only)
    checkpoint_every: int = 10        # epochs between resumable checkpoints
    eval_batch_size: int = 256


def _nb_loss(model, x, y, w):
    log_mu, log_r = model(x)
    return nb_nll(y, log_mu, log_r, mask=w[:, None])


def _mse_log1p_loss(model, x, y, w):
    # Point regression of log1p counts (ST-Net style); only log_mu is used, as log1p mean.
    pred, _ = model(x)
    err = jnp.square(pred - jnp.log1p(y)) * w[:, None]
    return jnp.sum(err) / jnp.maximum(jnp.sum(w) * y.shape[1], 1.0)


LOSSES: dict[str, Callable] = {"nb": _nb_loss, "mse_log1p": _mse_log1p_loss}


@dataclasses.dataclass(frozen=True)
class SpotLoss:
    """A train state's loss on a batch ``(x, y, w)`` of spots (``w``: 1 for a real row, 0
    for padding) → ``(mean loss over real rows, {"loss_sum": that mean × real rows})``.

    Frozen (hashable by value): part of the jitted steps' static state.
    """

    name: str = "nb"

    def __call__(self, model, batch):
        x, y, w = batch
        loss = LOSSES[self.name](model, x, y, w)
        return loss, {"loss_sum": loss * jnp.sum(w)}


@functools.lru_cache(maxsize=16)
def adam(lr: float) -> optax.GradientTransformation:
    """``optax.adam(lr)``, one object per rate: the optimiser is static in the train state,
    and an equal object lets every run with this rate reuse the compiled steps."""
    return optax.adam(lr)


def padded_batches(x, y, idx: np.ndarray, batch: int) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """Rows ``idx`` of ``(x, y)`` in fixed-size batches ``(x, y, w)`` (the last one padded
    with copies of its first row, weight 0), so each step compiles once."""
    for s in range(0, len(idx), batch):
        b = np.sort(idx[s:s + batch])  # sorted reads are sequential on a memmap
        n = len(b)
        xb, yb = np.asarray(x[b]), np.asarray(y[b], np.float32)
        if n < batch:
            pad = batch - n
            xb = np.concatenate([xb, np.repeat(xb[:1], pad, 0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], pad, 0)])
        w = np.zeros(batch, np.float32)
        w[:n] = 1.0
        yield jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(w)
