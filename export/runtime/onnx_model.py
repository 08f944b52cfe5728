"""An exported ensemble in onnxruntime: the :class:`~export.runtime.predictor.Predictor`
of the deployment side (no JAX).

The model file is validated once, at load: its metadata (required keys, well-formed
JSON, sane values) and its graph (a uint8 ``tiles`` input of the declared tile size,
``mu`` and ``r`` outputs with one column per gene) must agree, so a bad file fails with
one line naming what is wrong instead of a traceback at the first batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError
from export.runtime.predictor import REGRESS

__all__ = ["OnnxEnsemble", "ONNX_FORMAT", "PREFERRED_PROVIDERS", "REQUIRED_METADATA"]

ONNX_FORMAT = "stimage-jax-onnx/1"
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
REQUIRED_METADATA = ("format", "genes", "tile_um", "tile_px", "provenance")
MAX_TILE_PX = 8192      # a network input side beyond any backbone here
MAX_TILE_UM = 10_000.0  # 1 cm: no spot or tile is larger
QUANT_SCHEMES = ("int8",)  # metadata 'quantization' schemes this runtime knows (export.quantize)


def _json(meta: dict, key: str, path: Path, default=None):
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError) as e:
        raise StimageError(f"{path}: metadata {key!r} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") \
            from None


def _number(meta: dict, key: str, path: Path, kind, upper: float):
    """A positive metadata number no larger than ``upper`` (a bound on plausible geometry)."""
    try:
        v = kind(meta[key])
        ok = math.isfinite(float(v)) and 0 < v <= upper
    except (TypeError, ValueError, OverflowError):
        raise StimageError(f"{path}: metadata {key!r} = {meta[key]!r} is not a{'n integer' if kind is int else ' number'}") \
            from None
    if not ok:
        raise StimageError(f"{path}: metadata {key!r} = {meta[key]!r} must be positive and at most {upper:g}")
    return v


def _dim(d) -> int | None:
    return d if isinstance(d, int) else None  # symbolic ("B") or unknown dims are strings/None


class OnnxEnsemble:
    """An exported ensemble: ``params(tiles) -> {"mu", "r"}``, each (members, N, genes)."""

    task = REGRESS

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise StimageError(f"model file {path} not found")
        avail = ort.get_available_providers()
        providers = providers or [p for p in PREFERRED_PROVIDERS if p in avail]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors for bad files
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise StimageError(f"{path} is not an ONNX model onnxruntime can run ({msg})") from None
        self.path = path
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self._validate()
        self.providers = self.session.get_providers()
        # what a prediction records: the training provenance plus how it was run
        self.provenance = {**self._trained, "runtime": "onnxruntime", "providers": list(self.providers)}

    def _validate(self) -> None:
        path, meta = self.path, self.meta
        if meta.get("format") != ONNX_FORMAT:
            raise StimageError(f"{path} is not a stimage model (metadata 'format' is "
                               f"{meta.get('format')!r}, expected {ONNX_FORMAT!r})")
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise StimageError(f"{path}: metadata lacks {', '.join(missing)}; re-export the model")
        genes = _json(meta, "genes", path)
        if (not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes)):
            raise StimageError(f"{path}: metadata 'genes' must be a non-empty list of gene names")
        if len(set(genes)) != len(genes):
            raise StimageError(f"{path}: metadata 'genes' lists a gene twice")
        self.genes = genes
        self.tile_px = int(_number(meta, "tile_px", path, int, MAX_TILE_PX))
        self.tile_um = float(_number(meta, "tile_um", path, float, MAX_TILE_UM))
        prov = _json(meta, "provenance", path)
        if not isinstance(prov, dict):
            raise StimageError(f"{path}: metadata 'provenance' must be a JSON object")
        self._trained = prov
        quant = _json(meta, "quantization", path)  # an int8 export (export.quantize); absent on fp32
        if quant is not None:
            if not isinstance(quant, dict) or quant.get("scheme") not in QUANT_SCHEMES:
                raise StimageError(f"{path}: metadata 'quantization' must be a JSON object with 'scheme' one of "
                                   f"{', '.join(QUANT_SCHEMES)}")
            self._trained = {**prov, "quantization": quant["scheme"]}  # predictions say they came from int8
        from export.runtime.context import TTA_VIEWS, check_smoothing

        # issue 21: the graph itself averages its test-time views ('tta' says how many, for the
        # record); spatial smoothing runs after it, in NumPy (absent on older exports: off)
        self.smoothing = check_smoothing(_json(meta, "smoothing", path), f"{path}: metadata")
        tta = meta.get("tta", "1")
        if tta not in {str(v) for v in TTA_VIEWS}:
            raise StimageError(f"{path}: metadata 'tta' = {tta!r} must be one of {', '.join(map(str, TTA_VIEWS))}")
        self.tta = int(tta)
        stain = _json(meta, "stain_reference", path)
        if stain:
            from data_pipelines.stain_normalisation import Reference

            stain = Reference.from_dict(stain, where=f"{path}'s stain reference")
        self.stain = stain or None  # tiles are normalised towards it before the graph runs
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        if "tiles" not in ins or ins["tiles"].type != "tensor(uint8)" or len(ins["tiles"].shape) != 4:
            raise StimageError(f"{path}: the graph has no uint8 4-D input 'tiles'")
        hw = [_dim(d) for d in ins["tiles"].shape[1:]]
        if hw != [self.tile_px, self.tile_px, 3] and any(d is not None for d in hw):
            raise StimageError(f"{path}: the graph reads tiles of shape {tuple(ins['tiles'].shape[1:])}, but its "
                               f"metadata says tile_px {self.tile_px}")
        for name in ("mu", "r"):
            o = outs.get(name)
            if o is None or len(o.shape) != 3:
                raise StimageError(f"{path}: the graph has no 3-D output {name!r} (members, tiles, genes)")
            g = _dim(o.shape[2])
            if g is not None and g != len(genes):
                raise StimageError(f"{path}: output {name!r} has {g} gene columns but the metadata lists "
                                   f"{len(genes)} genes")
        members = _dim(outs["mu"].shape[0])
        declared = meta.get("members")
        if members is not None and declared is not None and str(members) != str(declared):
            raise StimageError(f"{path}: the graph has {members} members but the metadata says {declared}")

    def needs_tiles(self, features: dict | None = None) -> bool:
        return True

    def params(self, tiles: np.ndarray | None, *, batch_size: int = 32, progress: bool = False,
               features: dict | None = None) -> dict[str, np.ndarray]:
        """uint8 tiles (N, tile_px, tile_px, 3) → {"mu", "r"} float32, each (M, N, G)."""
        if features:
            raise StimageError("an ONNX model reads tiles, not precomputed features")
        if tiles is None:
            raise StimageError("an ONNX model needs tiles")
        tiles = np.asarray(tiles) if not isinstance(tiles, np.ndarray) else tiles
        if tiles.ndim != 4 or tiles.shape[1:] != (self.tile_px, self.tile_px, 3):
            raise StimageError(f"tiles have shape {tuple(tiles.shape[1:])}, the model expects "
                               f"({self.tile_px}, {self.tile_px}, 3)")
        from tqdm.auto import tqdm

        mus, rs = [], []
        for s in tqdm(range(0, len(tiles), batch_size), desc="onnx", disable=not progress, leave=False):
            mu, r = self.session.run(["mu", "r"], {"tiles": np.ascontiguousarray(tiles[s:s + batch_size], np.uint8)})
            mus.append(mu)
            rs.append(r)
        return {"mu": np.concatenate(mus, axis=1), "r": np.concatenate(rs, axis=1)}
