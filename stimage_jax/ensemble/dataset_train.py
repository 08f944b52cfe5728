"""Fine-tuning from an exported TFDS/ArrayRecord dataset (``stimage train --dataset DIR --fine-tune``).

The tiles stay on disk and stream through grain (:func:`data_pipelines.grain_source.epoch_loader`):
one loader per member over the training samples' records, member ``m``'s order in epoch ``e``
being ``permutation(fold_in(key_m, e))`` as for in-memory tiles, cut into the same padded
batches in the pipeline and prefetched by reader threads while the train step runs — so a
model trained from the dataset equals one trained from the same spots' h5ad files.
:func:`fit_streamed` is :func:`~stimage_jax.ensemble.stacked.fit_ensemble`'s loop (same steps,
early stopping, best parameters, augmentation keys) with one addition: it checkpoints every
``checkpoint_steps`` optimiser steps as well as at epoch ends, with each member's grain
iterator state in the checkpoint's metadata, so a killed run resumes mid-epoch and reads
exactly the rest of that epoch. Memory holds the prefetch buffers (plus every spot's counts).
Genes, tile geometry and stain come from the dataset; whole samples validate
(``--val-samples``, default the last). Several JAX processes train through ``fit_ensemble``
on a lazy :class:`DatasetTiles` view (epoch-level resume) — see the module notes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS
from tqdm.auto import tqdm

from data_pipelines.errors import StimageError
from data_pipelines.grain_source import ParseSpots, SpotRecords, epoch_loader
from data_pipelines.io import atomic_path
from data_pipelines.stain_normalisation import Reference
from data_pipelines.tfds_dataset import dataset_metadata
from stimage_jax import distributed
from stimage_jax.config import RunConfig
from stimage_jax.ensemble.model import EnsembleModel
from stimage_jax.ensemble.stacked import (
    AUGMENT_STREAM,
    member_mesh,
    record_epoch,
    resolve_strategy,
    unstack_members,
    update_early_stopping,
)
from stimage_jax.ensemble.train import LOSSES, SpotLoss, TrainConfig, adam
from stimage_jax.features.extract import extract_features, weights_fingerprint
from stimage_jax.features.registry import create_backbone
from stimage_jax.training import (
    Checkpointer,
    CheckpointMeta,
    TrainState,
    concat_members,
    keep_best,
    members_eval_step,
    members_train_step,
    split_members,
)

__all__ = ["DatasetTiles", "MemberOrder", "StreamOptions", "fit_streamed", "train_from_dataset"]

STREAM_CHECKPOINTS = "streamed"  # ckpt_dir/<this>: counted in optimiser steps (fit_ensemble's are epochs)


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """How :func:`fit_streamed` reads and checkpoints — not what it trains, so not part of the
    run's request (changing them never blocks a resume).

    checkpoint_steps: optimiser steps (batches) between mid-epoch checkpoints, 0 = epoch
    ends only. read_threads / worker_count: grain prefetch in threads of this process
    (None: grain_source.DEFAULT_READ_THREADS) or in worker processes (slower here: each
    loader starts its processes, which import JAX). prefetch: records read ahead per member.
    """

    checkpoint_steps: int = 200
    read_threads: int | None = None
    worker_count: int = 0
    prefetch: int | None = None


class MemberOrder:
    """Member ``key``'s order of epoch ``e`` over ``n`` spots, ``permutation(fold_in(key, e), n)``
    — the order :func:`~stimage_jax.ensemble.stacked.fit_ensemble` draws for in-RAM tiles — as
    the picklable order function of :class:`data_pipelines.grain_source.EpochSampler` (its
    ``repr``, the key's data, ties a saved iterator state to it)."""

    def __init__(self, key: jax.Array):
        self.key_data = np.asarray(jax.random.key_data(key), np.uint32)

    def __call__(self, epoch: int, n: int) -> np.ndarray:
        key = jax.random.fold_in(jax.random.wrap_key_data(self.key_data), epoch)
        return np.asarray(jax.random.permutation(key, n))

    def __repr__(self) -> str:
        return f"MemberOrder({self.key_data.tolist()})"


class DatasetTiles:
    """Lazy uint8 tiles of records ``index`` of an exported dataset: ``len``, ``shape`` and
    ``view[i]`` for an int array or slice (→ (k, px, px, 3)); reads only what is indexed."""

    def __init__(self, directory, index: np.ndarray, tile_px: int):
        self.records = SpotRecords(directory)
        self.parse = ParseSpots(directory, ("tile",), self.records.num_records)
        self.index, self.tile_px = np.asarray(index, np.int64), int(tile_px)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        return (len(self.index), self.tile_px, self.tile_px, 3)

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    def _tile(self, k: int) -> np.ndarray:
        return self.parse.map(self.records[int(k)])["tile"]

    def __getitem__(self, i) -> np.ndarray:
        idx = self.index[i] if isinstance(i, slice) else self.index[np.asarray(i)]
        if idx.ndim == 0:
            return self._tile(int(idx))
        if not len(idx):
            return np.zeros((0, self.tile_px, self.tile_px, 3), np.uint8)
        return np.stack([self._tile(j) for j in idx])


def fit_streamed(members: nnx.Module, directory: str | os.PathLike, train_records: Sequence[int],
                 val_records: Sequence[int] | None = None, *, keys: jax.Array, config: TrainConfig | None = None,
                 strategy: str = "vmap", ckpt_dir: str | Path | None = None, set_train_mode: Callable | None = None,
                 progress: bool = True, augment=None, options: StreamOptions | None = None,
                 on_step: Callable | None = None, on_batch: Callable | None = None,
                 on_epoch: Callable | None = None):
    """Train stacked ``members`` (leading axis M) on the dataset's records in place → ``(members, histories)``.

    As :func:`~stimage_jax.ensemble.stacked.fit_ensemble` for ``x, y`` = the tiles and counts of
    ``train_records`` / ``val_records`` (one process), reading them through grain. Checkpoints
    (``ckpt_dir/streamed``, counted in optimiser steps) every ``options.checkpoint_steps`` steps
    and every ``checkpoint_every`` epochs and at the end, each with the members' iterator states.
    ``on_step(step)`` runs after each step's checkpoint, ``on_batch(member, epoch, records)``
    with the record keys each member trains on, ``on_epoch(member, epoch, record)`` after each
    epoch (tests use them to interrupt and to watch the data).
    """
    config = config or TrainConfig()
    if strategy not in ("vmap", "loop"):
        raise StimageError(f"strategy must be 'vmap' or 'loop' here, got {strategy!r}")
    if config.loss not in LOSSES:
        raise StimageError(f"unknown loss {config.loss!r}; choose from {sorted(LOSSES)}")
    if distributed.is_multiprocess():
        raise StimageError("streamed fine-tuning runs in one process (several processes: fit_ensemble)")
    opt = options or StreamOptions()
    n_mem, bs = int(keys.shape[0]), int(config.batch_size)
    groups = [(0, n_mem)] if strategy == "vmap" else [(m, m + 1) for m in range(n_mem)]
    mesh = member_mesh(n_mem, bs) if strategy == "vmap" and n_mem > 1 else None
    state = TrainState.create(members, adam(float(config.lr)), SpotLoss(config.loss),
                              set_train_mode=set_train_mode, n_members=n_mem)
    best = jax.tree.map(jnp.copy, state.params)
    train_records = np.asarray(train_records, np.int64)
    val_records = None if val_records is None else np.asarray(val_records, np.int64)
    has_val = val_records is not None and len(val_records) > 0
    n = len(train_records)
    per_epoch = -(-n // bs)

    if mesh is not None:
        def put(tree, spec):
            return jax.device_put(tree, NamedSharding(mesh, spec))
        shard_members = lambda t: jax.tree.map(
            lambda a: put(a, PS("member") if a.ndim and a.shape[0] == n_mem else PS()), t)
        state, best = shard_members(state), shard_members(best)
    else:
        def put(tree, spec):
            return tree

    epoch, batch_i = 0, 0
    tot = np.zeros(n_mem)
    stop = {"best_val": np.full(n_mem, np.inf), "bad_epochs": np.zeros(n_mem, np.int64),
            "done": np.zeros(n_mem, bool)}
    histories: list[list[dict]] = [[] for _ in range(n_mem)]
    iter_states = None
    loaders = [epoch_loader(directory, train_records, batch_size=bs, num_epochs=config.max_epochs,
                            order=MemberOrder(keys[m]),
                            fields=("tile", "counts"), worker_count=opt.worker_count, read_threads=opt.read_threads,
                            prefetch=opt.prefetch) for m in range(n_mem)]
    with contextlib.ExitStack() as stack:
        ckpt = None
        if ckpt_dir is not None:
            ckpt = stack.enter_context(Checkpointer(Path(ckpt_dir) / STREAM_CHECKPOINTS, unit="step"))
        if ckpt is not None and (got := ckpt.restore({"state": state.arrays(), "best": best})) is not None:
            arrays, meta = got
            state, best = state.with_arrays(arrays["state"]), arrays["best"]
            stop = {k: np.asarray(meta.early_stopping[k], v.dtype) for k, v in stop.items()}
            histories = [list(h) for h in meta.histories]
            ds = meta.data_state
            epoch, batch_i, tot = int(ds["epoch"]), int(ds["batch"]), np.asarray(ds["loss_sum"], np.float64)
            iter_states = ds["iterators"]
        its = [iter(ld) for ld in loaders]
        if iter_states is not None:
            for it, st in zip(its, iter_states):
                try:
                    it.set_state(json.dumps(st).encode())
                except ValueError as e:  # grain: another sampler/source than the checkpoint's
                    raise StimageError(f"checkpoint {ckpt.directory} was written for other data "
                                       f"({str(e).splitlines()[0]}); delete it to retrain") from None
        states, bests = split_members(state, groups), split_members(best, groups)

        def save():
            step = epoch * per_epoch + batch_i
            if ckpt is None or ckpt.latest_step() == step:
                return
            data_state = {"epoch": epoch, "batch": batch_i, "loss_sum": tot.tolist(), "batches_per_epoch": per_epoch,
                          "iterators": [json.loads(it.get_state()) for it in its]}
            ckpt.save(step, {"state": concat_members(states).arrays(), "best": concat_members(bests)},
                      CheckpointMeta(step=step, unit="step", histories=histories, data_state=data_state,
                                     early_stopping={k: v.tolist() for k, v in stop.items()}))

        bar = stack.enter_context(tqdm(total=config.max_epochs * per_epoch, initial=epoch * per_epoch + batch_i,
                                       desc=f"{n_mem} members ({strategy}, streamed)", disable=not progress,
                                       leave=False))
        batch_spec, val_spec = PS("member", "batch"), PS("batch")
        while not stop["done"].all() and epoch < config.max_epochs:
            active = ~stop["done"]
            live = [gi for gi, (g0, g1) in enumerate(groups) if active[g0:g1].any()]
            active_j = {gi: put(jnp.asarray(active[g0:g1]), PS("member")) for gi, (g0, g1) in enumerate(groups)}
            while batch_i < per_epoch:
                parts: list = [None] * n_mem
                for m in np.flatnonzero(active):
                    b = next(its[m])
                    if on_batch is not None:
                        on_batch(int(m), epoch, b["record"][b["weight"] > 0])
                    tiles = b["tile"]
                    if augment is not None:
                        from data_pipelines.augmentation import augment as augment_tiles

                        # as fit_ensemble: each member's own stream, keyed (member, epoch, batch)
                        tiles = np.asarray(augment_tiles(jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
                            keys[m], epoch), AUGMENT_STREAM), batch_i), tiles, augment))
                    parts[m] = (tiles, b["counts"], b["weight"])
                filler = next(p for p in parts if p is not None)
                parts = [filler if p is None else p for p in parts]  # stopped members: masked out (vmap)
                for gi in live:
                    g0, g1 = groups[gi]
                    batch = tuple(put(jnp.stack([q[i] for q in parts[g0:g1]]), batch_spec) for i in range(3))
                    states[gi], metrics = members_train_step(states[gi], batch, active_j[gi])
                    tot[g0:g1] += np.asarray(metrics["loss"]).astype(np.float64) * np.asarray(filler[2]).sum()
                batch_i += 1
                bar.update(1)
                step = epoch * per_epoch + batch_i
                if opt.checkpoint_steps and step % opt.checkpoint_steps == 0:
                    save()
                if on_step is not None:  # after the checkpoint: an interrupt here loses nothing saved
                    on_step(step)
            train_loss = tot / n
            val = np.full(n_mem, math.nan)
            if has_val:
                acc = np.zeros(n_mem)
                for b in epoch_loader(directory, val_records, batch_size=config.eval_batch_size, num_epochs=1,
                                      shuffle=False, fields=("tile", "counts"), read_threads=opt.read_threads,
                                      prefetch=opt.prefetch):
                    batch = (put(b["tile"], val_spec), put(b["counts"], val_spec), put(b["weight"], val_spec))
                    for gi in live:
                        g0, g1 = groups[gi]
                        acc[g0:g1] += np.asarray(members_eval_step(states[gi], batch)["loss_sum"]).astype(np.float64)
                val = acc / len(val_records)
                improved = update_early_stopping(stop, val, active, config.patience)
                for gi in live:
                    g0, g1 = groups[gi]
                    bests[gi] = keep_best(put(jnp.asarray(improved[g0:g1]), PS("member")), states[gi].params,
                                          bests[gi])
            record_epoch(histories, active, epoch, train_loss, val)
            epoch, batch_i, tot = epoch + 1, 0, np.zeros(n_mem)
            bar.set_postfix(active=int((~stop["done"]).sum()), train=f"{np.mean(train_loss[active]):.4f}")
            if stop["done"].all() or epoch % config.checkpoint_every == 0:
                save()
            if on_epoch is not None:
                for m in np.flatnonzero(active):
                    on_epoch(int(m), epoch - 1, histories[m][-1])
        save()
    final, state = concat_members(bests if has_val else [s.params for s in states]), concat_members(states)
    nnx.update(members, nnx.state(state.module(params=final)))
    members.eval()
    return members, histories


