"""An exported cell network (``stimage cells export-onnx``, fp32 or int8) run by onnxruntime.

``OnnxCellModel`` does what :class:`stimage_jax.cells.model.CellModel` does for
``stimage cells predict`` — NP / HV / TC maps of a whole RGB image, then HoVer-Net's
post-processing and type calls — with the network in an ONNX file instead of a Flax
checkpoint. An int8 model (:mod:`stimage_jax.cells.quantize`) has the same inputs and
outputs as its fp32 export, so it runs unchanged.

The exported graph takes ``tiles`` (B, S, S, 3) uint8 at one side S (metadata ``size``);
an image is therefore cut into S² windows overlapping by ``2·margin`` (default S/8, wider
than a nucleus at 40×: HV maps are per nucleus) and each window keeps its centre, as
``CellModel.predict_maps`` does for images larger than its window. Images smaller than S
are padded by reflection. NumPy, OpenCV and onnxruntime only: no JAX is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["CELLS_ONNX_FORMAT", "OnnxCellModel", "is_cells_onnx", "window_starts"]

CELLS_ONNX_FORMAT = "stimage-jax-cells-onnx/1"


def is_cells_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ONNX file (the suffix decides: a model folder is not one)."""
    return Path(path).suffix.lower() == ".onnx"


def window_starts(n: int, size: int, margin: int) -> list[tuple[int, int, int]]:
    """Windows of ``size`` over an axis of ``n`` ≥ ``size`` px: (window start, kept start,
    kept end). Kept parts tile ``[0, n)`` exactly; each lies ≥ ``margin`` px inside its
    window except at the image border."""
    if n <= size:
        return [(0, 0, n)]
    step = size - 2 * margin
    out = []
    for k0 in range(0, n, step):
        a = min(max(k0 - margin, 0), n - size)
        out.append((a, k0, min(k0 + step, n)))
    return out


class OnnxCellModel:
    """A cell ONNX file: ``config`` (its metadata), ``type_names``, ``num_types``,
    ``predict_maps`` and ``segment`` as :class:`CellModel` has them."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, batch_size: int = 8):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise StimageError(f"cell model file {path} not found")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's untyped errors
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise StimageError(f"{path} is not a loadable ONNX model ({first})") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("format") != CELLS_ONNX_FORMAT:
            raise StimageError(f"{path} has format {meta.get('format')!r}, expected {CELLS_ONNX_FORMAT!r} "
                               "(export one with `stimage cells export-onnx`)")
        config = {}
        for k, v in meta.items():
            try:
                config[k] = json.loads(v)
            except ValueError:
                config[k] = v
        size, nt, names = config.get("size"), config.get("num_types"), config.get("type_names")
        outs = [o.name for o in self.session.get_outputs()]
        if not (isinstance(size, int) and size > 0 and size % 32 == 0 and isinstance(nt, int) and nt >= 0
                and isinstance(names, list) and len(names) == nt
                and outs == (["np", "hv", "tc"] if nt else ["np", "hv"])):
            raise StimageError(f"{path} is a damaged cell model (metadata size/num_types/type_names or outputs "
                               "disagree); export it again")
        self.path, self.config, self.size, self.num_types = path, config, size, nt
        self.batch_size = int(batch_size)
        # write_cell_prediction reads model.net.num_types (a CellModel's network)
        self.net = SimpleNamespace(num_types=nt)

    @property
    def type_names(self) -> list[str]:
        return list(self.config["type_names"])

    @property
    def quantization(self) -> dict | None:
        """The metadata record of an int8 model (None for fp32)."""
        q = self.config.get("quantization")
        return q if isinstance(q, dict) else None

    def run(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(B, S, S, 3) uint8 → NP (B, S, S), HV (B, S, S, 2), TC (B, S, S, K) or None."""
        outs = self.session.run(None, {"tiles": np.ascontiguousarray(tiles, np.uint8)})
        return outs[0], outs[1], (outs[2] if self.num_types else None)

    def predict_maps(self, rgb: np.ndarray, *, margin: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """RGB (H, W, 3) uint8 → NP (H, W), HV (H, W, 2), TC (H, W, K) or None; float32."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise StimageError(f"cell prediction needs an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
        s = self.size
        margin = s // 8 if margin is None else int(margin)
        h, w = rgb.shape[:2]
        ph, pw = max(s - h, 0), max(s - w, 0)
        mode = "reflect" if h > ph and w > pw else "edge"
        x = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode=mode)
        rows, cols = window_starts(x.shape[0], s, margin), window_starts(x.shape[1], s, margin)
        wins = [(r, c) for r in rows for c in cols]
        k = self.num_types
        out_np = np.zeros(x.shape[:2], np.float32)
        out_hv = np.zeros((*x.shape[:2], 2), np.float32)
        out_tc = np.zeros((*x.shape[:2], k), np.float32) if k else None
        for b0 in range(0, len(wins), self.batch_size):
            part = wins[b0:b0 + self.batch_size]
            p_np, p_hv, p_tc = self.run(np.stack([x[ra:ra + s, ca:ca + s] for (ra, _, _), (ca, _, _) in part]))
            for i, ((ra, r0, r1), (ca, c0, c1)) in enumerate(part):
                sl = (slice(r0 - ra, r1 - ra), slice(c0 - ca, c1 - ca))
                out_np[r0:r1, c0:c1] = p_np[i][sl]
                out_hv[r0:r1, c0:c1] = p_hv[i][sl]
                if out_tc is not None:
                    out_tc[r0:r1, c0:c1] = p_tc[i][sl]
        crop = lambda a: None if a is None else np.ascontiguousarray(a[:h, :w])  # noqa: E731
        return crop(out_np), crop(out_hv), crop(out_tc)

    def segment(self, rgb: np.ndarray, params=None):
        """Instances, per-nucleus types and the entropy map (a ``CellPrediction``)."""
        from stimage_jax.cells.postprocess import PostprocessParams, instances_from_np_hv, nucleus_types, type_entropy

        p_np, hv, p_tc = self.predict_maps(rgb)
        inst = instances_from_np_hv(p_np, hv, params or PostprocessParams())
        if p_tc is not None:
            types, ent = nucleus_types(inst, p_tc), type_entropy(p_tc)
        else:
            types, ent = None, type_entropy(np.stack([1.0 - p_np, p_np], axis=-1))
        return _prediction(inst, p_np, hv, p_tc, types, ent)


def _prediction(*fields):
    # CellPrediction lives beside CellModel, whose module imports JAX; the dataclass is plain
    # data, so a structurally identical record keeps this runtime JAX-free.
    names = ("instances", "np_prob", "hv", "tc_prob", "types", "entropy")
    return SimpleNamespace(**dict(zip(names, fields)))
