"""Train every member of an ensemble in one call: stacked members, ``vmap`` or loop.

Members are one module whose parameters carry a leading member axis (created with
``nnx.vmap`` over split keys, or stacked from pretrained copies when fine-tuning). Two
strategies train them, with identical results up to float rounding:

- ``vmap``: one jitted step updates all members at once; each member has its own data
  order and early-stopping state. On several devices the member axis (and the batch) is
  sharded over a ``Mesh``. The natural choice on GPU/TPU.
- ``loop``: the same jitted step, for one member at a time (compiled once, not once per
  member). On CPU ``vmap`` over convolutions turns them into grouped convolutions, which
  XLA:CPU runs several times slower than a loop (measured; see
  experiments/benchmarks/ensemble.py), so ``auto`` loops there when a backbone is being
  trained.

Both run the shared steps of :mod:`stimage_jax.training.loop` on one
:class:`~stimage_jax.training.TrainState` whose arrays carry the member axis:
``members_train_step`` on all members (``vmap``) or on a one-member slice (``loop``).
Member ``m`` sees the order ``permutation(fold_in(keys[m], epoch))`` and its own dropout
stream, so ``vmap`` and ``loop`` agree, a one-member ensemble is the single model, and a
killed run resumes bit-identically from its checkpoint (``ckpt_dir/stacked``, the same for
both strategies; :class:`~stimage_jax.training.Checkpointer`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from data_pipelines.errors import StimageError
from stimage_jax import distributed
from stimage_jax.ensemble.train import LOSSES, SpotLoss, TrainConfig, adam, padded_batches
from stimage_jax.training import (CheckpointMeta, Checkpointer, TrainState, concat_members, keep_best,
                                  members_eval_step, members_train_step, split_members)

__all__ = ["STRATEGIES", "resolve_strategy", "create_members", "stack_members", "unstack_members",
           "update_early_stopping", "record_epoch",
           "member_mesh", "fit_ensemble"]

STRATEGIES = ("auto", "loop", "vmap")
AUGMENT_STREAM = 0xA06  # folded into a member's key for its augmentation draws


def resolve_strategy(strategy: str, *, trains_backbone: bool, backend: str | None = None) -> str:
    """``auto`` → ``loop`` when training convolutions on CPU, else ``vmap``.

    Heads on cached features are small matrix products, which ``vmap`` batches well on
    any backend; convolutions under ``vmap`` become grouped convolutions, slow on XLA:CPU.
    """
    if strategy not in STRATEGIES:
        raise StimageError(f"unknown ensemble strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return strategy
    if jax.process_count() > 1:  # several processes: members (and batches) spread over all of them
        return "vmap"
    backend = backend or jax.default_backend()
    return "loop" if (backend == "cpu" and trains_backbone) else "vmap"


def create_members(make: Callable[[nnx.Rngs], nnx.Module], keys: jax.Array) -> nnx.Module:
    """One module with a leading member axis: ``make(nnx.Rngs(k))`` for each key in ``keys`` (M,).

    ``nnx.vmap`` draws each member's initialisation from its own key, exactly as
    ``make(nnx.Rngs(keys[m]))`` would one at a time.
    """
    return nnx.vmap(lambda k: make(nnx.Rngs(k)), in_axes=0, out_axes=0)(keys)


def stack_members(modules: Sequence[nnx.Module]) -> nnx.Module:
    """Modules of one architecture → one module whose arrays have a leading member axis."""
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


def unstack_members(stacked: nnx.Module) -> list[nnx.Module]:
    """Inverse of :func:`stack_members`: a list of independent modules."""
    graphdef, state = nnx.split(stacked)
    m = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(m)]


def member_mesh(n_members: int, batch_size: int, devices=None) -> Mesh | None:
    """A ("member", "batch") mesh over the devices, or None on one device.

    Members go to as many devices as divide their number; remaining devices split the
    batch when it divides evenly. Devices that fit neither are left idle.
    """
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < 2:
        return None
    m_dev = math.gcd(n_members, len(devices))
    b_dev = len(devices) // m_dev
    while b_dev > 1 and batch_size % b_dev:
        b_dev -= 1
    if m_dev * b_dev < 2:
        return None
    return Mesh(np.asarray(devices[:m_dev * b_dev]).reshape(m_dev, b_dev), ("member", "batch"))


def update_early_stopping(stop: dict, val: np.ndarray, active: np.ndarray, patience: int) -> np.ndarray:
    """One epoch's validation losses ``val`` (M,) into the per-member early-stopping state
    ``stop`` (``best_val``, ``bad_epochs``, ``done``; updated in place) for the ``active``
    members; returns which of them improved (their best parameters are to be kept)."""
    improved = active & (val < stop["best_val"])
    stop["best_val"] = np.where(improved, val, stop["best_val"])
    stop["bad_epochs"] = np.where(improved, 0, stop["bad_epochs"] + active)
    stop["done"] = stop["done"] | (active & (stop["bad_epochs"] >= patience))
    return improved


def record_epoch(histories: list[list[dict]], active: np.ndarray, epoch: int, train_loss: np.ndarray,
                 val: np.ndarray) -> None:
    """Append epoch ``epoch``'s losses to each active member's history."""
    for m in np.flatnonzero(active):
        histories[m].append({"epoch": epoch, "train_loss": float(train_loss[m]), "val_loss": float(val[m])})


def fit_ensemble(members: nnx.Module, x_train, y_train, x_val=None, y_val=None, *, keys: jax.Array,
                 config: TrainConfig = TrainConfig(), strategy: str = "vmap",
                 ckpt_dir: str | Path | None = None, set_train_mode: Callable | None = None,
                 progress: bool = True, on_epoch: Callable | None = None,
                 mesh: Mesh | None | str = "auto", augment=None):
    """Train stacked ``members`` (leading axis M) in place → ``(members, histories)``.

    x_*: (N, ...) features or tiles; y_*: (N, G) counts. keys: (M,) typed PRNG keys, one
    per member (data order). Without validation data every member trains for
    ``max_epochs``; with it, a member stops after ``patience`` epochs without a better
    validation loss and its best parameters are restored. ``set_train_mode(members)``
    chooses train/eval per submodule (fine-tuning keeps BatchNorm statistics frozen).
    ``strategy``: ``vmap`` steps all members in one program; ``loop`` steps them one after
    another through the same jitted step (compiled once); resolve ``auto`` first with
    :func:`resolve_strategy`. ``mesh`` (vmap only): "auto" shards over all devices when
    there are several; None keeps one device. ``ckpt_dir``: resumable checkpoints in
    ``ckpt_dir/stacked`` every ``checkpoint_every`` epochs and at the end, the same for
    both strategies. ``augment``: an :class:`~data_pipelines.augmentation.AugmentConfig`
    applied to every training batch of uint8 tiles (fine-tuning), with a key per member,
    epoch and batch; never to validation. ``on_epoch(member, epoch, record)`` runs after
    each epoch's checkpoint (tests use it to interrupt).
    histories: one list of {"epoch", "train_loss", "val_loss"} per member.
    """
    if strategy not in ("vmap", "loop"):
        raise StimageError(f"strategy must be 'vmap' or 'loop' here, got {strategy!r}")
    if config.loss not in LOSSES:
        raise StimageError(f"unknown loss {config.loss!r}; choose from {sorted(LOSSES)}")
    n_mem = int(keys.shape[0])
    # One group of M members (vmap) or M groups of one (loop: the step compiles once, and
    # vmap over a length-1 axis costs nothing).
    groups = [(0, n_mem)] if strategy == "vmap" else [(m, m + 1) for m in range(n_mem)]
    multi = distributed.is_multiprocess()
    if multi and (strategy == "loop" or mesh is None):
        raise StimageError("with several processes members train as one sharded program: use --strategy vmap "
                           "(the default there)")
    if strategy == "loop" or mesh == "auto" and n_mem == 1 and not multi:
        mesh = None
    if mesh == "auto":
        mesh = member_mesh(n_mem, config.batch_size)
        if mesh is None and multi:  # every array must span all processes (Orbax saves only global arrays)
            raise StimageError(f"--batch-size {config.batch_size} does not split over the {jax.device_count()} "
                               f"devices of all processes left after {n_mem} member(s); choose a multiple")
    state = TrainState.create(members, adam(float(config.lr)), SpotLoss(config.loss),
                              set_train_mode=set_train_mode, n_members=n_mem)
    best = jax.tree.map(jnp.copy, state.params)
    has_val = x_val is not None and len(y_val) > 0
    n = len(y_train)

    if mesh is not None:
        def put(tree, spec):  # host-identical values → global arrays (the mesh may span processes)
            return distributed.put(tree, NamedSharding(mesh, spec))
        shard_members = lambda t: jax.tree.map(  # noqa: E731
            lambda a: put(a, P("member") if a.ndim and a.shape[0] == n_mem else P()), t)
        state, best = shard_members(state), shard_members(best)
    else:
        def put(tree, spec):
            return tree

    epoch = 0
    stop = {"best_val": np.full(n_mem, np.inf), "bad_epochs": np.zeros(n_mem, np.int64),
            "done": np.zeros(n_mem, bool)}
    histories: list[list[dict]] = [[] for _ in range(n_mem)]
    with contextlib.ExitStack() as stack:  # closes the checkpointer and the progress bar
        ckpt = None
        if ckpt_dir is not None:
            ckpt = stack.enter_context(Checkpointer(Path(ckpt_dir) / "stacked", unit="epoch"))
        if ckpt is not None and (got := ckpt.restore({"state": state.arrays(), "best": best})) is not None:
            arrays, meta = got
            state, best, epoch = state.with_arrays(arrays["state"]), arrays["best"], meta.step
            stop = {k: np.asarray(meta.early_stopping[k], v.dtype) for k, v in stop.items()}
            histories = [list(h) for h in meta.histories]
        # From here on the state is a list of groups; concatenated again to save and to finish.
        states, bests = split_members(state, groups), split_members(best, groups)

        def save():
            if ckpt is None or ckpt.latest_step() == epoch:
                return
            ckpt.save(epoch, {"state": concat_members(states).arrays(), "best": concat_members(bests)},
                      CheckpointMeta(step=epoch, unit="epoch", histories=histories,
                                     early_stopping={k: v.tolist() for k, v in stop.items()}))

        bar = stack.enter_context(tqdm(total=config.max_epochs, initial=epoch, desc=f"{n_mem} members ({strategy})",
                                       disable=not progress, leave=False))
        batch_spec, val_spec = P("member", "batch"), P("batch")
        while not stop["done"].all() and epoch < config.max_epochs:
            active = ~stop["done"]
            orders = [np.asarray(jax.random.permutation(jax.random.fold_in(keys[m], epoch), n))
                      for m in range(n_mem)]
            gens = [padded_batches(x_train, y_train, o, config.batch_size) for o in orders]
            tot = np.zeros(n_mem)
            live = [gi for gi, (g0, g1) in enumerate(groups) if active[g0:g1].any()]
            active_j = {gi: put(jnp.asarray(active[g0:g1]), P("member")) for gi, (g0, g1) in enumerate(groups)}
            for bi, parts in enumerate(zip(*gens)):
                if augment is not None:
                    from data_pipelines.augmentation import augment as augment_tiles

                    # Each member augments its own batch with its own stream: (member, epoch, batch).
                    parts = [(np.asarray(augment_tiles(jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
                        keys[m], epoch), AUGMENT_STREAM), bi), q[0], augment)), q[1], q[2]) if active[m] else q
                        for m, q in enumerate(parts)]
                for gi in live:  # a stopped member's group is skipped (loop) or masked (vmap)
                    g0, g1 = groups[gi]
                    batch = tuple(put(jnp.stack([q[i] for q in parts[g0:g1]]), batch_spec) for i in range(3))
                    states[gi], metrics = members_train_step(states[gi], batch, active_j[gi])
                    # to_host: other processes' members' losses are gathered, never read directly
                    tot[g0:g1] += distributed.to_host(metrics["loss"]).astype(np.float64) * np.asarray(
                        parts[0][2]).sum()
            train_loss = tot / n
            val = np.full(n_mem, math.nan)
            if has_val:
                acc = np.zeros(n_mem)
                for xb, yb, wb in padded_batches(x_val, y_val, np.arange(len(y_val)), config.eval_batch_size):
                    batch = (put(xb, val_spec), put(yb, val_spec), put(wb, val_spec))
                    for gi in live:
                        g0, g1 = groups[gi]
                        acc[g0:g1] += distributed.to_host(members_eval_step(states[gi], batch)["loss_sum"]
                                                          ).astype(np.float64)
                val = acc / len(y_val)
                improved = update_early_stopping(stop, val, active, config.patience)
                for gi in live:
                    g0, g1 = groups[gi]
                    bests[gi] = keep_best(put(jnp.asarray(improved[g0:g1]), P("member")), states[gi].params,
                                          bests[gi])
            record_epoch(histories, active, epoch, train_loss, val)
            epoch += 1
            bar.update(1)
            bar.set_postfix(active=int((~stop["done"]).sum()), train=f"{np.mean(train_loss[active]):.4f}")
            if stop["done"].all() or epoch % config.checkpoint_every == 0:
                save()
            # After the checkpoint: an interrupt in a callback loses no epoch.
            if on_epoch is not None:
                for m in np.flatnonzero(active):
                    on_epoch(int(m), epoch - 1, histories[m][-1])
        save()
    final, state = concat_members(bests if has_val else [s.params for s in states]), concat_members(states)
    if distributed.is_multiprocess():  # every process gets the whole trained ensemble as local arrays
        final, state = distributed.tree_to_host(final), state.with_arrays(distributed.tree_to_host(state.arrays()))
    nnx.update(members, nnx.state(state.module(params=final)))
    members.eval()
    return members, histories