def train_from_dataset(directory: str | os.PathLike, workdir: str | os.PathLike, cfg: RunConfig, *,
                       progress: bool = True, overwrite: bool = False, options: StreamOptions | None = None,
                       **hooks) -> EnsembleModel:
    """:func:`stimage_jax.pipeline.train` for ``cfg.dataset``: same workdir layout, resume and model.

    ``options``: :class:`StreamOptions`; ``hooks``: ``on_step``/``on_batch``/``on_epoch`` of
    :func:`fit_streamed` (tests)."""
    from stimage_jax import pipeline as P

    f = cfg.features
    meta = dataset_metadata(directory)
    sources = P._parse_sources(None if f.backbone is None else list(f.backbone), None,
                               None if f.weights is None else list(f.weights))
    if len(sources) != 1:
        raise StimageError("--dataset fine-tunes one backbone: give exactly one --backbone")
    src = sources[0]
    src["weights_fingerprint"] = weights_fingerprint(src.get("weights"))
    ranges = {s: tuple(r) for s, r in meta["samples"].items()}
    samples = list(ranges)
    val = list(cfg.val_samples) if cfg.val_samples is not None else (samples[-1:] if len(samples) >= 2 else [])
    unknown = [v for v in val if v not in samples]
    if unknown:
        raise StimageError(f"validation sample(s) {unknown} not among the dataset's samples {samples}")
    if val and all(s in val for s in samples):
        raise StimageError("every sample is a validation sample: nothing left to train on")
    px = int(meta["tile_px"])
    records = SpotRecords(directory)
    parse = ParseSpots(directory, ("counts",), records.num_records)
    counts_all = np.stack([parse.map(records[i])["counts"] for i in range(records.num_records)]).astype(np.float32) \
        if records.num_records else np.zeros((0, len(meta["genes"])), np.float32)
    counts = [counts_all[lo:hi] for lo, hi in ranges.values()]

    def tiles_for(is_val: bool):
        names = [s for s in samples if (s in val) == is_val]
        if not names:
            return None
        return DatasetTiles(directory, np.concatenate([np.arange(*ranges[s]) for s in names]), px)

    stain = None if meta.get("stain_reference") is None else Reference.from_dict(meta["stain_reference"])
    geometry = {"tile_um": float(meta["tile_um"]), "tile_px": px}
    # content key: the records' digest (a moved dataset still resumes; a rewritten one does not)
    run = P._Run(cfg, [], samples, val, list(meta["genes"]), sources, geometry, {}, {s: 0 for s in samples}, stain,
                 {s: f"{meta['digest']}:{s}" for s in samples}, counts=counts, tiles_for=tiles_for)
    request = P._request(run)
    request["config"].pop("dataset", None)
    workdir = Path(workdir).absolute()
    with P._primary_claim(workdir, request, overwrite, lambda: EnsembleModel.load(workdir / "model")) as done:
        if done is not None:
            return done
        bb = create_backbone(src["backbone"], rngs=nnx.Rngs(cfg.seed), weights=src["weights"])
        # the head starts from the frozen backbone's features of every spot, per sample (as the h5ad path)
        feats = {src["name"]: [extract_features(bb, DatasetTiles(directory, np.arange(*ranges[s]), px),
                                                batch_size=f.feature_batch_size, progress=progress,
                                                desc=f"features {s}") for s in samples]}
        src["num_features"] = int(bb.num_features)
        strategy = resolve_strategy(cfg.strategy, trains_backbone=True)
        mcfg = P._model_config(run, strategy)
        mcfg["dataset"] = {"digest": meta["digest"], "format": meta["format"]}
        if distributed.is_multiprocess():  # the batch spans processes: fit_ensemble on the lazy view
            trained, logs, best_epochs = P._fit_sources(run, mcfg, {src["name"]: bb}, feats, workdir,
                                                        workdir / "cache", progress)
        else:
            trained, logs, best_epochs = _fit_streamed_source(directory, run, mcfg, src, {src["name"]: bb}, feats, workdir,
                                                              progress, options, hooks)
        mcfg["best_epochs"] = best_epochs
        mcfg["trained_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        model = EnsembleModel(mcfg, {}, trained)
        if distributed.is_primary():
            with atomic_path(workdir / "train_log.csv") as tmp:
                pd.DataFrame(logs).to_csv(tmp, index=False)
            model.save(workdir / "model")
        distributed.barrier("stimage-model-saved")
    return model


def _fit_streamed_source(directory, run, mcfg: dict, src: dict, backbones, feats, workdir: Path, progress: bool,
                         options: StreamOptions | None, hooks: dict):
    """``pipeline._fit_sources`` for the one backbone of a dataset run, through :func:`fit_streamed`."""
    from stimage_jax import pipeline as P

    c = run.cfg
    y_tr, y_va = P._pick(run.counts, run.is_val, False), P._pick(run.counts, run.is_val, True)
    stacked, x_tr, _, x_va, mode, ids, train_keys = P._members_for(run, mcfg, src, 0, backbones, feats, y_tr,
                                                                   workdir / "cache", progress,
                                                                   jax.random.key(c.seed))
    stacked, hists = fit_streamed(stacked, directory, x_tr.index, None if x_va is None else x_va.index,
                                  keys=train_keys, config=c.train, strategy=mcfg["strategy"],
                                  ckpt_dir=workdir / "checkpoints" / src["name"], set_train_mode=mode,
                                  progress=progress, augment=P.augment_config(c.features.augment),
                                  options=options, **hooks)
    logs, best_epochs = [], []
    for i, hist in zip(ids, hists):
        logs += [{"member": i, "source": src["name"], **h} for h in hist]
        val = [h["val_loss"] for h in hist]
        best_epochs.append(int(np.nanargmin(val)) if y_va is not None and len(val) else len(hist) - 1)
    return unstack_members(stacked), logs, best_epochs
