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
import sys
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
           "member_mesh", "ArrayBatches", "fit_ensemble"]

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


class ArrayBatches:
    """:func:`fit_ensemble`'s training data from arrays (or lazy views) that every process
    holds whole: member ``m``'s epoch-``e`` order ``permutation(fold_in(keys[m], e), n)`` cut by
    :func:`~stimage_jax.ensemble.train.padded_batches`.

    The data interface of :func:`fit_ensemble` (also implemented by
    :class:`stimage_jax.ensemble.dataset_train.StreamBatches`, tiles streamed through grain):
    ``n``/``n_val`` records, ``per_epoch`` batches, ``unit``/``folder``/``checkpoint_steps``
    (how the loop's checkpoints count and how often mid-epoch ones are written),
    ``local_reads`` (whether a process can read only the batch rows its devices hold),
    ``row_specs`` (each row's ``(shape, dtype)`` of x, y, w when reads are local), ``label``
    (for the progress bar), ``open(rows, val_rows, state)``, ``train(epoch, start, active)`` → per batch a list over
    members of ``(x, y, w)`` (None: not read here), ``val()`` → ``(x, y, w)`` batches, and
    ``state()`` → where reading stands (JSON) for a mid-epoch checkpoint.
    """

    unit, folder, checkpoint_steps, local_reads, label = "epoch", "stacked", 0, False, ""

    def __init__(self, x, y, x_val, y_val, *, keys: jax.Array, batch_size: int, eval_batch_size: int):
        self.x, self.y, self.x_val, self.y_val, self.keys = x, y, x_val, y_val, keys
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.n = len(y)
        self.n_val = 0 if x_val is None or y_val is None else len(y_val)
        self.per_epoch = -(-self.n // self.batch_size)

    def open(self, rows=None, val_rows=None, state=None) -> None:
        """Every process holds every row: nothing to choose."""

    def train(self, epoch: int, start: int, active: np.ndarray):
        orders = [np.asarray(jax.random.permutation(jax.random.fold_in(k, epoch), self.n)) for k in self.keys]
        gens = [padded_batches(self.x, self.y, o, self.batch_size) for o in orders]
        for bi, parts in enumerate(zip(*gens)):
            if bi >= start:
                yield list(parts)

    def val(self):
        yield from padded_batches(self.x_val, self.y_val, np.arange(self.n_val), self.eval_batch_size)

    def state(self):
        return None


def fit_ensemble(members: nnx.Module, x_train=None, y_train=None, x_val=None, y_val=None, *, keys: jax.Array,
                 config: TrainConfig = TrainConfig(), strategy: str = "vmap",
                 ckpt_dir: str | Path | None = None, set_train_mode: Callable | None = None,
                 progress: bool = True, on_epoch: Callable | None = None,
                 mesh: Mesh | None | str = "auto", augment=None, data=None, on_step: Callable | None = None):
    """Train stacked ``members`` (leading axis M) in place → ``(members, histories)``.

    x_*: (N, ...) features or tiles; y_*: (N, G) counts; or ``data``, the same interface
    over other storage (:class:`ArrayBatches` documents it; tiles streamed from an exported
    dataset: :class:`~stimage_jax.ensemble.dataset_train.StreamBatches`). keys: (M,) typed
    PRNG keys, one per member (data order). Without validation data every member trains for
    ``max_epochs``; with it, a member stops after ``patience`` epochs without a better
    validation loss and its best parameters are restored. ``set_train_mode(members)``
    chooses train/eval per submodule (fine-tuning keeps BatchNorm statistics frozen).
    ``strategy``: ``vmap`` steps all members in one program; ``loop`` steps them one after
    another through the same jitted step (compiled once); resolve ``auto`` first with
    :func:`resolve_strategy`. ``mesh`` (vmap only): "auto" shards over all devices when
    there are several (with several processes, over every process's devices); None keeps
    one device. ``ckpt_dir``: resumable checkpoints in ``ckpt_dir/<data.folder>`` every
    ``checkpoint_every`` epochs, every ``data.checkpoint_steps`` steps when it is set, and at
    the end, the same for both strategies. ``augment``: an
    :class:`~data_pipelines.augmentation.AugmentConfig` applied to every training batch of
    uint8 tiles (fine-tuning), with a key per member, epoch and batch; never to validation.
    ``on_step(step)`` after each optimiser step's checkpoint, ``on_epoch(member, epoch,
    record)`` after each epoch's (tests use them to interrupt).
    histories: one list of {"epoch", "train_loss", "val_loss"} per member.
    """
    if strategy not in ("vmap", "loop"):
        raise StimageError(f"strategy must be 'vmap' or 'loop' here, got {strategy!r}")
    if config.loss not in LOSSES:
        raise StimageError(f"unknown loss {config.loss!r}; choose from {sorted(LOSSES)}")
    if data is None:
        data = ArrayBatches(x_train, y_train, x_val, y_val, keys=keys, batch_size=config.batch_size,
                            eval_batch_size=config.eval_batch_size)
    n_mem, bs = int(keys.shape[0]), int(config.batch_size)
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
        mesh = member_mesh(n_mem, bs)
        if mesh is None and multi:  # every array must span all processes (Orbax saves only global arrays)
            raise StimageError(f"--batch-size {bs} does not split over the {jax.device_count()} "
                               f"devices of all processes left after {n_mem} member(s); choose a multiple")
    state = TrainState.create(members, adam(float(config.lr)), SpotLoss(config.loss),
                              set_train_mode=set_train_mode, n_members=n_mem)
    best = jax.tree.map(jnp.copy, state.params)
    has_val = data.n_val > 0
    n, per_epoch = data.n, data.per_epoch
    batch_spec, val_spec = P("member", "batch"), P("batch")
    rows = val_rows = None  # None: this process reads whole batches
    if mesh is not None:
        def put(tree, spec):  # host-identical values → global arrays (the mesh may span processes)
            return distributed.put(tree, NamedSharding(mesh, spec))
        shard_members = lambda t: jax.tree.map(  # noqa: E731
            lambda a: put(a, P("member") if a.ndim and a.shape[0] == n_mem else P()), t)
        state, best = shard_members(state), shard_members(best)
        if data.local_reads and not NamedSharding(mesh, batch_spec).is_fully_addressable:
            # each process reads only the rows of each batch that its own devices hold
            rows = distributed.addressed_rows(NamedSharding(mesh, batch_spec), (n_mem, bs))
            val_rows = distributed.addressed_rows(NamedSharding(mesh, val_spec), (config.eval_batch_size,))[0]
            if progress:  # beside the progress bar: what this host reads
                tqdm.write(f"process {jax.process_index()} of {jax.process_count()} reads "
                           f"{sum(len(r) for r in rows)} of the {n_mem * bs} rows of each training step "
                           f"({len(val_rows)} of {config.eval_batch_size} in validation)", file=sys.stderr)
    else:
        def put(tree, spec):
            return tree

    epoch, batch_i, tot = 0, 0, np.zeros(n_mem)
    stop = {"best_val": np.full(n_mem, np.inf), "bad_epochs": np.zeros(n_mem, np.int64),
            "done": np.zeros(n_mem, bool)}
    histories: list[list[dict]] = [[] for _ in range(n_mem)]
    reader = None
    with contextlib.ExitStack() as stack:  # closes the checkpointer and the progress bar
        ckpt = None
        if ckpt_dir is not None:
            ckpt = stack.enter_context(Checkpointer(Path(ckpt_dir) / data.folder, unit=data.unit))
        if ckpt is not None and (got := ckpt.restore({"state": state.arrays(), "best": best})) is not None:
            arrays, meta = got
            state, best, epoch = state.with_arrays(arrays["state"]), arrays["best"], meta.step
            stop = {k: np.asarray(meta.early_stopping[k], v.dtype) for k, v in stop.items()}
            histories = [list(h) for h in meta.histories]
            if meta.data_state:  # a mid-epoch checkpoint: where in the epoch, and where each reader stands
                ds = meta.data_state
                epoch, batch_i, tot = int(ds["epoch"]), int(ds["batch"]), np.asarray(ds["loss_sum"], np.float64)
                reader = _reader_state(ds, ckpt.directory)
        data.open(rows, val_rows, reader)
        # From here on the state is a list of groups; concatenated again to save and to finish.
        states, bests = split_members(state, groups), split_members(best, groups)

        def save():
            step = epoch if data.unit == "epoch" else epoch * per_epoch + batch_i
            reading = data.state()
            if data.unit != "epoch":  # every process's reader state (each reads its own rows)
                reading = distributed.gather_json(reading)
            if ckpt is None or ckpt.latest_step() == step:
                return
            data_state = {} if data.unit == "epoch" else {
                "epoch": epoch, "batch": batch_i, "loss_sum": tot.tolist(), "batches_per_epoch": per_epoch,
                "processes": jax.process_count(), "readers": reading}
            ckpt.save(step, {"state": concat_members(states).arrays(), "best": concat_members(bests)},
                      CheckpointMeta(step=step, unit=data.unit, histories=histories, data_state=data_state,
                                     early_stopping={k: v.tolist() for k, v in stop.items()}))

        bar = stack.enter_context(tqdm(total=config.max_epochs * per_epoch, initial=epoch * per_epoch + batch_i,
                                       desc=f"{n_mem} members ({strategy}{data.label})",
                                       disable=not progress, leave=False))
        while not stop["done"].all() and epoch < config.max_epochs:
            active = ~stop["done"]
            live = [gi for gi, (g0, g1) in enumerate(groups) if active[g0:g1].any()]
            active_j = {gi: put(jnp.asarray(active[g0:g1]), P("member")) for gi, (g0, g1) in enumerate(groups)}
            for parts in data.train(epoch, batch_i, active):
                if augment is not None:
                    parts = [_augmented(q, keys[m], epoch, batch_i, augment, bs, None if rows is None else rows[m])
                             if q is not None and active[m] else q for m, q in enumerate(parts)]
                real = min(bs, n - batch_i * bs)  # records in this batch (the rest is weight-0 padding)
                for gi in live:  # a stopped member's group is skipped (loop) or masked (vmap)
                    g0, g1 = groups[gi]
                    if rows is None:
                        batch = tuple(put(jnp.stack([q[i] for q in _filled(parts[g0:g1])]), batch_spec)
                                      for i in range(3))
                    else:
                        batch = _assemble(parts[g0:g1], rows[g0:g1], bs, NamedSharding(mesh, batch_spec),
                                          data.row_specs)
                    states[gi], metrics = members_train_step(states[gi], batch, active_j[gi])
                    # to_host: other processes' members' losses are gathered, never read directly
                    tot[g0:g1] += distributed.to_host(metrics["loss"]).astype(np.float64) * real
                batch_i += 1
                bar.update(1)
                if data.checkpoint_steps and (epoch * per_epoch + batch_i) % data.checkpoint_steps == 0:
                    save()
                if on_step is not None:  # after the checkpoint: an interrupt here loses nothing saved
                    on_step(epoch * per_epoch + batch_i)
            train_loss = tot / n
            val = np.full(n_mem, math.nan)
            if has_val:
                acc = np.zeros(n_mem)
                for xb, yb, wb in data.val():
                    if val_rows is None:
                        batch = (put(xb, val_spec), put(yb, val_spec), put(wb, val_spec))
                    else:
                        batch = _assemble([(xb, yb, wb)], [val_rows], config.eval_batch_size,
                                          NamedSharding(mesh, val_spec), data.row_specs, lead=False)
                    for gi in live:
                        g0, g1 = groups[gi]
                        acc[g0:g1] += distributed.to_host(members_eval_step(states[gi], batch)["loss_sum"]
                                                          ).astype(np.float64)
                val = acc / data.n_val
                improved = update_early_stopping(stop, val, active, config.patience)
                for gi in live:
                    g0, g1 = groups[gi]
                    bests[gi] = keep_best(put(jnp.asarray(improved[g0:g1]), P("member")), states[gi].params,
                                          bests[gi])
            record_epoch(histories, active, epoch, train_loss, val)
            epoch, batch_i, tot = epoch + 1, 0, np.zeros(n_mem)
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


def _reader_state(ds: dict, where) -> object:
    """This process's reader state from a mid-epoch checkpoint's ``data_state``."""
    if "readers" not in ds:  # written by one process before readers were kept per process
        states, count = [ds.get("iterators")], 1
    else:
        states, count = ds["readers"], int(ds.get("processes", len(ds["readers"])))
    if count != jax.process_count() or len(states) != count:
        raise StimageError(f"checkpoint {where} was written by {count} process(es), this run has "
                           f"{jax.process_count()}: resume with {count} or delete it to retrain")
    return states[jax.process_index()]


def _augmented(part, key, epoch: int, batch: int, augment, batch_size: int, rows):
    """Member ``key``'s augmentation of one batch (its own stream: member, epoch, batch);
    ``rows``: which rows of the batch ``part`` holds (None: all), each augmented as in the
    whole batch."""
    from data_pipelines.augmentation import augment as augment_tiles, augment_rows

    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, epoch), AUGMENT_STREAM), batch)
    tiles = (augment_tiles(k, part[0], augment) if rows is None
             else augment_rows(k, part[0], rows, batch_size, augment))
    return (np.asarray(tiles), *part[1:])


