"""Fine-tuning from an exported TFDS/ArrayRecord dataset (``stimage train --dataset DIR --fine-tune``).

The tiles stay on disk and stream through grain (:func:`data_pipelines.grain_source.epoch_loader`):
one loader per member over the training samples' records, member ``m``'s order in epoch ``e``
being ``permutation(fold_in(key_m, e))`` as for in-memory tiles, cut into the same padded
batches in the pipeline and prefetched by reader threads while the train step runs — so a
model trained from the dataset equals one trained from the same spots' h5ad files.
:func:`fit_streamed` is :func:`~stimage_jax.ensemble.stacked.fit_ensemble` itself (same steps,
early stopping, best parameters, augmentation keys) over :class:`StreamBatches`, which adds
checkpoints every ``checkpoint_steps`` optimiser steps as well as at epoch ends, with every
member's grain iterator state in the checkpoint's metadata, so a killed run resumes mid-epoch
and reads exactly the rest of that epoch. Several JAX processes (hosts) train one global
batch: each process's loaders read only the rows of each batch its own devices hold, and
the checkpoint keeps every process's reader states. Memory holds the prefetch buffers (plus
every spot's counts). Genes, tile geometry and stain come from the dataset; whole samples
validate (``--val-samples``, default the last).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from flax import nnx
from tqdm.auto import tqdm

from data_pipelines.errors import StimageError
from data_pipelines.grain_source import ParseSpots, SpotRecords, epoch_loader
from data_pipelines.io import atomic_path
from data_pipelines.stain_normalisation import Reference
from data_pipelines.tfds_dataset import dataset_metadata
from stimage_jax import distributed
from stimage_jax.config import RunConfig
from stimage_jax.ensemble.model import EnsembleModel
from stimage_jax.ensemble.stacked import fit_ensemble, resolve_strategy, unstack_members
from stimage_jax.ensemble.train import TrainConfig
from stimage_jax.features.extract import extract_features, weights_fingerprint
from stimage_jax.features.registry import create_backbone

__all__ = ["DatasetTiles", "MemberOrder", "StreamBatches", "StreamOptions", "fit_streamed", "train_from_dataset"]

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


class StreamBatches:
    """:func:`~stimage_jax.ensemble.stacked.fit_ensemble`'s data (see
    :class:`~stimage_jax.ensemble.stacked.ArrayBatches`) streamed from an exported dataset:
    one grain loader per member over ``train_records``, member ``m``'s epoch order
    :class:`MemberOrder` ``(keys[m])`` cut into the in-RAM loop's padded batches. With several
    processes each reads only the rows of each batch its devices hold (``open(rows, ...)``).
    Counted in optimiser steps, with a checkpoint every ``options.checkpoint_steps`` steps;
    ``state()`` is each member loader's grain iterator state.
    ``on_batch(member, epoch, records)``: the record keys a member trains on (tests).
    """

    unit, folder, local_reads, label = "step", STREAM_CHECKPOINTS, True, ", streamed"

    def __init__(self, directory, train_records, val_records, *, keys: jax.Array, batch_size: int,
                 eval_batch_size: int, num_epochs: int, options: StreamOptions | None = None,
                 on_batch: Callable | None = None):
        self.directory, self.keys, self.options = directory, keys, options or StreamOptions()
        self.records = np.asarray(train_records, np.int64)
        self.val_records = np.zeros(0, np.int64) if val_records is None else np.asarray(val_records, np.int64)
        self.batch_size, self.eval_batch_size, self.num_epochs = int(batch_size), int(eval_batch_size), int(num_epochs)
        self.n, self.n_val = len(self.records), len(self.val_records)
        self.per_epoch = -(-self.n // self.batch_size)
        self.checkpoint_steps = int(self.options.checkpoint_steps)
        self.on_batch = on_batch
        meta = dataset_metadata(directory)
        px = int(meta["tile_px"])
        self.row_specs = (((px, px, 3), np.dtype(np.uint8)), ((len(meta["genes"]),), np.dtype(np.float32)),
                          ((), np.dtype(np.float32)))
        self._its: list = []
        self._val_rows = None

    def open(self, rows=None, val_rows=None, state=None) -> None:
        """Start each member's loader (``rows[m]``: the batch rows read here, None: all; an
        empty array: none) and continue from ``state`` (a :meth:`state` of an earlier run)."""
        o, n_mem = self.options, int(self.keys.shape[0])
        rows = [None] * n_mem if rows is None else rows
        self._val_rows = val_rows
        self._its = [None if r is not None and not len(r) else iter(epoch_loader(
            self.directory, self.records, batch_size=self.batch_size, num_epochs=self.num_epochs,
            order=MemberOrder(self.keys[m]), fields=("tile", "counts"), worker_count=o.worker_count,
            read_threads=o.read_threads, prefetch=o.prefetch, rows=r)) for m, r in enumerate(rows)]
        if state is None:
            return
        if len(state) != n_mem:
            raise StimageError(f"the checkpoint holds {len(state)} readers for {n_mem} members; delete it to retrain")
        for it, st in zip(self._its, state):
            if (it is None) != (st is None):
                raise StimageError("the checkpoint's readers were spread over the devices differently; "
                                   "resume on the same devices or delete it to retrain")
            if it is None:
                continue
            try:
                it.set_state(json.dumps(st).encode())
            except ValueError as e:  # grain: another sampler/source than the checkpoint's
                raise StimageError(f"the checkpoint was written for other data ({str(e).splitlines()[0]}); "
                                   "delete it to retrain") from None

    def train(self, epoch: int, start: int, active: np.ndarray):
        for _ in range(start, self.per_epoch):
            parts: list = [None] * len(self._its)
            for m in np.flatnonzero(active):
                if self._its[m] is None:
                    continue
                b = next(self._its[m])
                if self.on_batch is not None:
                    self.on_batch(int(m), epoch, b["record"][b["weight"] > 0])
                parts[m] = (b["tile"], b["counts"], b["weight"])
            yield parts

    def val(self):
        o = self.options
        for b in epoch_loader(self.directory, self.val_records, batch_size=self.eval_batch_size, num_epochs=1,
                              shuffle=False, fields=("tile", "counts"), read_threads=o.read_threads,
                              prefetch=o.prefetch, rows=self._val_rows):
            yield b["tile"], b["counts"], b["weight"]

    def state(self) -> list:
        return [None if it is None else json.loads(it.get_state()) for it in self._its]


def fit_streamed(members: nnx.Module, directory: str | os.PathLike, train_records: Sequence[int],
                 val_records: Sequence[int] | None = None, *, keys: jax.Array, config: TrainConfig | None = None,
                 strategy: str = "vmap", ckpt_dir: str | Path | None = None, set_train_mode: Callable | None = None,
                 progress: bool = True, augment=None, options: StreamOptions | None = None,
                 on_step: Callable | None = None, on_batch: Callable | None = None,
                 on_epoch: Callable | None = None):
    """Train stacked ``members`` (leading axis M) on the dataset's records in place → ``(members, histories)``.

    :func:`~stimage_jax.ensemble.stacked.fit_ensemble` (the same loop) for ``x, y`` = the
    tiles and counts of ``train_records`` / ``val_records``, read through grain
    (:class:`StreamBatches`); with several processes each reads only its devices' rows.
    Checkpoints (``ckpt_dir/streamed``, counted in optimiser steps) every
    ``options.checkpoint_steps`` steps and every ``checkpoint_every`` epochs and at the end,
    each with every process's reader states. ``on_step(step)`` runs after each step's
    checkpoint, ``on_batch(member, epoch, records)`` with the record keys each member trains
    on, ``on_epoch(member, epoch, record)`` after each epoch (tests use them to interrupt and
    to watch the data).
    """
    config = config or TrainConfig()
    data = StreamBatches(directory, train_records, val_records, keys=keys, batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size, num_epochs=config.max_epochs, options=options,
                         on_batch=on_batch)
    return fit_ensemble(members, keys=keys, config=config, strategy=strategy, ckpt_dir=ckpt_dir,
                        set_train_mode=set_train_mode, progress=progress, on_epoch=on_epoch, augment=augment,
                        data=data, on_step=on_step)


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
        # the head starts from the frozen backbone's features of the training spots (as the h5ad
        # path), reduced to their mean and std chunk by chunk, each process its share
        train_records = np.concatenate([np.arange(*ranges[s]) for s in samples if s not in val])
        run.feature_stats = training_feature_stats(bb, directory, train_records, px,
                                                   batch_size=f.feature_batch_size, progress=progress)
        feats = {src["name"]: None}
        src["num_features"] = int(bb.num_features)
        strategy = resolve_strategy(cfg.strategy, trains_backbone=True)
        mcfg = P._model_config(run, strategy)
        mcfg["dataset"] = {"digest": meta["digest"], "format": meta["format"]}
        trained, logs, best_epochs = _fit_streamed_source(directory, run, mcfg, src, {src["name"]: bb}, feats,
                                                          workdir, progress, options, hooks)
        mcfg["best_epochs"] = best_epochs
        mcfg["trained_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        model = EnsembleModel(mcfg, {}, trained)
        if distributed.is_primary():
            with atomic_path(workdir / "train_log.csv") as tmp:
                pd.DataFrame(logs).to_csv(tmp, index=False)
            model.save(workdir / "model")
        distributed.barrier("stimage-model-saved")
    return model


def training_feature_stats(backbone, directory, records: np.ndarray, tile_px: int, *, batch_size: int,
                           progress: bool = True, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The frozen ``backbone``'s features of dataset ``records`` → their (mean, population std)
    (D,) in float64, without holding them: features of ``chunk`` records at a time reduced to
    moments and merged (:func:`~stimage_jax.nb.head.merge_moments`). With several processes
    each extracts every P-th record and the moments are merged across processes, so no host
    repeats another's work."""
    from stimage_jax.nb.head import feature_moments, merge_moments

    mine = np.asarray(records, np.int64)[jax.process_index()::jax.process_count()]
    parts = []
    with tqdm(total=len(mine), desc="features (head start)", disable=not progress, leave=False) as bar:
        for s in range(0, len(mine), chunk):
            view = DatasetTiles(directory, mine[s:s + chunk], tile_px)
            parts.append(feature_moments(extract_features(backbone, view, batch_size=batch_size, progress=False)))
            bar.update(len(view))
    n, mean, m2 = merge_moments(parts) if any(k for k, _, _ in parts) else (0, None, None)
    every = distributed.gather_json([n, None if mean is None else mean.tolist(), None if m2 is None else m2.tolist()])
    n, mean, m2 = merge_moments([(k, mu, q) for k, mu, q in every if k])
    return mean, np.sqrt(m2 / n)


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
