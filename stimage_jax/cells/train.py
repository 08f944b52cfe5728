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

Workdir: ``request.json`` (what was asked), ``checkpoints/`` (Orbax, every
``checkpoint_every`` steps and at the end: model, optimiser, step, elapsed time),
``train_log.csv`` (step, loss terms, seconds), ``model/`` (``model.json`` + ``params/``),
which is all ``CellModel.load`` needs. Rerunning a finished run returns at once; rerunning
with a larger ``--steps``/``--minutes`` continues from the checkpoint.

Prediction (``CellModel.predict_maps``): the tile is padded (reflect) to a multiple of 32
and run whole — or in overlapping windows when larger than ``window`` — giving NP, HV and
TC maps of the tile's size; ``segment`` adds HoVer-Net's post-processing and type calls.
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
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from data_pipelines.cell_patches import (CELL_TYPES, CellPatches, augment_pairs, extract_patches, list_cell_tiles,
                                         load_cell_tile, patch_targets)
from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_dir
from stimage_jax.cells.hovernet import (PRESETS, STRIDE, HoVerNet, create_hovernet, hovernet_loss, probabilities)
from stimage_jax.cells.postprocess import (NucleusTypes, PostprocessParams, instances_from_np_hv, nucleus_types,
                                           type_entropy)

__all__ = ["CellTrainConfig", "CellModel", "CellPrediction", "load_patches", "train_cells", "photometric_config",
           "MODEL_FORMAT"]

MODEL_FORMAT = "stimage-jax-cells/1"


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


