"""Train and apply the HoVer-Net-style cell model: patches → Adam → resumable workdir → tiles.

Training (``train_cells``): every tile of the data folder (``data_pipelines.cell_patches``)
is cut into ``patch_size``² patches on a grid of ``stride``; each step draws ``batch_size``
patches (step ``s`` draws with ``default_rng([seed, s])``, so a resumed run sees the same
batches as an uninterrupted one), applies a random dihedral transform to image and labels
alike, a photometric augmentation to the image only (JAX ``augment`` with geometry off:
HED stain jitter, then at most one of blur, noise, HSV, greyscale), builds the NP/HV/TC
targets from the transformed instance map and takes one jitted Adam step on HoVer-Net's
loss. With pretrained encoder weights the encoder's BatchNorm statistics stay frozen
(batches of a few patches would only add noise to ImageNet statistics); the decoders'
BatchNorm trains. ``frozen_levels`` k stops gradients into the encoder's first k
resolution levels (CPU time: see ``MultiScaleEncoder``).

Budget: training stops at ``steps`` or when ``minutes`` of training time (summed over
resumed runs, so an interrupted run ends where an uninterrupted one would) are used.

The step is :func:`stimage_jax.training.train_step` on a
:class:`~stimage_jax.training.TrainState` with :class:`HoverLoss`, the same jitted step the
ensemble vmaps over its members.

Workdir: ``request.json`` (what was asked), ``checkpoints/`` (a
:class:`~stimage_jax.training.Checkpointer`, every ``checkpoint_every`` steps and at the
end: the train state, and the step and elapsed time in its metadata), ``train_log.csv``
(step, loss terms, seconds; on resume, rows after the checkpoint's step are dropped, so
the log has each step once), ``model/`` (``model.json`` + ``params/``), which is all
``CellModel.load`` needs. Rerunning a finished run returns at once; rerunning with a larger
``--steps``/``--minutes`` continues from the checkpoint.

The trained model (``CellModel``: load, save, predict, segment) is in
:mod:`stimage_jax.cells.model`; it is re-exported here.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from data_pipelines.cell_patches import (CELL_TYPES, CellPatches, augment_pairs, extract_patches, list_cell_tiles,
                                         load_cell_tile, patch_targets)
from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path
from stimage_jax.cells.hovernet import PRESETS, STRIDE, HoVerNet, create_hovernet, hovernet_loss
from stimage_jax.cells.model import MODEL_FORMAT, CellModel, CellPrediction
from stimage_jax.training import CheckpointMeta, Checkpointer, TrainState, train_step

__all__ = ["CellTrainConfig", "CellModel", "CellPrediction", "HoverLoss", "load_patches", "train_cells",
           "photometric_config", "MODEL_FORMAT"]


@dataclasses.dataclass(frozen=True)
class CellTrainConfig:
    """Training settings (Python config; stored in ``request.json`` and ``model.json``)."""

    backbone: str = "efficientnet_lite0"     # efficientnet_lite0 | resnet50 | tiny
    weights: str | None = "default"          # "default" (registry), None/"none" (random), or a file
    num_types: int | None = None             # None: len(CELL_TYPES) with type tables, else 0 (no TC)
    patch_size: int = 256
    stride: int = 128
    min_nuclei: int = 2
    batch_size: int = 4
    lr: float = 1e-4                         # HoVer-Net's
    encoder_lr_scale: float = 1.0            # encoder learning rate = lr × this (pretrained: < 1)
    steps: int = 100_000
    minutes: float | None = None             # training-time budget, summed over resumed runs
    checkpoint_every: int = 100
    frozen_levels: int = 0                   # encoder levels (strides 2, 4, ...) without gradient
    augment: str = "default"                 # none | dihedral | default (dihedral + photometric)
    seed: int = 0

    def check(self) -> None:
        if self.backbone not in PRESETS:
            raise StimageError(f"unknown cells backbone {self.backbone!r}; choose from {', '.join(PRESETS)}")
        if self.patch_size <= 0 or self.patch_size % STRIDE:
            raise StimageError(f"--patch-size must be a positive multiple of {STRIDE}, got {self.patch_size}")
        if self.stride <= 0 or self.batch_size <= 0 or self.steps < 0 or self.checkpoint_every <= 0:
            raise StimageError("stride, batch size and checkpoint interval must be positive and steps >= 0")
        if self.minutes is not None and not self.minutes > 0:
            raise StimageError(f"--minutes must be positive, got {self.minutes}")
        if self.augment not in ("none", "dihedral", "default"):
            raise StimageError(f"--augment must be none, dihedral or default, got {self.augment!r}")
        if not 0 <= self.frozen_levels <= 5:
            raise StimageError(f"--frozen-levels must be in 0..5, got {self.frozen_levels}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise StimageError(f"--lr must be positive, got {self.lr}")
        if not (math.isfinite(self.encoder_lr_scale) and self.encoder_lr_scale >= 0):
            raise StimageError(f"--encoder-lr-scale must be >= 0, got {self.encoder_lr_scale}")

    def request(self) -> dict:
        """The settings that define a run (budget fields excluded: raising them continues it)."""
        d = dataclasses.asdict(self)
        for k in ("steps", "minutes", "checkpoint_every"):
            d.pop(k)
        return d


def photometric_config():
    """The image-only augmentation: HED jitter (p 0.5, σ 0.05) then one of blur (σ ≤ 1.5 px),
    noise, HSV, greyscale (each p 0.125); no geometry (labels would not follow)."""
    from data_pipelines.augmentation import AugmentConfig

    # Blur is capped at σ 1.5 px (STimage's 3 px is for 100 µm spot tiles; at 40× it would
    # erase the nuclear borders the HV branch learns).
    return AugmentConfig(flip_p=0.0, rot90=False, affine_p=0.0, stain_p=0.5, stain_sigma=0.05,
                         blur_sigma=(0.0, 1.5))


# --- data ------------------------------------------------------------------------------------------------

def load_patches(folder: str | os.PathLike, *, size: int, stride: int, min_nuclei: int = 2,
                 class_names=CELL_TYPES, progress: bool = False) -> tuple[CellPatches, dict]:
    """All patches of a folder's tiles and a summary (tiles, patches, typed tiles, mpp)."""
    files = list_cell_tiles(folder)
    parts, typed = [], 0
    for i, f in enumerate(tqdm(files, desc="patches", disable=not progress, leave=False)):
        t = load_cell_tile(f, class_names)
        typed += t.types is not None
        parts.append(extract_patches(t.rgb, t.instances, t.types, size=size, stride=stride,
                                     min_nuclei=min_nuclei, tile_index=i))
    patches = CellPatches.concat(parts)
    if len(patches) == 0:
        raise StimageError(f"no {size}² patch of {folder} holds {min_nuclei} or more nuclei")
    return patches, {"tiles": len(files), "patches": len(patches), "typed_tiles": typed,
                     "names": [f.image.stem for f in files]}


