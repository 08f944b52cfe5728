"""The training and evaluation steps: module-level jitted functions of a :class:`TrainState`.

``train_step(state, batch)`` takes one optimiser step on one model; ``members_train_step``
is the same step vmapped over stacked members (each with its own batch, one program for
all), where members that have stopped keep their state; ``eval_step``/``members_eval_step``
evaluate (members share the batch). The loss, graph definitions and optimiser are static
parts of the state, so every run of one architecture and optimiser reuses one compiled
program — nothing is rebuilt per call. Both the ensemble (``stimage_jax.ensemble.stacked``)
and the cell network (``stimage_jax.cells.train``) train through these.
"""

from __future__ import annotations

from functools import partial

import jax
import optax
from flax import nnx

from stimage_jax.training.state import TrainState, select_members

__all__ = ["train_step", "eval_step", "members_train_step", "members_eval_step", "keep_best"]


def _train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    def loss_of(params, rest):
        model = nnx.merge(state.graphdef, params, rest)
        loss, metrics = state.loss_fn(model, batch)
        # Variables the forward pass changed (dropout RNG counts, BatchNorm statistics).
        return loss, (metrics, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2]))

    (loss, (metrics, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params, state.rest)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state), {"loss": loss, **metrics}


def _eval_step(state: TrainState, batch) -> dict:
    loss, metrics = state.loss_fn(nnx.merge(state.eval_graphdef, state.params, state.rest), batch)
    return {"loss": loss, **metrics}


@partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    """One optimiser step: ``(state, batch) → (new state, metrics)``; ``state`` is donated."""
    return _train_step(state, batch)


@jax.jit
def eval_step(state: TrainState, batch) -> dict:
    """The loss and metrics of ``batch`` with the model in evaluation mode."""
    return _eval_step(state, batch)


@partial(jax.jit, donate_argnums=0)
def members_train_step(state: TrainState, batch, active: jax.Array) -> tuple[TrainState, dict]:
    """:func:`train_step` vmapped over stacked members: ``batch`` leaves and ``active`` (M,)
    bool carry the member axis; a member that is not active keeps its state (as if it had
    left the loop). Metrics have a leading member axis."""
    new, metrics = jax.vmap(_train_step)(state, batch)
    return select_members(active, new, state), metrics


@jax.jit
def members_eval_step(state: TrainState, batch) -> dict:
    """:func:`eval_step` for every stacked member on one shared batch → metrics of shape (M,)."""
    return jax.vmap(_eval_step, in_axes=(0, None))(state, batch)


@jax.jit
def keep_best(improved: jax.Array, params, best):
    """Per member, ``params`` where ``improved`` (M,) else ``best``."""
    return select_members(improved, params, best)
