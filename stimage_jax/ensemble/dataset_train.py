"""Fine-tuning from an exported TFDS/ArrayRecord dataset (``stimage train --dataset DIR --fine-tune``).

The tiles stay on disk: :class:`DatasetTiles` is a lazy (N, px, px, 3) uint8 view over the
dataset's random-access ArrayRecord source (the source grain reads), indexed by the batches that
:func:`~stimage_jax.ensemble.stacked.fit_ensemble` draws — member ``m``'s order in epoch ``e`` is
``permutation(fold_in(key_m, e))`` as for in-memory tiles, so a model trained from the dataset
equals one trained from the same spots' h5ad files, and resumes from the same checkpoints. Memory
holds one batch of tiles (plus every spot's counts). Genes, tile geometry and stain come from the
dataset; whole samples validate (``--val-samples``, default the last).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np
import pandas as pd
from flax import nnx

from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path
from data_pipelines.stain_normalisation import Reference
from data_pipelines.tfds_dataset import dataset_metadata, open_source
from stimage_jax import distributed
from stimage_jax.config import RunConfig
from stimage_jax.ensemble.model import EnsembleModel
from stimage_jax.ensemble.stacked import resolve_strategy
from stimage_jax.features.extract import extract_features, weights_fingerprint
from stimage_jax.features.registry import create_backbone

__all__ = ["DatasetTiles", "train_from_dataset"]


class DatasetTiles:
    """Lazy uint8 tiles of records ``index`` of a TFDS data source: ``len``, ``shape`` and
    ``view[i]`` for an int array or slice (→ (k, px, px, 3)); reads only what is indexed."""

    def __init__(self, source, index: np.ndarray, tile_px: int):
        self.source, self.index, self.tile_px = source, np.asarray(index, np.int64), int(tile_px)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        return (len(self.index), self.tile_px, self.tile_px, 3)

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    def __getitem__(self, i) -> np.ndarray:
        idx = self.index[i] if isinstance(i, slice) else self.index[np.asarray(i)]
        if idx.ndim == 0:
            return np.asarray(self.source[int(idx)]["tile"])
        if not len(idx):
            return np.zeros((0, self.tile_px, self.tile_px, 3), np.uint8)
        # record by record: TFDS's batched __getitems__ measured 4x slower per record here
        return np.stack([self.source[int(j)]["tile"] for j in idx])


def train_from_dataset(directory: str | os.PathLike, workdir: str | os.PathLike, cfg: RunConfig, *,
                       progress: bool = True, overwrite: bool = False) -> EnsembleModel:
    """:func:`stimage_jax.pipeline.train` for ``cfg.dataset``: same workdir layout, resume and model."""
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
    source = open_source(directory)
    px = int(meta["tile_px"])
    counts_all = np.stack([np.asarray(source[i]["counts"], np.float32) for i in range(len(source))]) \
        if len(source) else np.zeros((0, len(meta["genes"])), np.float32)
    counts = [counts_all[lo:hi] for lo, hi in ranges.values()]

    def tiles_for(is_val: bool):
        names = [s for s in samples if (s in val) == is_val]
        if not names:
            return None
        return DatasetTiles(source, np.concatenate([np.arange(*ranges[s]) for s in names]), px)

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
        feats = {src["name"]: [extract_features(bb, DatasetTiles(source, np.arange(*ranges[s]), px),
                                                batch_size=f.feature_batch_size, progress=progress,
                                                desc=f"features {s}") for s in samples]}
        src["num_features"] = int(bb.num_features)
        strategy = resolve_strategy(cfg.strategy, trains_backbone=True)
        mcfg = P._model_config(run, strategy)
        mcfg["dataset"] = {"digest": meta["digest"], "format": meta["format"]}
        trained, logs, best_epochs = P._fit_sources(run, mcfg, {src["name"]: bb}, feats, workdir,
                                                    workdir / "cache", progress)
        mcfg["best_epochs"] = best_epochs
        mcfg["trained_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        model = EnsembleModel(mcfg, {}, trained)
        if distributed.is_primary():
            with atomic_path(workdir / "train_log.csv") as tmp:
                pd.DataFrame(logs).to_csv(tmp, index=False)
            model.save(workdir / "model")
        distributed.barrier("stimage-model-saved")
    return model