def _batch(patches: CellPatches, step: int, config: CellTrainConfig, photometric) -> tuple:
    rng = np.random.default_rng([config.seed, step])
    idx = np.sort(rng.choice(len(patches), config.batch_size, replace=len(patches) < config.batch_size))
    images, inst, types = patches.images[idx], patches.instances[idx], patches.types[idx]
    hook = None
    if photometric is not None:
        from data_pipelines.augmentation import augment

        key = jax.random.fold_in(jax.random.key(config.seed), step)
        hook = lambda x: np.asarray(augment(key, jnp.asarray(x), photometric))  # noqa: E731
    images, inst, types = augment_pairs(rng, images, inst, types, hook=hook, geometric=config.augment != "none")
    np_t, hv_t = patch_targets(inst)
    return images, np_t, hv_t, types


@dataclasses.dataclass(frozen=True)
class HoverLoss:
    """HoVer-Net's loss of a batch ``{"images", "np", "hv", "tc"}`` (``tc`` None without a TC
    branch) → ``(total, terms)``; no gradient into the encoder's first ``frozen_levels``
    levels. Frozen (hashable by value): part of the jitted step's static state."""

    frozen_levels: int = 0

    def __call__(self, model: HoVerNet, batch: dict):
        return hovernet_loss(model(batch["images"], self.frozen_levels), batch["np"], batch["hv"], batch["tc"])


