"""Train one ensemble member: Adam, NB NLL, early stopping on validation, resumable.

The same loop trains a head on cached features (frozen backbone, the paper's default)
or a backbone+head end to end on tiles (``--fine-tune``): it only sees arrays ``x``
(features or uint8 tiles, possibly a memmap) and counts ``y``.

Determinism: the data order of epoch ``e`` is ``permutation(fold_in(key, e))`` and
dropout keys live in the model state, so a run killed after epoch ``e`` and resumed from
its checkpoint continues bit-identically to one never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from data_pipelines.errors import StimageError
from stimage_jax.nb.distribution import nb_nll

__all__ = ["TrainConfig", "fit_member", "LOSSES"]


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


@nnx.jit(static_argnames="loss_name")
def _train_step(model, optimizer, x, y, w, loss_name: str):
    loss, grads = nnx.value_and_grad(LOSSES[loss_name])(model, x, y, w)
    optimizer.update(model, grads)
    return loss


@nnx.jit(static_argnames="loss_name")
def _eval_step(model, x, y, w, loss_name: str):
    return LOSSES[loss_name](model, x, y, w) * jnp.sum(w)


def _padded_batches(x, y, idx: np.ndarray, batch: int):
    """Yield fixed-size batches (last one padded, weight 0) so each step compiles once."""
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


def evaluate_loss(model, x, y, config: TrainConfig) -> float:
    """Mean loss over all rows of (x, y) with the model in eval mode."""
    model.eval()
    total = 0.0
    for xb, yb, w in _padded_batches(x, y, np.arange(len(y)), config.eval_batch_size):
        total += float(_eval_step(model, xb, yb, w, config.loss))
    return total / max(len(y), 1)


def _pure(tree):
    return jax.tree.map(lambda a: np.asarray(a) if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a, tree)


def fit_member(model, x_train, y_train, x_val=None, y_val=None, *, key: jax.Array,
               config: TrainConfig = TrainConfig(), ckpt_dir: str | Path | None = None,
               set_train_mode: Callable | None = None, progress: bool = True,
               desc: str = "member", on_epoch: Callable | None = None):
    """Train ``model`` in place and return ``(model, history)``.

    x_*: (N, ...) features or tiles; y_*: (N, G) counts. Without validation data the model
    trains for ``max_epochs``; with it, training stops after ``patience`` epochs without a
    better validation loss and the best parameters are restored. ``set_train_mode(model)``
    chooses train/eval per submodule (fine-tuning keeps BatchNorm statistics frozen).
    ``on_epoch(epoch, record)`` is called after each epoch (tests use it to interrupt).
    history: list of {"epoch", "train_loss", "val_loss"}.
    """
    if config.loss not in LOSSES:
        raise StimageError(f"unknown loss {config.loss!r}; choose from {sorted(LOSSES)}")
    optimizer = nnx.Optimizer(model, optax.adam(config.lr), wrt=nnx.Param)
    has_val = x_val is not None and len(y_val) > 0
    best_params = nnx.state(model, nnx.Param)
    meta = {"epoch": 0, "best_val": math.inf, "bad_epochs": 0, "best_epoch": -1, "done": False}
    history: list[dict] = []

    mngr = None
    if ckpt_dir is not None:
        mngr = ocp.CheckpointManager(Path(ckpt_dir).absolute(),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=1))
        step = mngr.latest_step()
        if step is not None:
            target = {"model": nnx.to_pure_dict(nnx.state(model)),
                      "opt": nnx.to_pure_dict(nnx.state(optimizer)),
                      "best": nnx.to_pure_dict(best_params),
                      "meta": {k: np.asarray(v, np.float64) for k, v in meta.items()},
                      "history": np.zeros((step, 3))}
            try:
                got = mngr.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as e:  # orbax raises many types for truncated files
                raise StimageError(f"checkpoint {ckpt_dir} step {step} is unreadable "
                                   f"({type(e).__name__}); delete it to retrain") from None
            for part, obj in (("model", model), ("opt", optimizer)):
                st = nnx.state(obj)
                nnx.replace_by_pure_dict(st, got[part])
                nnx.update(obj, st)
            nnx.replace_by_pure_dict(best_params, got["best"])
            meta = {k: (bool(v) if k == "done" else (int(v) if k != "best_val" else float(v)))
                    for k, v in got["meta"].items()}
            history = [dict(zip(("epoch", "train_loss", "val_loss"), (int(r[0]), *map(float, r[1:]))))
                       for r in np.asarray(got["history"])]

    saved = {"step": meta["epoch"] if mngr is not None and mngr.latest_step() is not None else -1}

    def save():
        if mngr is None or saved["step"] == meta["epoch"]:
            return
        saved["step"] = meta["epoch"]
        hist = np.asarray([[h["epoch"], h["train_loss"], h["val_loss"]] for h in history], np.float64)
        mngr.save(meta["epoch"], force=True, args=ocp.args.StandardSave({
            "model": _pure(nnx.to_pure_dict(nnx.state(model))),
            "opt": _pure(nnx.to_pure_dict(nnx.state(optimizer))),
            "best": _pure(nnx.to_pure_dict(best_params)),
            "meta": {k: np.asarray(v, np.float64) for k, v in meta.items()},
            "history": hist.reshape(-1, 3)}))
        mngr.wait_until_finished()

    n = len(y_train)
    bar = tqdm(total=config.max_epochs, initial=meta["epoch"], desc=desc, disable=not progress,
               leave=False)
    while not meta["done"] and meta["epoch"] < config.max_epochs:
        epoch = meta["epoch"]
        (set_train_mode or (lambda m: m.train()))(model)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        tot = 0.0
        for xb, yb, w in _padded_batches(x_train, y_train, order, config.batch_size):
            tot += float(_train_step(model, optimizer, xb, yb, w, config.loss)) * float(w.sum())
        train_loss = tot / n
        val_loss = evaluate_loss(model, x_val, y_val, config) if has_val else math.nan
        meta["epoch"] = epoch + 1
        if has_val and val_loss < meta["best_val"]:
            meta.update(best_val=val_loss, bad_epochs=0, best_epoch=epoch)
            best_params = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
        elif has_val:
            meta["bad_epochs"] += 1
            meta["done"] = meta["bad_epochs"] >= config.patience
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
        history.append(record)
        bar.update(1)
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if meta["done"] or meta["epoch"] % config.checkpoint_every == 0:
            save()
        if on_epoch is not None:
            on_epoch(epoch, record)
    bar.close()
    meta["done"] = True
    save()
    if mngr is not None:
        mngr.close()
    if has_val:
        nnx.update(model, best_params)
    model.eval()
    return model, history