@nnx.jit(static_argnames=("frozen_levels",))
def _train_step(model: HoVerNet, optimizer: nnx.Optimizer, images, np_t, hv_t, tc_t, frozen_levels: int):
    def loss_fn(m):
        return hovernet_loss(m(images, frozen_levels), np_t, hv_t, tc_t)

    (loss, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, terms


def _param_group(params):
    """"encoder" or "decoder" for every parameter (the first path key names the submodule)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "encoder" if getattr(path[0], "key", None) == "encoder" else "decoder", params)


@functools.lru_cache(maxsize=8)
def _adam(lr: float, encoder_lr: float) -> optax.GradientTransformation:
    """Adam, with its own learning rate for the encoder when that differs.

    Cached: the optimiser keeps the transformation as a static attribute, and a new
    (unequal) object would make nnx.jit recompile the train step for every run in a
    process (~6 s each on 2 cores for the tiny model).
    """
    if encoder_lr == lr:
        return optax.adam(lr)
    return optax.multi_transform({"encoder": optax.adam(encoder_lr), "decoder": optax.adam(lr)}, _param_group)


def _set_train_mode(model: HoVerNet, pretrained: bool) -> None:
    model.train()
    if pretrained:
        model.encoder.eval()  # BatchNorm uses (and keeps) the ImageNet running statistics


def _host(tree):
    return jax.tree.map(np.asarray, tree)


# --- the model on disk -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CellPrediction:
    """Everything ``stimage cells predict`` writes, for one tile."""

    instances: np.ndarray            # (H, W) int32, 1..N
    np_prob: np.ndarray              # (H, W) float32
    hv: np.ndarray                   # (H, W, 2) float32
    tc_prob: np.ndarray | None       # (H, W, K) float32
    types: NucleusTypes | None       # per-instance calls (None without a TC branch)
    entropy: np.ndarray              # (H, W) float32 nats: of the type probabilities, else of NP


@dataclasses.dataclass
class CellModel:
    """``config`` (model.json) and the network (eval mode)."""

    config: dict
    net: HoVerNet

    @property
    def type_names(self) -> list[str]:
        return list(self.config["type_names"])

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write atomically: a temporary sibling folder renamed onto ``model_dir``."""
        model_dir = Path(model_dir).absolute()
        with atomic_dir(model_dir) as tmp:
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(tmp / "params", _host(nnx.to_pure_dict(nnx.state(self.net))))
            ckptr.wait_until_finished()
            (tmp / "model.json").write_text(json.dumps(self.config, indent=1))
        return model_dir

    @classmethod
    def load(cls, path: str | os.PathLike) -> CellModel:
        """From a workdir or its ``model/`` folder."""
        path = Path(path)
        if (path / "model" / "model.json").is_file():
            path = path / "model"
        meta = path / "model.json"
        if not meta.is_file():
            raise StimageError(f"{path} is not a trained cell model (no model.json); "
                               "train one with `stimage cells train --workdir ...`")
        try:
            cfg = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise StimageError(f"{meta} is corrupt: {e}") from None
        if cfg.get("format") != MODEL_FORMAT:
            raise StimageError(f"{meta} has format {cfg.get('format')!r}, expected {MODEL_FORMAT!r}")
        # Built abstractly and filled from the checkpoint: random initialisation would cost
        # seconds of compilation only to be overwritten.
        net = nnx.eval_shape(lambda: PRESETS[cfg["backbone"]](rngs=nnx.Rngs(0), weights=None,
                                                              num_types=cfg["num_types"]))
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(nnx.state(net)))
        try:
            pure = ocp.StandardCheckpointer().restore((path / "params").absolute(), target)
        except Exception as e:
            raise StimageError(f"cell model checkpoint {path / 'params'} is missing or corrupt "
                               f"({type(e).__name__}); retrain or restore the folder") from None
        state = nnx.state(net)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
        nnx.update(net, state)
        net.eval()
        return cls(cfg, net)

    # --- inference ---
    def predict_maps(self, rgb: np.ndarray, *, window: int = 1024, margin: int = 64
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """RGB (H, W, 3) uint8 → NP (H, W), HV (H, W, 2), TC (H, W, K) or None; float32.

        Images up to ``window`` px a side run whole (padded by reflection to a multiple of
        32); larger ones in ``window``² windows overlapping by ``2·margin``, each keeping
        its centre (HV maps are per nucleus, so a margin wider than a nucleus suffices).
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise StimageError(f"cell prediction needs an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
        if window % STRIDE or window <= 2 * margin:
            raise StimageError(f"window must be a multiple of {STRIDE} larger than 2·margin")
        h, w = rgb.shape[:2]
        k = self.net.num_types
        if max(h, w) <= window:
            return self._run_padded(rgb)
        out_np = np.zeros((h, w), np.float32)
        out_hv = np.zeros((h, w, 2), np.float32)
        out_tc = np.zeros((h, w, k), np.float32) if k else None
        step = window - 2 * margin
        for r0 in range(0, h, step):
            for c0 in range(0, w, step):
                # window [r0 - margin, r0 - margin + window), clipped into the image
                ra = min(max(r0 - margin, 0), max(h - window, 0))
                ca = min(max(c0 - margin, 0), max(w - window, 0))
                p_np, p_hv, p_tc = self._run_padded(rgb[ra:ra + window, ca:ca + window])
                rb, cb = min(r0 + step, h), min(c0 + step, w)
                sl = (slice(r0 - ra, rb - ra), slice(c0 - ca, cb - ca))
                out_np[r0:rb, c0:cb] = p_np[sl]
                out_hv[r0:rb, c0:cb] = p_hv[sl]
                if out_tc is not None:
                    out_tc[r0:rb, c0:cb] = p_tc[sl]
        return out_np, out_hv, out_tc

    def _run_padded(self, rgb: np.ndarray):
        h, w = rgb.shape[:2]
        ph, pw = -h % STRIDE, -w % STRIDE
        mode = "reflect" if h > 1 and w > 1 and ph < h and pw < w else "edge"
        x = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode=mode)[None]
        p_np, hv, p_tc = _forward(self.net, jnp.asarray(x))
        crop = lambda a: None if a is None else np.asarray(a[0, :h, :w], np.float32)  # noqa: E731
        return crop(p_np), crop(hv), crop(p_tc)

    def segment(self, rgb: np.ndarray, params: PostprocessParams = PostprocessParams()) -> CellPrediction:
        """Instances, per-nucleus types and the entropy map of one RGB tile."""
        p_np, hv, p_tc = self.predict_maps(rgb)
        inst = instances_from_np_hv(p_np, hv, params)
        if p_tc is not None:
            types, ent = nucleus_types(inst, p_tc), type_entropy(p_tc)
        else:
            types, ent = None, type_entropy(np.stack([1.0 - p_np, p_np], axis=-1))
        return CellPrediction(inst, p_np, hv, p_tc, types, ent)


@nnx.jit
def _forward(net: HoVerNet, x):
    return probabilities(net(x))


# --- training ---------------------------------------------------------------------------------------------------

def _check_request(workdir: Path, request: dict, overwrite: bool) -> None:
    path = workdir / "request.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != request:
            if not overwrite:
                raise StimageError(f"workdir {workdir} holds a different cells run (see request.json); "
                                   "use another --workdir or pass --overwrite")
            for sub in ("checkpoints", "model", "train_log.csv", "request.json"):
                p = workdir / sub
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(request, indent=1))


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
    optimizer = nnx.Optimizer(net, _adam(float(config.lr), float(config.lr * config.encoder_lr_scale)), wrt=nnx.Param)
    meta = {"step": 0, "elapsed_s": 0.0}
    mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=1))
    latest = mngr.latest_step()
    if latest is not None:
        target = {"model": nnx.to_pure_dict(nnx.state(net)), "opt": nnx.to_pure_dict(nnx.state(optimizer)),
                  "meta": {k: np.asarray(v, np.float64) for k, v in meta.items()}}
        try:
            got = mngr.restore(latest, args=ocp.args.StandardRestore(
                jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), target)))
        except Exception as e:  # orbax raises many types for truncated files
            raise StimageError(f"checkpoint {workdir / 'checkpoints'} step {latest} is unreadable "
                               f"({type(e).__name__}); delete it to retrain") from None
        for part, obj in (("model", net), ("opt", optimizer)):
            st = nnx.state(obj)
            nnx.replace_by_pure_dict(st, jax.tree.map(jnp.asarray, got[part]))
            nnx.update(obj, st)
        meta = {"step": int(got["meta"]["step"]), "elapsed_s": float(got["meta"]["elapsed_s"])}

    def save_ckpt():
        if mngr.latest_step() == meta["step"]:
            return
        mngr.save(meta["step"], force=True, args=ocp.args.StandardSave({
            "model": _host(nnx.to_pure_dict(nnx.state(net))), "opt": _host(nnx.to_pure_dict(nnx.state(optimizer))),
            "meta": {k: np.asarray(v, np.float64) for k, v in meta.items()}}))
        mngr.wait_until_finished()

    photometric = photometric_config() if config.augment == "default" else None
    log_path = workdir / "train_log.csv"
    new_log = not log_path.is_file() or meta["step"] == 0
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = None
    bar = tqdm(total=config.steps, initial=meta["step"], desc="cells", disable=not progress, leave=False)
    try:
        while meta["step"] < config.steps and meta["elapsed_s"] < budget_s:
            t0 = time.perf_counter()
            images, np_t, hv_t, tc_t = _batch(patches, meta["step"], config, photometric)
            _set_train_mode(net, pretrained)
            loss, terms = _train_step(net, optimizer, jnp.asarray(images), jnp.asarray(np_t), jnp.asarray(hv_t),
                                      jnp.asarray(tc_t, jnp.int32) if num_types else None, config.frozen_levels)
            loss = float(loss)
            if not math.isfinite(loss):
                raise StimageError(f"training diverged at step {meta['step']} (loss {loss}); lower --lr")
            meta["step"] += 1
            meta["elapsed_s"] += time.perf_counter() - t0
            record = {"step": meta["step"], "loss": loss, **{k: float(v) for k, v in terms.items()},
                      "elapsed_s": round(meta["elapsed_s"], 3)}
            if writer is None:
                writer = csv.DictWriter(log, fieldnames=list(record))
                if new_log:
                    writer.writeheader()
            writer.writerow(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if meta["step"] % config.checkpoint_every == 0:
                log.flush()
                save_ckpt()
            if on_step is not None:
                on_step(meta["step"], record)
        save_ckpt()
    finally:
        bar.close()
        log.close()
        mngr.close()
    net.eval()
    cfg = {"format": MODEL_FORMAT, "backbone": config.backbone, "num_types": num_types,
           "type_names": list(CELL_TYPES[:num_types]) if num_types else [],
           "patch_size": config.patch_size, "train": {**dataclasses.asdict(config), "num_types": num_types},
           "data": str(data.absolute()), "tiles": summary["tiles"], "patches": summary["patches"],
           "steps": meta["step"], "elapsed_s": meta["elapsed_s"], "train_minutes": round(meta["elapsed_s"] / 60.0, 3)}
    model = CellModel(cfg, net)
    model.save(workdir / "model")
    return model