def _param_group(params):
    """"encoder" or "decoder" for every parameter (the first path key names the submodule)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "encoder" if getattr(path[0], "key", None) == "encoder" else "decoder", params)


@functools.lru_cache(maxsize=8)
def _adam(lr: float, encoder_lr: float) -> optax.GradientTransformation:
    """Adam, with its own learning rate for the encoder when that differs.

    Cached: the optimiser is static in the train state, and a new (unequal) object would
    make the jitted step recompile for every run in a process (~6 s each on 2 cores for the
    tiny model).
    """
    if encoder_lr == lr:
        return optax.adam(lr)
    return optax.multi_transform({"encoder": optax.adam(encoder_lr), "decoder": optax.adam(lr)}, _param_group)


def _set_train_mode(model: HoVerNet, pretrained: bool) -> None:
    model.train()
    if pretrained:
        model.encoder.eval()  # BatchNorm uses (and keeps) the ImageNet running statistics


# --- training ---------------------------------------------------------------------------------------------------

def _check_request(workdir: Path, request: dict, overwrite: bool) -> None:
    path = workdir / "request.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old != request:
            if not overwrite:
                raise StimageError(f"workdir {workdir} holds a different cells run (see request.json); "
                                   "use another --workdir or pass --overwrite")
            for sub in ("checkpoints", "model", "train_log.csv", "request.json"):
                p = workdir / sub
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(request, indent=1))


def _trim_log(path: Path, step: int) -> bool:
    """Keep the rows of ``train_log.csv`` up to ``step`` (the checkpoint resumed from): rows
    after it were written by a run killed before its next checkpoint and are trained again.
    True when the log starts afresh (it then needs a header)."""
    if step == 0 or not path.is_file():
        return True
    with open(path, newline="") as f:  # rows end in csv's "\r\n": kept as they are
        lines = f.read().splitlines(keepends=True)
    keep = lines[:1]
    for line in lines[1:]:
        try:
            if line.endswith("\n") and int(line.split(",", 1)[0]) <= step:
                keep.append(line)
        except ValueError:  # a row cut short by a kill
            pass
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write("".join(keep))
    return not keep


def train_cells(data: str | os.PathLike, workdir: str | os.PathLike, config: CellTrainConfig = CellTrainConfig(), *,
                overwrite: bool = False, progress: bool = True,
                on_step: Callable[[int, dict], None] | None = None) -> CellModel:
    """Train on the tiles of folder ``data`` into ``workdir`` and return the trained model.

    ``on_step(step, record)`` runs after each step (and its checkpoint); tests use it to
    interrupt a run.
    """
    config.check()
    workdir = Path(workdir)
    data = Path(data)
    patches, summary = load_patches(data, size=config.patch_size, stride=config.stride,
                                    min_nuclei=config.min_nuclei, progress=progress)
    num_types = config.num_types
    if num_types is None:
        num_types = len(CELL_TYPES) if summary["typed_tiles"] else 0
    if num_types and not summary["typed_tiles"]:
        raise StimageError(f"--num-types {num_types} but no tile of {data} has a <name>_types.csv table")
    if num_types and int(patches.types.max(initial=-1)) >= num_types:
        raise StimageError(f"type tables use class {int(patches.types.max())} but the model has {num_types} classes")
    request = {"format": MODEL_FORMAT, "data": str(data.absolute()), **config.request(), "num_types": num_types,
               "tiles": summary["names"]}
    _check_request(workdir, request, overwrite)
    budget_s = config.minutes * 60.0 if config.minutes is not None else math.inf
    if (workdir / "model" / "model.json").is_file():  # finished before: return at once if within budget
        done = CellModel.load(workdir)
        if done.config.get("steps", 0) >= config.steps or done.config.get("elapsed_s", 0.0) >= budget_s:
            return done

    # "default" means "whatever the registry ships": nothing for the tiny encoder
    no_weights = config.weights in (None, "none") or (config.backbone == "tiny" and config.weights == "default")
    weights = None if no_weights else config.weights
    pretrained = weights is not None and config.backbone != "tiny"
    net = create_hovernet(config.backbone, seed=config.seed, weights=weights, num_types=num_types)
    state = TrainState.create(net, _adam(float(config.lr), float(config.lr * config.encoder_lr_scale)),
                              HoverLoss(config.frozen_levels), set_train_mode=lambda m: _set_train_mode(m, pretrained))
    del net  # its arrays now belong to the train state (donated to the step)
    step, elapsed = 0, 0.0
    photometric = photometric_config() if config.augment == "default" else None
    log_path = workdir / "train_log.csv"
    with Checkpointer(workdir / "checkpoints", unit="step") as ckpt:
        if (got := ckpt.restore(state.arrays())) is not None:
            state, step, elapsed = state.with_arrays(got[0]), got[1].step, got[1].elapsed_s

        def save():
            if ckpt.latest_step() != step:
                ckpt.save(step, state.arrays(), CheckpointMeta(step=step, unit="step", elapsed_s=elapsed))

        new_log = _trim_log(log_path, step)
        writer = None
        with open(log_path, "w" if new_log else "a", newline="") as log, \
                tqdm(total=config.steps, initial=step, desc="cells", disable=not progress, leave=False) as bar:
            while step < config.steps and elapsed < budget_s:
                t0 = time.perf_counter()
                images, np_t, hv_t, tc_t = _batch(patches, step, config, photometric)
                batch = {"images": jnp.asarray(images), "np": jnp.asarray(np_t), "hv": jnp.asarray(hv_t),
                         "tc": jnp.asarray(tc_t, jnp.int32) if num_types else None}
                state, metrics = train_step(state, batch)
                loss = float(metrics.pop("loss"))
                if not math.isfinite(loss):
                    raise StimageError(f"training diverged at step {step} (loss {loss}); lower --lr")
                step += 1
                elapsed += time.perf_counter() - t0
                record = {"step": step, "loss": loss, **{k: float(v) for k, v in metrics.items()},
                          "elapsed_s": round(elapsed, 3)}
                if writer is None:
                    writer = csv.DictWriter(log, fieldnames=list(record))
                    if new_log:
                        writer.writeheader()
                writer.writerow(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if step % config.checkpoint_every == 0:
                    log.flush()
                    save()
                if on_step is not None:
                    on_step(step, record)
            save()
    cfg = {"format": MODEL_FORMAT, "backbone": config.backbone, "num_types": num_types,
           "type_names": list(CELL_TYPES[:num_types]) if num_types else [],
           "patch_size": config.patch_size, "train": {**dataclasses.asdict(config), "num_types": num_types},
           "data": str(data.absolute()), "tiles": summary["tiles"], "patches": summary["patches"],
           "steps": step, "elapsed_s": elapsed, "train_minutes": round(elapsed / 60.0, 3)}
    model = CellModel(cfg, state.module())  # evaluation mode
    model.save(workdir / "model")
    return model
