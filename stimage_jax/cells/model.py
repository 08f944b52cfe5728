"""The trained cell network on disk and in use: ``CellModel`` (load, save, predict, segment).

A model folder holds ``model.json`` (architecture, type names, training summary) and
``params/`` (Orbax); ``CellModel.load`` also takes the training workdir around it.

Prediction (``CellModel.predict_maps``): the tile is padded (reflect) to a multiple of 32
and run whole — or in overlapping windows when larger than ``window`` — giving NP, HV and
TC maps of the tile's size; ``segment`` adds HoVer-Net's post-processing and type calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_dir
from stimage_jax.cells.hovernet import PRESETS, STRIDE, HoVerNet, probabilities
from stimage_jax.cells.postprocess import (NucleusTypes, PostprocessParams, instances_from_np_hv, nucleus_types,
                                           type_entropy)
from stimage_jax.training.checkpoint import verify_digests, write_digests

__all__ = ["CellModel", "CellPrediction", "MODEL_FORMAT"]

MODEL_FORMAT = "stimage-jax-cells/1"


def _host(tree):
    return jax.tree.map(np.asarray, tree)


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
            write_digests(tmp)
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
        from export.runtime.predictor import read_model_json

        cfg = read_model_json(meta)
        if cfg.get("format") != MODEL_FORMAT:
            raise StimageError(f"{meta} has format {cfg.get('format')!r}, expected {MODEL_FORMAT!r}")
        nt, names = cfg.get("num_types"), cfg.get("type_names")
        if not isinstance(cfg.get("backbone"), str) or cfg["backbone"] not in PRESETS or not (
                isinstance(nt, int) and not isinstance(nt, bool) and 0 <= nt <= 64) or not (
                isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) == nt):
            raise StimageError(f"{meta} is corrupt: 'backbone' must be one of {', '.join(PRESETS)}, 'num_types' "
                               "a small whole number and 'type_names' that many names; retrain or restore the file")
        # Built abstractly and filled from the checkpoint: random initialisation would cost
        # seconds of compilation only to be overwritten.
        net = nnx.eval_shape(lambda: PRESETS[cfg["backbone"]](rngs=nnx.Rngs(0), weights=None,
                                                              num_types=cfg["num_types"]))
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(nnx.state(net)))
        verify_digests(path)
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
