"""An exported fp32 ensemble → a static INT8 (QDQ) model, with an accuracy gate (no JAX).

Quantisation is onnxruntime's own (``onnxruntime.quantization.quantize_static``) on the
plain fp32 export (format ``stimage-jax-onnx/1``):

- the graph is first pre-processed (``quant_pre_process``: batch norms folded into the
  convolutions, shapes inferred), so each convolution is quantised with its folded weights;
- only ``Conv`` nodes are quantised — the backbone. The input scaling, the pooling, every
  member's NB head (``Gemm``, ``exp``) and the uncertainty arithmetic stay fp32;
- weights int8 symmetric per output channel, activations uint8 with ranges calibrated
  (min/max) on real tiles: the tissue-covered spots of the calibration sections, cut by the
  same tile pipeline a prediction uses (``data_pipelines.tiles.spot_tiles``, the model's
  geometry and stain reference);
- the metadata keep every fp32 key and add ``quantization`` (JSON: scheme, what was
  quantised, calibration tile count, coverage threshold, the sha256 of every calibration
  file and of the calibration tiles themselves, the fp32 graph's sha256, the gate's figures).

The gate predicts the given sections with both models through
:func:`export.runtime.prediction.predict_adata` and compares each with the observed counts:
per-gene Pearson r per section (averaged over sections), the mean |Δ PCC| over genes, the
mean-PCC drop, and the largest relative change of a predicted mean. A drop above
``max_drop`` (default 0.01) refuses the model unless forced.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError
from export.runtime.onnx_model import QUANT_SCHEMES

__all__ = ["QUANT_SCHEMES", "DEFAULT_MAX_PCC_DROP", "DEFAULT_CALIBRATION_TILES", "GateReport", "calibration_tiles",
           "quantize_int8", "accuracy_gate", "quantize_with_gate", "model_digest", "quantize_qdq",
           "quantization_record", "check_calibration_tiles", "fold_input_scaling", "drop_identity_input_quantize", "TileReader", "load_proto", "model_meta",
           "set_model_meta", "save"]

DEFAULT_MAX_PCC_DROP = 0.01
DEFAULT_CALIBRATION_TILES = 256
QUANTIZED_OPS = ("Conv", "Relu", "Clip", "Add", "MaxPool")  # the backbone; heads (Gemm) and the NB arithmetic stay fp32


def model_digest(proto) -> str:
    """sha256 of a ModelProto's serialised bytes."""
    return hashlib.sha256(proto.SerializeToString()).hexdigest()


