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

Determinism matches ``fit_member``: member ``m`` sees the order
``permutation(fold_in(keys[m], epoch))`` and its own dropout stream, so ``vmap`` and
``loop`` agree, and a killed ``vmap`` run resumes bit-identically from its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from data_pipelines.errors import StimageError
from stimage_jax.ensemble.train import LOSSES, TrainConfig, _padded_batches, _pure

__all__ = ["STRATEGIES", "resolve_strategy", "create_members", "stack_members", "unstack_members",
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


def fit_ensemble(members: nnx.Module, x_train, y_train, x_val=None, y_val=None, *, keys: jax.Array,
                 config: TrainConfig = TrainConfig(), strategy: str = "vmap",
                 ckpt_dir: str | Path | None = None, set_train_mode: Callable | None = None,
                 progress: bool = True, on_epoch: Callable | None = None,
                 mesh: Mesh | None | str = "auto", augment=None):
    """Train stacked ``members`` (leading axis M) in place → ``(members, histories)``.

    keys: (M,) typed PRNG keys, one per member (data order). Everything else as
    :func:`fit_member`, which this equals member by member. ``strategy``: ``vmap`` steps
    all members in one program; ``loop`` steps them one after another through the same
    jitted one-member step (compiled once); resolve ``auto`` first with
    :func:`resolve_strategy`. ``mesh`` (vmap only): "auto" shards over all devices when
    there are several; None keeps one device. Checkpoints (``ckpt_dir/stacked``) are the
    same for both strategies. ``augment``: an
    :class:`~data_pipelines.augmentation.AugmentConfig` applied to every training batch of
    uint8 tiles (fine-tuning), with a key per member, epoch and batch; never to validation.
    histories: one list of {"epoch", "train_loss", "val_loss"} per member.
    """
    if strategy not in ("vmap", "loop"):
        raise StimageError(f"strategy must be 'vmap' or 'loop' here, got {strategy!r}")
    if config.loss not in LOSSES:
        raise StimageError(f"unknown loss {config.loss!r}; choose from {sorted(LOSSES)}")
    n_mem = int(keys.shape[0])
    groups = [(0, n_mem)] if strategy == "vmap" else [(m, m + 1) for m in range(n_mem)]
    if strategy == "loop" or mesh == "auto" and n_mem == 1:
        mesh = None
    return _fit_groups(members, x_train, y_train, x_val, y_val, keys=keys, config=config, groups=groups,
                       ckpt_dir=ckpt_dir, set_train_mode=set_train_mode, progress=progress,
                       on_epoch=on_epoch, mesh=mesh, desc=f"{n_mem} members ({strategy})", augment=augment)


def _where(mask, new, old):
    """Per-member select: mask (M,) bool broadcast over each leaf's trailing axes."""
    def f(a, b):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            da, db = jax.random.key_data(a), jax.random.key_data(b)
            sel = jnp.where(mask.reshape((-1,) + (1,) * (da.ndim - 1)), da, db)
            return jax.random.wrap_key_data(sel, impl=jax.random.key_impl(a))
        return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(f, new, old)


def _concat(trees):
    """Groups of members (each with a leading member axis) → one tree over all members."""
    if len(trees) == 1:
        return trees[0]

    def f(*xs):
        if jax.dtypes.issubdtype(xs[0].dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jnp.concatenate([jax.random.key_data(x) for x in xs]),
                                            impl=jax.random.key_impl(xs[0]))
        return jnp.concatenate(xs)
    return jax.tree.map(f, *trees)


def _split(tree, groups):
    """Inverse of :func:`_concat`: one tree per (start, stop) group of members."""
    if len(groups) == 1:
        return [tree]
    return [jax.tree.map(lambda a: a[g0:g1], tree) for g0, g1 in groups]


def _fit_groups(model, x_train, y_train, x_val, y_val, *, keys, config, groups, ckpt_dir, set_train_mode,
                progress, on_epoch, mesh, desc, augment=None):
    """The training loop of both strategies: members in ``groups``, each group stepped by
    one vmapped jitted step (one group of M = ``vmap``; M groups of 1 = ``loop``, where the
    step compiles once and vmap over a length-1 axis costs nothing)."""
    n_mem = int(keys.shape[0])
    loss_fn = LOSSES[config.loss]
    tx = optax.adam(config.lr)
    (set_train_mode or (lambda mdl: mdl.train()))(model)
    g_train, p_tmpl, r_tmpl = nnx.split(model, nnx.Param, ...)
    model.eval()
    g_eval = nnx.split(model, nnx.Param, ...)[0]
    # Inside jax transforms the state travels as plain nested dicts of arrays: nnx
    # Variables carry the trace they were made in and refuse mutation (dropout streams)
    # from another one.
    params, rest = nnx.to_pure_dict(p_tmpl), nnx.to_pure_dict(r_tmpl)

    def merge(graphdef, pp, rr):
        ps, rs = jax.tree.map(lambda v: v, p_tmpl), jax.tree.map(lambda v: v, r_tmpl)
        nnx.replace_by_pure_dict(ps, pp)
        nnx.replace_by_pure_dict(rs, rr)
        return nnx.merge(graphdef, ps, rs)

    opt_state = jax.vmap(tx.init)(params)
    best = jax.tree.map(jnp.copy, params)
    has_val = x_val is not None and len(y_val) > 0
    n = len(y_train)

    if mesh == "auto":
        mesh = member_mesh(n_mem, config.batch_size)
    if mesh is not None:
        def put(tree, spec):
            return jax.device_put(tree, NamedSharding(mesh, spec))
        shard_members = lambda t: jax.tree.map(  # noqa: E731
            lambda a: put(a, P("member") if a.ndim and a.shape[0] == n_mem else P()), t)
        params, rest, opt_state, best = (shard_members(t) for t in (params, rest, opt_state, best))
    else:
        def put(tree, spec):
            return tree

    def step_one(p, r, o, x, y, w):
        def f(p_, r_):
            mdl = merge(g_train, p_, r_)
            loss = loss_fn(mdl, x, y, w)
            return loss, nnx.to_pure_dict(nnx.split(mdl, nnx.Param, ...)[2])
        (loss, r_new), grads = jax.value_and_grad(f, has_aux=True)(p, r)
        updates, o_new = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), r_new, o_new, loss

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(p, r, o, x, y, w, active):
        p_new, r_new, o_new, loss = jax.vmap(step_one)(p, r, o, x, y, w)
        # Members that have stopped early keep their state (as if they had left the loop).
        return _where(active, p_new, p), _where(active, r_new, r), _where(active, o_new, o), loss

    @jax.jit
    def val_step(p, r, x, y, w):
        return jax.vmap(lambda p_, r_: loss_fn(merge(g_eval, p_, r_), x, y, w) * jnp.sum(w))(p, r)

    keep_best = jax.jit(_where)

    meta = {"epoch": 0, "best_val": np.full(n_mem, np.inf), "bad": np.zeros(n_mem, np.int64),
            "done": np.zeros(n_mem, bool)}
    histories: list[list[dict]] = [[] for _ in range(n_mem)]
    mngr = None
    if ckpt_dir is not None:
        mngr = ocp.CheckpointManager(Path(ckpt_dir).absolute() / "stacked",
                                     options=ocp.CheckpointManagerOptions(max_to_keep=1))
        last = mngr.latest_step()
        if last is not None:
            target = {"params": _pure(params), "rest": _pure(rest), "opt": _pure(opt_state),
                      "best": _pure(best), "meta": {k: np.asarray(v) for k, v in meta.items() if k != "epoch"},
                      "history": np.zeros((n_mem, last, 4))}
            try:
                got = mngr.restore(last, args=ocp.args.StandardRestore(target))
            except Exception as e:  # orbax raises many types for truncated files
                raise StimageError(f"checkpoint {ckpt_dir} step {last} is unreadable "
                                   f"({type(e).__name__}); delete it to retrain") from None
            like = lambda new, old: jax.tree.map(  # noqa: E731
                lambda a, b: jax.device_put(jnp.asarray(a), b.sharding) if hasattr(b, "sharding") else a, new, old)
            params, rest, opt_state, best = (like(got[k], v) for k, v in
                                             (("params", params), ("rest", rest), ("opt", opt_state), ("best", best)))
            meta = {"epoch": last, **{k: np.asarray(v) for k, v in got["meta"].items()}}
            meta["done"] = meta["done"].astype(bool)
            for m in range(n_mem):
                histories[m] = [{"epoch": int(e), "train_loss": float(t), "val_loss": float(v)}
                                for e, t, v, ok in np.asarray(got["history"][m]) if ok]
    # From here on the state is a list of groups; concatenated again to save and to finish.
    params, rest, opt_state, best = (_split(t, groups) for t in (params, rest, opt_state, best))

    def save():
        if mngr is None or mngr.latest_step() == meta["epoch"]:
            return
        hist = np.zeros((n_mem, meta["epoch"], 4))
        for m, h in enumerate(histories):
            for i, rec in enumerate(h):
                hist[m, i] = (rec["epoch"], rec["train_loss"], rec["val_loss"], 1.0)
        mngr.save(meta["epoch"], force=True, args=ocp.args.StandardSave({
            "params": _pure(_concat(params)), "rest": _pure(_concat(rest)), "opt": _pure(_concat(opt_state)),
            "best": _pure(_concat(best)), "meta": {k: np.asarray(v) for k, v in meta.items() if k != "epoch"},
            "history": hist}))
        mngr.wait_until_finished()

    bar = tqdm(total=config.max_epochs, initial=meta["epoch"], desc=desc, disable=not progress, leave=False)
    batch_spec, val_spec = P("member", "batch"), P("batch")
    while not meta["done"].all() and meta["epoch"] < config.max_epochs:
        epoch = meta["epoch"]
        active = ~meta["done"]
        orders = [np.asarray(jax.random.permutation(jax.random.fold_in(keys[m], epoch), n)) for m in range(n_mem)]
        gens = [_padded_batches(x_train, y_train, o, config.batch_size) for o in orders]
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
                xb = put(jnp.stack([q[0] for q in parts[g0:g1]]), batch_spec)
                yb = put(jnp.stack([q[1] for q in parts[g0:g1]]), batch_spec)
                wb = put(jnp.stack([q[2] for q in parts[g0:g1]]), batch_spec)
                params[gi], rest[gi], opt_state[gi], loss = step(params[gi], rest[gi], opt_state[gi], xb, yb, wb,
                                                                 active_j[gi])
                tot[g0:g1] += np.asarray(loss, np.float64) * np.asarray(parts[0][2]).sum()
        train_loss = tot / n
        val = np.full(n_mem, math.nan)
        if has_val:
            acc = np.zeros(n_mem)
            for xb, yb, wb in _padded_batches(x_val, y_val, np.arange(len(y_val)), config.eval_batch_size):
                xb, yb, wb = put(xb, val_spec), put(yb, val_spec), put(wb, val_spec)
                for gi in live:
                    g0, g1 = groups[gi]
                    acc[g0:g1] += np.asarray(val_step(params[gi], rest[gi], xb, yb, wb), np.float64)
            val = acc / len(y_val)
            improved = active & (val < meta["best_val"])
            meta["best_val"] = np.where(improved, val, meta["best_val"])
            meta["bad"] = np.where(improved, 0, meta["bad"] + active)
            meta["done"] = meta["done"] | (active & (meta["bad"] >= config.patience))
            for gi in live:
                g0, g1 = groups[gi]
                best[gi] = keep_best(put(jnp.asarray(improved[g0:g1]), P("member")), params[gi], best[gi])
        meta["epoch"] = epoch + 1
        for m in np.flatnonzero(active):
            histories[m].append({"epoch": epoch, "train_loss": float(train_loss[m]), "val_loss": float(val[m])})
        bar.update(1)
        bar.set_postfix(active=int((~meta["done"]).sum()), train=f"{np.mean(train_loss[active]):.4f}")
        if meta["done"].all() or meta["epoch"] % config.checkpoint_every == 0:
            save()
        # After the checkpoint, as fit_member does: an interrupt in a callback loses no epoch.
        if on_epoch is not None:
            for m in np.flatnonzero(active):
                on_epoch(int(m), epoch, histories[m][-1])
    bar.close()
    save()
    if mngr is not None:
        mngr.close()
    final = _concat(best if has_val else params)
    nnx.update(model, nnx.state(merge(g_eval, final, _concat(rest))))
    model.eval()
    return model, histories