def _filled(parts: list) -> list:
    """Stopped members read nothing: their slot takes another member's batch (masked out)."""
    filler = next(p for p in parts if p is not None)
    return [filler if p is None else p for p in parts]


def _assemble(parts: list, rows: list, batch_size: int, sharding, specs, lead: bool = True) -> tuple:
    """``(x, y, w)`` global arrays ``(G, B, ...)`` (``lead``) or ``(B, ...)`` from this process's
    rows ``rows[g]`` of each member's batch ``parts[g]`` (None — a stopped member — reads as
    zeros, masked out); ``specs``: each row's ``(shape, dtype)`` of x, y, w. Other processes
    fill the rows they hold."""
    out = []
    for i, (shape, dtype) in enumerate(specs):
        blocks = [p[i] if p is not None else np.zeros((len(r), *shape), dtype) for p, r in zip(parts, rows)]

        def fetch(idx, blocks=blocks):
            want = np.arange(batch_size)[idx[1] if lead else idx[0]]
            if not lead:
                return blocks[0][np.searchsorted(rows[0], want)]
            return np.stack([blocks[g][np.searchsorted(rows[g], want)] for g in range(len(rows))[idx[0]]])
        full = (len(rows), batch_size) if lead else (batch_size,)
        out.append(jax.make_array_from_callback((*full, *shape), sharding, fetch))
    return tuple(out)
