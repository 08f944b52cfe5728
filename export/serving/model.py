"""A Triton-layout model repository loaded into onnxruntime (no JAX, no Triton).

``REPO/NAME/config.pbtxt`` + ``REPO/NAME/V/model.onnx`` (as written by
:func:`export.serving.repo.write_triton_repo`). Every version of every model is loaded and
validated once; one that fails is reported (``Repository.failed``) and the others serve.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError
from export.serving.repo import GRAPH_OUTPUTS, MOMENT_OUTPUTS, SERVING_FORMAT

__all__ = ["ServedModel", "Repository", "EXTRA_OUTPUTS", "DEFAULT_OUTPUTS"]

log = logging.getLogger("stimage.serve")
EXTRA_OUTPUTS = ("q_lo", "q_hi")  # the NB mixture's central interval, computed on request (NumPy)
DEFAULT_OUTPUTS = MOMENT_OUTPUTS  # what a request that names no output gets
INTERVAL = 0.8


def _config_int(text: str, key: str, default: int) -> int:
    m = re.search(rf"^\s*{key}\s*:\s*(\d+)", text, re.M)
    return int(m.group(1)) if m else default


class ServedModel:
    """One version of one model: ``run(tiles uint8 (N, px, px, 3)) -> {output: (N, ...)}``."""

    def __init__(self, name: str, version: str, path: Path, max_batch_size: int, max_delay_us: int,
                 threads: int = 0):
        import onnxruntime as ort

        self.name, self.version, self.path = name, version, path
        self.max_batch_size, self.max_delay_us = max_batch_size, max_delay_us
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises untyped errors
            raise StimageError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200] if str(e) else e})") \
                from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("format") != SERVING_FORMAT:
            raise StimageError(f"{path}: format {meta.get('format')!r} is not a serving graph ({SERVING_FORMAT!r}); "
                               "write the repository with stimage export-onnx --triton-repo")
        try:
            self.genes = json.loads(meta["genes"])
            self.tile_px = int(meta["tile_px"])
            self.tile_um = float(meta["tile_um"])
            self.members = int(meta["members"])
        except (KeyError, ValueError, TypeError) as e:
            raise StimageError(f"{path}: metadata is incomplete ({e})") from None
        self.meta = meta
        outs = {o.name: o for o in self.session.get_outputs()}
        if set(outs) != set(GRAPH_OUTPUTS):
            raise StimageError(f"{path}: the graph's outputs are {sorted(outs)}, expected {list(GRAPH_OUTPUTS)}")
        self.shapes = {n: [-1, *[d if isinstance(d, int) else -1 for d in outs[n].shape[1:]]] for n in GRAPH_OUTPUTS}
        g = len(self.genes)
        if self.shapes["mu"][1:] != [self.members, g] or self.shapes["mean"][1:] != [g]:
            raise StimageError(f"{path}: output shapes {self.shapes} disagree with {self.members} members, {g} genes")
        for n in EXTRA_OUTPUTS:
            self.shapes[n] = [-1, g]
        self.input_shape = [-1, self.tile_px, self.tile_px, 3]
        self.lock = threading.Lock()  # one onnxruntime run at a time per model: its threads use every core

    @property
    def outputs(self) -> tuple[str, ...]:
        return (*GRAPH_OUTPUTS, *EXTRA_OUTPUTS)

    def run(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 tiles (N, px, px, 3) → every graph output, batch-major; chunks of max_batch_size."""
        parts = []
        with self.lock:
            for s in range(0, len(tiles), self.max_batch_size):
                parts.append(self.session.run(list(GRAPH_OUTPUTS), {"tiles": tiles[s:s + self.max_batch_size]}))
        return {n: np.concatenate([p[i] for p in parts]) for i, n in enumerate(GRAPH_OUTPUTS)}

    @staticmethod
    def interval(mu: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
        """mu, r (N, M, G) → q_lo, q_hi (N, G) float32: the same NumPy as export.predict."""
        from export.runtime.moments import predictive_interval

        if np.isinf(r).all():  # a point-prediction model: the interval is the mean (as build_prediction)
            mean = mu.mean(1).astype(np.float32)
            return {"q_lo": mean, "q_hi": mean.copy()}
        lo, hi = predictive_interval(mu.transpose(1, 0, 2), r.transpose(1, 0, 2), INTERVAL)
        return {"q_lo": lo.astype(np.float32), "q_hi": hi.astype(np.float32)}

    def metadata(self) -> dict:
        params = {"genes": self.genes, "tile_um": self.tile_um, "tile_px": self.tile_px, "members": self.members,
                  "interval_level": INTERVAL, "stain_reference": json.loads(self.meta.get("stain_reference", "null")),
                  "backbone": self.meta.get("backbone"), "target": self.meta.get("target"),
                  # per-tile outputs are never smoothed (a request has no neighbours): a client that
                  # predicts a section smooths them as the model says (ServedEnsemble + predict_adata)
                  "tta": int(self.meta.get("tta", "1")), "smoothing": json.loads(self.meta.get("smoothing", "null"))}
        return {"name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "tiles", "datatype": "UINT8", "shape": self.input_shape}],
                "outputs": [{"name": n, "datatype": "FP32", "shape": self.shapes[n]} for n in self.outputs],
                "parameters": params}


@dataclass
class Repository:
    """Every loadable model version under ``root``; ``failed`` maps ``name[/version]`` to why not."""

    root: Path
    models: dict[str, dict[str, ServedModel]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, root, *, max_batch_size: int | None = None, max_delay_us: int | None = None,
             threads: int = 0) -> "Repository":
        root = Path(root)
        if not root.is_dir():
            raise StimageError(f"model repository {root} is not a folder")
        repo = cls(root)
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            cfg = folder / "config.pbtxt"
            text = cfg.read_text(errors="replace") if cfg.is_file() else ""
            mbs = max_batch_size or _config_int(text, "max_batch_size", 64) or 1
            delay = max_delay_us if max_delay_us is not None else _config_int(text, "max_queue_delay_microseconds", 2000)
            versions = sorted((v for v in folder.iterdir() if v.is_dir() and v.name.isdigit()), key=lambda v: int(v.name))
            if not versions:
                repo.failed[folder.name] = "no numbered version folder holding model.onnx"
                continue
            for v in versions:
                try:
                    m = ServedModel(folder.name, v.name, v / "model.onnx", mbs, delay, threads)
                except StimageError as e:
                    repo.failed[f"{folder.name}/{v.name}"] = str(e)
                    log.error("model %s version %s not loaded: %s", folder.name, v.name, e)
                    continue
                repo.models.setdefault(folder.name, {})[v.name] = m
        return repo

    def get(self, name: str, version: str | None = None) -> ServedModel | None:
        versions = self.models.get(name)
        if not versions:
            return None
        if version is None:  # the latest version, as Triton's default policy
            return versions[max(versions, key=int)]
        return versions.get(version)