def _load_proto(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise StimageError(f"model file {path} not found")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf's untyped errors
        raise StimageError(f"{path} is not an ONNX file ({str(e).splitlines()[0][:200] if str(e) else 'unreadable'})") \
            from None


def _meta(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _set_meta(proto, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)


def _check_fp32_export(proto) -> dict[str, str]:
    from export.runtime.onnx_model import ONNX_FORMAT

    meta = _meta(proto)
    if meta.get("format") != ONNX_FORMAT:
        raise StimageError(f"the model's format is {meta.get('format')!r}: quantise a plain {ONNX_FORMAT!r} export")
    if "quantization" in meta:
        raise StimageError("the model is already quantised; quantise the fp32 export")
    return meta


def _geometry(meta: dict[str, str]):
    from data_pipelines.stain_normalisation import Reference

    stain = json.loads(meta.get("stain_reference") or "null")
    stain = Reference.from_dict(stain, where="the model's stain reference") if stain else None
    return float(meta["tile_um"]), int(meta["tile_px"]), stain


def _section_tiles(path, tile_um: float, tile_px: int, stain, progress: bool):
    """(AnnData, tiles (N, px, px, 3) uint8, tissue coverage (N,)) of one section file."""
    from data_pipelines.slides import read_h5ad
    from data_pipelines.tiles import spot_tiles
    from data_pipelines.tissue import spot_tissue_coverage

    path = Path(path)
    if not path.is_file():
        raise StimageError(f"section file {path} not found")
    adata = read_h5ad(path)
    tiles = np.asarray(spot_tiles(adata, tile_um=tile_um, tile_px=tile_px, progress=progress, stain=stain))
    cov = np.asarray(spot_tissue_coverage(adata, tile_um=tile_um, tile_px=tile_px), np.float32)
    return adata, tiles, cov


def calibration_tiles(sections, meta: dict[str, str], n_tiles: int = DEFAULT_CALIBRATION_TILES, *,
                      min_coverage: float | None = None, seed: int = 0, progress: bool = False,
                      _cache: dict | None = None) -> tuple[np.ndarray, dict]:
    """Up to ``n_tiles`` tissue-covered tiles (N, px, px, 3) uint8 from the sections' spots, cut
    at the model's geometry (``meta``: an export's metadata), and what they were: the files'
    sha256, the counts, the coverage threshold and the sha256 of the chosen tiles.
    Deterministic (``seed``); spots below ``min_coverage`` (default the prediction default)
    are mostly glass and would calibrate the ranges to background."""
    from data_pipelines.fingerprint import file_digest
    from data_pipelines.tissue import DEFAULT_MIN_COVERAGE

    if int(n_tiles) < 1:
        raise StimageError(f"--calibration-tiles must be a positive integer, got {n_tiles}")
    min_coverage = DEFAULT_MIN_COVERAGE if min_coverage is None else float(min_coverage)
    tile_um, tile_px, stain = _geometry(meta)
    pool, files = [], []
    for path in sections:
        got = _section_tiles(path, tile_um, tile_px, stain, progress)
        if _cache is not None:
            _cache[str(path)] = got
        _, tiles, cov = got
        keep = cov >= min_coverage
        pool.append(tiles[keep])
        files.append({"file": Path(path).name, "sha256": file_digest(path), "spots": int(len(tiles)),
                      "tissue_spots": int(keep.sum())})
    pool = np.concatenate(pool) if pool else np.zeros((0, tile_px, tile_px, 3), np.uint8)
    if len(pool) == 0:
        raise StimageError(f"no calibration spot has tissue coverage >= {min_coverage:g}: give sections with tissue")
    pick = np.sort(np.random.default_rng(seed).permutation(len(pool))[:int(n_tiles)])
    tiles = np.ascontiguousarray(pool[pick])
    info = {"sections": files, "tiles": int(len(tiles)), "min_coverage": min_coverage, "seed": int(seed),
            "tiles_sha256": hashlib.sha256(tiles.tobytes()).hexdigest()}
    return tiles, info


def _feature_tail(proto) -> list[str]:
    """Names of the nodes that make the backbone's last feature map: walking back from each
    global pooling (``ReduceMean``/``GlobalAveragePool``) through activations, residual
    additions and layout ops to the first convolution on each path (included). The heads
    standardise every feature by its training spread, so noise on a low-spread feature is
    amplified many times: these few nodes (3-4 % of the FLOPs) stay fp32."""
    nodes = list(proto.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    passthrough = {"Relu", "Clip", "Add", "Transpose", "BatchNormalization", "Mul", "Identity"}
    keep, stack = [], [n.input[0] for n in nodes if n.op_type in ("ReduceMean", "GlobalAveragePool")]
    seen = set()
    while stack:
        n = producer.get(stack.pop())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type == "Conv":
            keep.append(n.name)
        elif n.op_type in passthrough:
            keep.append(n.name)
            # a residual addition: follow only its first operand's path to a convolution
            stack.append(n.input[0])
    return keep


class _TileReader:
    """onnxruntime's CalibrationDataReader protocol over uint8 tiles, in batches; ``set_range``
    lets the calibrator take one batch at a time (``CalibStridedMinMax``) and merge its ranges,
    so memory holds one batch of activations, not every batch's. ``input_name``: the graph's
    input (``tiles`` in every stimage export)."""

    def __init__(self, tiles: np.ndarray, batch_size: int, progress: bool, input_name: str = "tiles"):
        self._input = input_name
        from tqdm.auto import tqdm

        self._batches = [tiles[s:s + batch_size] for s in range(0, len(tiles), batch_size)]
        self._bar = tqdm(total=len(self._batches), desc="calibrate", disable=not progress, leave=False)
        self.set_range(0, len(self._batches))

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._batches[start_index:end_index])

    def get_next(self):
        batch = next(self._it, None)
        if batch is None:
            return None
        self._bar.update(1)
        return {self._input: batch}


def fold_input_scaling(proto, *, uint8_path: bool = False) -> str | None:
    """Fold the input scaling ``Cast → Div(c) → Sub(d)`` into the first convolution, in place:
    ``Cast → [Pad((v + d)·c)] → [Transpose] → Conv(W / c, B − d·ΣW)``, exact (the padding
    value moves into the raw 0..255 scale with it). Returns the name of the first
    convolution's input when the pattern was found, else None.

    ``uint8_path``: the Pad and Transpose run on the uint8 tiles, before the Cast (a quarter of
    the memory traffic); a half-integer padding value (Lite0: 127.5) then rounds to the nearest
    integer, an error of 0.5/c on padded pixels only (0.004 for Lite0: half a step of its int8
    input scale), and the convolution reads ``Cast(x) − 128`` (its bias absorbs the shift).
    For the int8 models: with that input pinned to scale 1, zero point 128, its QuantizeLinear
    is an identity that :func:`drop_identity_input_quantize` removes, with the Cast and Sub:
    nothing fp32 is left on the input.

    Why: in an int8 graph the scaling is fp32 element-wise work on the largest tensor (the
    input batch) plus a QuantizeLinear of it, ~8 % of EfficientNet-Lite0's int8 time at
    299² (profile in experiments/benchmarks/lite0_quant.py); folded, the first convolution's
    input range is the raw 0..255, so its uint8 quantisation is exact."""
    from onnx import numpy_helper

    g = proto.graph
    init = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(name):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 else None

    def scalar(name):
        if name not in init:
            return None
        a = numpy_helper.to_array(init[name])
        return float(a.ravel()[0]) if a.size == 1 else None

    cast = only(g.input[0].name)
    div = only(cast.output[0]) if cast is not None and cast.op_type == "Cast" else None
    sub = only(div.output[0]) if div is not None and div.op_type == "Div" else None
    if sub is None or sub.op_type != "Sub" or div.input[0] != cast.output[0] or sub.input[0] != div.output[0]:
        return False
    c, d = scalar(div.input[1]), scalar(sub.input[1])
    if c is None or d is None or c == 0:
        return False
    chain, n = [], only(sub.output[0])
    while n is not None and n.op_type in ("Pad", "Transpose") and n.input[0] == (chain[-1].output[0] if chain else
                                                                                    sub.output[0]):
        chain.append(n)
        n = only(n.output[0])
    if n is None or n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in init:
        return False
    pads = [p for p in chain if p.op_type == "Pad"]
    if any(len(p.input) > 2 and p.input[2] and scalar(p.input[2]) is None for p in pads) or any(
            a.name == "mode" and a.s not in (b"constant", b"") for p in pads for a in p.attribute):
        return False
    w = numpy_helper.to_array(init[n.input[1]]).astype(np.float64)
    b = numpy_helper.to_array(init[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] in init \
        else np.zeros(w.shape[0])
    if len(n.input) > 2 and n.input[2] not in init:
        return False
    # a Conv that does not pad itself: implicit zero padding would not move with the scale
    if any(a.name == "pads" and any(a.ints) for a in n.attribute) or any(
            a.name == "auto_pad" and a.s not in (b"NOTSET", b"VALID", b"") for a in n.attribute):
        return False
    for p in pads:
        v = scalar(p.input[2]) if len(p.input) > 2 and p.input[2] else 0.0
        name = f"{p.name}_raw_pad_value"
        raw = (v + d) * c
        if uint8_path and not 0 <= raw <= 255:
            return None
        g.initializer.append(numpy_helper.from_array(
            np.array(np.clip(np.round(raw), 0, 255), np.uint8) if uint8_path else np.array(raw, np.float32), name))
        while len(p.input) < 3:
            p.input.append("")
        p.input[2] = name
    wn, bn = f"{n.name}_raw_W", f"{n.name}_raw_B"
    g.initializer.append(numpy_helper.from_array((w / c).astype(np.float32), wn))
    # the uint8 path feeds the convolution x − 128 (centred, as the scaled input was: the int8
    # weights' rounding error then multiplies a small mean, not the raw mean of ~180 — measured:
    # median relative change of HER2ST means 0.17 uncentred vs 0.10 centred or unfolded)
    centre = 128.0 if uint8_path and chain else 0.0
    g.initializer.append(numpy_helper.from_array(
        (b + (centre / c - d) * w.reshape(len(w), -1).sum(1)).astype(np.float32), bn))
    n.input[1] = wn
    if len(n.input) > 2:
        n.input[2] = bn
    else:
        n.input.append(bn)
    if uint8_path and chain:
        # tiles → Pad → Transpose → Cast → Conv: the nodes keep their order in the list, the
        # edges move (the node list is re-sorted below)
        chain[0].input[0] = cast.input[0]
        cast.input[0] = chain[-1].output[0]
        cn = f"{n.name}_input_centre"
        g.initializer.append(numpy_helper.from_array(np.array(centre, np.float32), cn))
        del sub.input[:]
        sub.input.extend([cast.output[0], cn])  # the Sub node is reused: Cast → Sub(128) → Conv
        n.input[0] = sub.output[0]
        moved = {m.output[0] for m in chain}  # now uint8: their recorded (float) types are stale
        for vi in [vi for vi in g.value_info if vi.name in moved]:
            g.value_info.remove(vi)
    else:
        (chain[0] if chain else n).input[0] = cast.output[0]
    g.node.remove(div)
    if not (uint8_path and chain):
        g.node.remove(sub)
    else:
        _topological_sort(g)
    used = {i for m in g.node for i in m.input}
    for t in [t for t in g.initializer if t.name not in used]:  # the replaced constants (onnxruntime warns)
        g.initializer.remove(t)
    return n.input[0]


def _topological_sort(g) -> None:
    produced = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise StimageError("internal error: the folded graph has a cycle")
        for n in ready:
            order.append(n)
            produced.update(n.output)
        pending = [n for n in pending if n not in ready]
    del g.node[:]
    g.node.extend(order)


def drop_identity_input_quantize(proto) -> bool:
    """Remove ``Cast(uint8 x) [→ Sub(k)] → QuantizeLinear(scale 1, zero point k, uint8)``: for
    values 0..255 it returns x itself, so its consumers read x directly. In place; returns
    whether one was removed."""
    from onnx import TensorProto, numpy_helper

    g = proto.graph
    init = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uint8 = {i.name for i in g.input if i.type.tensor_type.elem_type == TensorProto.UINT8}
    changed = True
    # tensors known to be uint8: graph inputs, then Pad/Transpose of them
    while changed:
        changed = False
        for n in g.node:
            if n.op_type in ("Pad", "Transpose") and n.input[0] in uint8 and n.output[0] not in uint8:
                uint8.add(n.output[0])
                changed = True
    removed = False
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        src = producer.get(q.input[0])
        shift, sub = 0.0, None
        if src is not None and src.op_type == "Sub" and src.input[1] in init:
            k = numpy_helper.to_array(init[src.input[1]])
            if k.size != 1:
                continue
            shift, sub, src = float(k.ravel()[0]), src, producer.get(src.input[0])
        if src is None or src.op_type != "Cast" or src.input[0] not in uint8:
            continue
        if len(q.input) < 3 or q.input[1] not in init or q.input[2] not in init:
            continue
        scale, zp = numpy_helper.to_array(init[q.input[1]]), numpy_helper.to_array(init[q.input[2]])
        if scale.size != 1 or float(scale) != 1.0 or zp.dtype != np.uint8 or int(zp) != shift:
            continue
        for m in g.node:
            for k, i in enumerate(m.input):
                if i == q.output[0]:
                    m.input[k] = src.input[0]
        g.node.remove(q)
        for m in (sub, src):
            if m is not None and not any(m.output[0] in o.input for o in g.node):
                g.node.remove(m)
        removed = True
    return removed


def quantize_qdq(proto, reader, *, op_types: tuple[str, ...] = QUANTIZED_OPS, exclude=None,
                 per_channel: bool = True, method: str = "minmax", options: dict | None = None,
                 fold_input: bool = True, reduce_range: bool = False, qoperator: bool = False):
    """The static QDQ step every quantised export shares: fp32 ModelProto + a calibration
    reader (onnxruntime's ``CalibrationDataReader`` protocol, e.g. :class:`_TileReader`) →
    the int8 ModelProto (metadata untouched). The graph is pre-processed first (batch norms
    folded, shapes inferred); ``exclude`` is a list of node names or a function of the
    pre-processed ModelProto returning one (node names exist only after pre-processing);
    ``options`` are extra ``quantize_static`` options on top of the defaults; ``fold_input``
    folds the input scaling into the first convolution (:func:`fold_input_scaling`);
    ``reduce_range`` (7-bit weights) and ``qoperator`` (QLinear* nodes instead of QDQ pairs)
    exist for the speed study (experiments/benchmarks/lite0_quant.py), not the exporters."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise StimageError(f"calibration method must be one of {', '.join(methods)}, got {method!r}")
    with tempfile.TemporaryDirectory(prefix="stimage-quant-") as tmp:
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(proto, src)
        # folds batch norms into the convolutions (per-channel weights are then the real ones)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        pre_proto = onnx.load(str(pre))
        first = fold_input_scaling(pre_proto, uint8_path=True) if fold_input else None
        if first:
            onnx.save_model(pre_proto, pre)
        names = exclude(pre_proto) if callable(exclude) else list(exclude or [])
        extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
        if first:
            # the first convolution reads raw values − 128: scale 1, zero point 128 makes its input
            # quantisation an identity (removed below), whatever the calibration tiles' extremes
            extra["TensorQuantOverrides"] = {first: [{"scale": np.array(1.0, np.float32),
                                                      "zero_point": np.array(128, np.uint8)}]}
        if method == "minmax":
            extra["CalibStridedMinMax"] = 1  # ranges merged batch by batch: memory stays one batch of activations
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), reduce_range=reduce_range,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=names, extra_options={**extra, **(options or {})})
        q = onnx.load(str(out))
    if first:
        drop_identity_input_quantize(q)
    return q


def quantization_record(fp32_proto, *, op_types, per_channel: bool, fp32: str, calibration: dict,
                        method: str = "minmax") -> dict:
    """The metadata record (``quantization``) of a QDQ int8 model, before its gate's figures."""
    return {"scheme": "int8", "format": "QDQ", "ops": list(op_types),
            "weights": "int8 symmetric per-channel" if per_channel else "int8 symmetric per-tensor",
            "activations": f"uint8 asymmetric, {method} calibration", "fp32": fp32,
            "fp32_sha256": model_digest(fp32_proto), "calibration": calibration}


def check_calibration_tiles(tiles, px: int) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[1:] != (px, px, 3) or tiles.dtype != np.uint8 or not len(tiles):
        raise StimageError(f"calibration tiles must be uint8 (N >= 1, {px}, {px}, 3), got {tiles.dtype} {tiles.shape}")
    return tiles


def quantize_int8(model, tiles: np.ndarray, *, batch_size: int = 8, per_channel: bool = True,
                  progress: bool = False, calibration: dict | None = None, fp32_tail: bool = True,
                  method: str = "minmax"):
    """fp32 export (path or ModelProto) + calibration tiles (N, px, px, 3) uint8 → the static
    QDQ int8 ModelProto (same inputs, outputs and metadata, plus ``quantization``)."""
    import onnx

    proto = _load_proto(model)
    meta = _check_fp32_export(proto)
    tiles = check_calibration_tiles(tiles, int(meta["tile_px"]))
    q = quantize_qdq(proto, _TileReader(tiles, batch_size, progress), per_channel=per_channel, method=method,
                     exclude=_feature_tail if fp32_tail else None)
    record = quantization_record(proto, op_types=QUANTIZED_OPS, per_channel=per_channel, method=method,
                                 fp32="the rest (input scaling, NB heads)",
                                 calibration=calibration or {"tiles": int(len(tiles))})
    _set_meta(q, {**meta, "quantization": json.dumps(record)})
    onnx.checker.check_model(q)
    return q


@dataclass(frozen=True)
class GateReport:
    """fp32 vs quantised on the gate sections (per-gene arrays in the model's gene order)."""

    sections: tuple[str, ...]
    spots: int
    genes: tuple[str, ...]
    pcc_fp32: tuple[float, ...]
    pcc_quantized: tuple[float, ...]
    mean_abs_delta_pcc: float
    mean_pcc_fp32: float
    mean_pcc_quantized: float
    pcc_drop: float             # mean_pcc_fp32 - mean_pcc_quantized
    max_rel_mean_change: float  # max over spots and genes of |mean_q - mean_fp32| / |mean_fp32|
    max_drop: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.pcc_drop) and self.pcc_drop <= self.max_drop)

    def line(self) -> str:
        return (f"accuracy gate on {', '.join(self.sections)} ({self.spots} spots, {len(self.genes)} genes): "
                f"mean PCC fp32 {self.mean_pcc_fp32:.4f} -> int8 {self.mean_pcc_quantized:.4f} "
                f"(drop {self.pcc_drop:+.4f}, limit {self.max_drop:g}), mean |dPCC| per gene "
                f"{self.mean_abs_delta_pcc:.4f}, max relative change of means {self.max_rel_mean_change:.4f}: "
                f"{'pass' if self.passed else 'FAIL'}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("pcc_fp32"), d.pop("pcc_quantized"), d.pop("genes")
        return {**d, "passed": self.passed}


def _pearson_per_gene(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) → (G,) Pearson r, NaN where a column is constant (as stimage_jax.metrics)."""
    p = np.asarray(p, np.float64) - np.mean(p, 0)
    t = np.asarray(t, np.float64) - np.mean(t, 0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64)


def accuracy_gate(fp32, quantized, sections, *, max_drop: float = DEFAULT_MAX_PCC_DROP, batch_size: int = 32,
                  progress: bool = False, _cache: dict | None = None) -> GateReport:
    """Predict ``sections`` (.h5ad files with counts) with both models (paths or ModelProtos,
    run by the deployment runtime :class:`~export.runtime.onnx_model.OnnxEnsemble`) and
    compare their per-gene PCC against the observed counts."""
    import onnx

    from data_pipelines import keys
    from export.runtime.onnx_model import OnnxEnsemble
    from export.runtime.prediction import predict_adata

    with tempfile.TemporaryDirectory(prefix="stimage-gate-") as tmp:
        models = []
        for name, m in (("fp32", fp32), ("int8", quantized)):
            if isinstance(m, onnx.ModelProto):
                p = Path(tmp) / f"{name}.onnx"
                onnx.save_model(m, p)
                m = p
            models.append(OnnxEnsemble(m))
        f32, q8 = models
        genes = list(f32.genes)
        pcc_f, pcc_q, rel, spots, names = [], [], 0.0, 0, []
        for path in sections:
            got = (_cache or {}).get(str(path)) or _section_tiles(path, f32.tile_um, f32.tile_px, f32.stain, progress)
            adata, tiles, _ = got
            kept = [g for g in genes if g in set(adata.var_names)]
            if not kept:
                raise StimageError(f"{path}: none of the model's genes are in the section: it cannot check accuracy")
            pf = predict_adata(adata, f32, tiles=tiles, batch_size=batch_size, progress=progress)
            pq = predict_adata(adata, q8, tiles=tiles, batch_size=batch_size, progress=progress)
            gi = [genes.index(g) for g in kept]
            truth = _dense(adata[:, kept].X)
            full_f, full_q = (np.full(len(genes), np.nan) for _ in range(2))
            full_f[gi] = _pearson_per_gene(_dense(pf.X)[:, gi], truth)
            full_q[gi] = _pearson_per_gene(_dense(pq.X)[:, gi], truth)
            pcc_f.append(full_f), pcc_q.append(full_q)
            mf, mq = _dense(pf.X), _dense(pq.X)
            rel = max(rel, float(np.max(np.abs(mq - mf) / np.maximum(np.abs(mf), 1e-6))))
            spots += adata.n_obs
            names.append(str(adata.uns.get(keys.STIMAGE_UNS, {}).get(keys.LIBRARY_ID) or Path(path).stem))
    with np.errstate(invalid="ignore"), _quiet_nan():
        gf, gq = np.nanmean(np.stack(pcc_f), 0), np.nanmean(np.stack(pcc_q), 0)
        both = np.isfinite(gf)
        if not both.any():
            raise StimageError("no gene has a defined fp32 PCC on the gate sections (constant counts or predictions)")
        # a gene the quantised model predicts as a constant has lost its correlation: it counts as 0
        gq = np.where(np.isfinite(gf) & ~np.isfinite(gq), 0.0, gq)
        mf, mq = float(np.mean(gf[both])), float(np.mean(gq[both]))
        return GateReport(sections=tuple(names), spots=spots, genes=tuple(genes), pcc_fp32=tuple(map(float, gf)),
                          pcc_quantized=tuple(map(float, gq)),
                          mean_abs_delta_pcc=float(np.mean(np.abs(gq - gf)[both])), mean_pcc_fp32=mf,
                          mean_pcc_quantized=mq, pcc_drop=mf - mq, max_rel_mean_change=rel,
                          max_drop=float(max_drop))


class _quiet_nan:
    """Silence 'Mean of empty slice' for genes constant in every section (NaN is the answer)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def quantize_with_gate(model, calibration, *, validate=None, n_tiles: int = DEFAULT_CALIBRATION_TILES,
                       max_drop: float = DEFAULT_MAX_PCC_DROP, force: bool = False, progress: bool = False,
                       report=print):
    """The whole ``export-onnx --quantize int8`` step on an fp32 export (path or ModelProto):
    calibrate on ``calibration`` (section files), quantise, gate on ``validate`` (default the
    calibration sections). ``report`` gets the gate's line. Returns ``(int8 ModelProto,
    GateReport)``; raises :class:`StimageError` when the gate fails and ``force`` is false."""
    if not (0.0 <= float(max_drop) <= 1.0):
        raise StimageError(f"--max-pcc-drop must lie in [0, 1], got {max_drop}")
    calibration = [Path(p) for p in calibration]
    validate = [Path(p) for p in (validate or [])]
    for p in [*calibration, *validate]:
        if not p.is_file():
            raise StimageError(f"section file {p} not found")
    proto = _load_proto(model)
    meta = _check_fp32_export(proto)
    cache: dict = {}
    tiles, info = calibration_tiles(calibration, meta, n_tiles, progress=progress, _cache=cache)
    q = quantize_int8(proto, tiles, progress=progress, calibration=info)
    gate = accuracy_gate(proto, q, validate or calibration, max_drop=max_drop, progress=progress, _cache=cache)
    report(gate.line())
    record = json.loads(_meta(q)["quantization"])
    record["gate"] = {**gate.to_dict(), "held_out": bool(validate), "forced": bool(force and not gate.passed)}
    if validate:
        from data_pipelines.fingerprint import file_digest

        record["gate"]["files"] = [{"file": p.name, "sha256": file_digest(p)} for p in validate]
    _set_meta(q, {**_meta(q), "quantization": json.dumps(record)})
    if not gate.passed and not force:
        raise StimageError(f"int8 model refused: mean PCC drops by {gate.pcc_drop:.4f} (> {max_drop:g}) on "
                           f"{', '.join(gate.sections)}; nothing written (--force writes it anyway)")
    return q, gate


def save(proto, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``proto`` atomically (a quantised model is far below protobuf's 2 GB)."""
    import onnx

    from data_pipelines.io import atomic_path

    out = Path(out)
    with atomic_path(out, overwrite=overwrite) as tmp:
        onnx.save_model(proto, tmp)
    return out


# public names of the shared pieces (the cell model's quantisation, stimage_jax.cells.quantize, reuses them)
TileReader = _TileReader
load_proto = _load_proto
model_meta = _meta
set_model_meta = _set_meta
