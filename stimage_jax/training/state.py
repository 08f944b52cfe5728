"""The train state: one pytree of arrays (params, other variables, optimiser state, step) plus the
static parts that say how to use them (graph definitions, optimiser, loss).

As Flax's ImageNet example keeps a ``TrainState``, but for NNX modules: the module is split
once with :func:`flax.nnx.split` into its graph definitions (one in training mode, one in
evaluation mode — Dropout and BatchNorm flags live there) and plain nested dicts of arrays,
which travel through ``jax.jit``/``jax.vmap`` and checkpoints. An ensemble's state is the same
pytree with a leading member axis on every array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

__all__ = ["TrainState", "LossFn", "select_members", "concat_members", "split_members"]

# loss_fn(module, batch) -> (scalar loss, dict of scalar metrics); hashable (a frozen
# dataclass or a module-level function), since it is part of the jitted step's static state.
LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    """Arrays of one model (or of stacked members) under training.

    step: optimiser steps taken (int32; shape (M,) for stacked members).
    params / rest: the module's ``nnx.Param`` arrays and all its other variables (RNG
    streams, BatchNorm statistics, fitted buffers) as pure nested dicts.
    opt_state: the optimiser's state over ``params``.
    graphdef / eval_graphdef / tx / loss_fn: static (part of the pytree's structure, so
    equal values reuse one compiled step).
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    eval_graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    loss_fn: LossFn = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, loss_fn: LossFn, *,
               set_train_mode: Callable[[nnx.Module], Any] | None = None,
               n_members: int | None = None) -> TrainState:
        """Split ``model`` into a train state; ``model`` is left in evaluation mode.

        ``set_train_mode(model)`` chooses train/eval per submodule (default ``model.train()``).
        ``n_members``: the arrays carry a leading member axis of that length (stacked members);
        each member gets its own optimiser state and step counter.
        """
        (set_train_mode or (lambda m: m.train()))(model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        if n_members is None:
            opt_state, step = tx.init(params), jnp.zeros((), jnp.int32)
        else:
            opt_state, step = jax.vmap(tx.init)(params), jnp.zeros((n_members,), jnp.int32)
        return cls(step=step, params=params, rest=rest, opt_state=opt_state, graphdef=graphdef,
                   eval_graphdef=eval_graphdef, tx=tx, loss_fn=loss_fn)

    def module(self, *, train: bool = False, params=None) -> nnx.Module:
        """The module with these arrays (``params`` overrides, e.g. the best epoch's)."""
        return nnx.merge(self.graphdef if train else self.eval_graphdef,
                         self.params if params is None else params, self.rest)

    def arrays(self) -> dict:
        """The arrays of the state, as a checkpoint stores them."""
        return {"step": self.step, "params": self.params, "rest": self.rest, "opt_state": self.opt_state}

    def with_arrays(self, arrays: dict) -> TrainState:
        """This state with the arrays of :meth:`arrays` (e.g. restored from a checkpoint)."""
        return self.replace(**{k: arrays[k] for k in ("step", "params", "rest", "opt_state")})


def _is_key(a) -> bool:
    return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def select_members(mask: jax.Array, new, old):
    """Per-member select: ``mask`` (M,) bool, broadcast over each leaf's trailing axes."""
    def f(a, b):
        if _is_key(a):
            da, db = jax.random.key_data(a), jax.random.key_data(b)
            sel = jnp.where(mask.reshape((-1,) + (1,) * (da.ndim - 1)), da, db)
            return jax.random.wrap_key_data(sel, impl=jax.random.key_impl(a))
        return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(f, new, old)


def concat_members(trees: Sequence):
    """Groups of members (each with a leading member axis) → one tree over all members."""
    if len(trees) == 1:
        return trees[0]

    def f(*xs):
        if _is_key(xs[0]):
            return jax.random.wrap_key_data(jnp.concatenate([jax.random.key_data(x) for x in xs]),
                                            impl=jax.random.key_impl(xs[0]))
        return jnp.concatenate(xs)
    return jax.tree.map(f, *trees)


def split_members(tree, groups: Sequence[tuple[int, int]]) -> list:
    """Inverse of :func:`concat_members`: one tree per (start, stop) group of members."""
    if len(groups) == 1:
        return [tree]
    return [jax.tree.map(lambda a: a[g0:g1], tree) for g0, g1 in groups]
