"""The cell network's fp32 ONNX export → a static INT8 (QDQ) model, gated by what cells need.

``stimage cells export-onnx --quantize int8 --calibration IMG_OR_FOLDER [...]``. The
quantisation itself is :func:`export.quantize.quantize_qdq` (the machinery of the spot
models' ``export-onnx --quantize int8``): batch norms folded, per-channel int8 weights,
uint8 activations with min/max ranges. What differs:

- calibration data: S² windows (S = the export's input side) cut on a grid from real H&E
  images (MoNuSeg tiles, or any RGB image), up to ``n_tiles`` of them chosen at random;
- the last convolution of every output branch (NP logits, HV, TC logits) stays fp32: the
  HV maps are differentiated (Sobel) to split touching nuclei, so their error is amplified;
- the gate (:func:`cells_gate`) runs both models (:class:`OnnxCellModel`, the prediction
  runtime) on whole images and compares their post-processed results: pixel agreement of
  the nucleus masks (NP ≥ 0.5) and, with a TC branch, of the type argmax over fp32
  nucleus pixels; the AJI of the int8 instances against the fp32 instances; and where an
  image has an annotation beside it (``<stem>.xml`` or ``<stem>_instances.png/.npy/.tif``),
  Dice and AJI of both against it. It fails when an agreement falls below
  ``min_agreement`` (default 0.98) or the annotated AJI drops by more than
  ``max_aji_drop`` (default 0.01).

The record in the metadata (``quantization``) has the spot models' fields plus the images'
sha256, the windows' sha256 and the gate's figures.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError
from export.quantize import (QUANTIZED_OPS, TileReader, check_calibration_tiles, load_proto, model_meta,
                             quantization_record, quantize_qdq, set_model_meta)
from stimage_jax.cells.onnx_model import CELLS_ONNX_FORMAT, OnnxCellModel

__all__ = ["DEFAULT_CELL_CALIBRATION_TILES", "DEFAULT_MAX_AJI_DROP", "DEFAULT_MIN_AGREEMENT", "CellGateReport",
           "list_images", "calibration_windows", "output_convs", "quantize_cells_int8", "cells_gate",
           "quantize_cells_with_gate"]

DEFAULT_CELL_CALIBRATION_TILES = 64
DEFAULT_MAX_AJI_DROP = 0.01
DEFAULT_MIN_AGREEMENT = 0.98


def list_images(paths) -> list[Path]:
    """Image files of ``paths`` (files, or folders: their images, derived maps such as
    ``*_instances.png`` left out), sorted within a folder; one-line errors when missing."""
    from data_pipelines.cell_patches import _DERIVED, IMAGE_EXTS

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS and not q.stem.endswith(_DERIVED))
            if not found:
                raise StimageError(f"image folder {p} holds no images ({', '.join(IMAGE_EXTS)})")
            out += found
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_EXTS:
                raise StimageError(f"{p} is not an image ({', '.join(IMAGE_EXTS)})")
            out.append(p)
        else:
            raise StimageError(f"image {p} not found")
    return out


def _annotation(image: Path) -> Path | None:
    stem, d = image.stem, image.parent
    for c in (d / f"{stem}.xml", d / f"{stem}_instances.npy", d / f"{stem}_instances.png", d / f"{stem}_instances.tif"):
        if c.is_file():
            return c
    return None


def _check_cells_export(proto) -> dict[str, str]:
    meta = model_meta(proto)
    if meta.get("format") != CELLS_ONNX_FORMAT:
        raise StimageError(f"the model's format is {meta.get('format')!r}: quantise a plain {CELLS_ONNX_FORMAT!r} "
                           "export (stimage cells export-onnx)")
    if "quantization" in meta:
        raise StimageError("the model is already quantised; quantise the fp32 export")
    return meta


def calibration_windows(images, size: int, n_tiles: int = DEFAULT_CELL_CALIBRATION_TILES, *, seed: int = 0,
                        _cache: dict | None = None) -> tuple[np.ndarray, dict]:
    """Up to ``n_tiles`` windows (N, size, size, 3) uint8 cut on a grid (edge-aligned, no
    overlap) from the images (padded by reflection when smaller), chosen at random
    (``seed``), and what they were (the files' sha256 and window counts, the windows' sha256)."""
    from data_pipelines.fingerprint import file_digest
    from data_pipelines.tiles import load_image

    if int(n_tiles) < 1:
        raise StimageError(f"--calibration-tiles must be a positive integer, got {n_tiles}")
    pool, files = [], []
    for path in images:
        rgb = load_image(path)
        if _cache is not None:
            _cache[str(path)] = rgb
        h, w = rgb.shape[:2]
        x = np.pad(rgb, ((0, max(size - h, 0)), (0, max(size - w, 0)), (0, 0)),
                   mode="reflect" if h > size - h and w > size - w else "edge")
        rs = sorted({min(r, x.shape[0] - size) for r in range(0, x.shape[0], size)})
        cs = sorted({min(c, x.shape[1] - size) for c in range(0, x.shape[1], size)})
        wins = [x[r:r + size, c:c + size] for r in rs for c in cs]
        pool += wins
        files.append({"file": Path(path).name, "sha256": file_digest(path), "windows": len(wins)})
    pick = np.sort(np.random.default_rng(seed).permutation(len(pool))[:int(n_tiles)])
    tiles = np.ascontiguousarray(np.stack([pool[i] for i in pick]))
    info = {"images": files, "tiles": int(len(tiles)), "size": int(size), "seed": int(seed),
            "tiles_sha256": hashlib.sha256(tiles.tobytes()).hexdigest()}
    return tiles, info


def output_convs(proto) -> list[str]:
    """Names of the last convolution on the way to each graph output (walking back through
    every input of the non-convolution nodes: softmax, tanh, transposes, ...)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    initialisers = {t.name for t in proto.graph.initializer}
    keep, seen = [], set()
    stack = [o.name for o in proto.graph.output]
    while stack:
        name = stack.pop()
        n = producer.get(name)
        if n is None or n.name in seen or name in initialisers:
            continue
        seen.add(n.name)
        if n.op_type == "Conv":
            keep.append(n.name)
        elif n.op_type not in ("Concat",):  # a concatenation is where the decoders' inputs meet: stop
            stack += list(n.input)
    return keep


def quantize_cells_int8(model, tiles: np.ndarray, *, batch_size: int = 4, per_channel: bool = True,
                        calibration: dict | None = None, fp32_outputs: bool = True, progress: bool = False):
    """fp32 cell export (path or ModelProto) + calibration windows (N, S, S, 3) uint8 → the
    static QDQ int8 ModelProto (same inputs, outputs and metadata, plus ``quantization``)."""
    import onnx

    proto = load_proto(model)
    meta = _check_cells_export(proto)
    tiles = check_calibration_tiles(tiles, int(meta["size"]))
    q = quantize_qdq(proto, TileReader(tiles, batch_size, progress), per_channel=per_channel,
                     exclude=output_convs if fp32_outputs else None)
    record = quantization_record(proto, op_types=QUANTIZED_OPS, per_channel=per_channel,
                                 fp32="the rest (input scaling, upsampling, each output's last convolution, "
                                      "softmax/tanh)" if fp32_outputs else "the rest (input scaling, softmax/tanh)",
                                 calibration=calibration or {"tiles": int(len(tiles))})
    set_model_meta(q, {**meta, "quantization": json.dumps(record)})
    onnx.checker.check_model(q)
    return q


@dataclass(frozen=True)
class CellGateReport:
    """fp32 vs int8 cell model on whole images (means over images)."""

    images: tuple[str, ...]
    np_agreement: float          # fraction of pixels where the nucleus masks (NP >= 0.5) agree
    tc_agreement: float | None   # fraction of fp32 nucleus pixels with the same type argmax (None: no TC)
    aji_vs_fp32: float | None    # AJI of the int8 instances with the fp32 instances as truth (None: no nuclei)
    nuclei_fp32: int
    nuclei_int8: int
    annotated: int               # images with an annotation (the Dice/AJI below are over these)
    dice_fp32: float | None
    dice_int8: float | None
    aji_fp32: float | None
    aji_int8: float | None
    max_aji_drop: float
    min_agreement: float

    @property
    def aji_drop(self) -> float | None:
        return None if self.aji_fp32 is None else self.aji_fp32 - self.aji_int8

    @property
    def passed(self) -> bool:
        ok = np.isfinite(self.np_agreement) and self.np_agreement >= self.min_agreement
        if self.tc_agreement is not None:
            ok = ok and np.isfinite(self.tc_agreement) and self.tc_agreement >= self.min_agreement
        if self.aji_drop is not None:
            ok = ok and np.isfinite(self.aji_drop) and self.aji_drop <= self.max_aji_drop
        return bool(ok)

    def line(self) -> str:
        tc = f", type agreement {self.tc_agreement:.4f}" if self.tc_agreement is not None else ""
        truth = (f"; on {self.annotated} annotated: Dice {self.dice_fp32:.4f} -> {self.dice_int8:.4f}, AJI "
                 f"{self.aji_fp32:.4f} -> {self.aji_int8:.4f} (drop {self.aji_drop:+.4f}, limit "
                 f"{self.max_aji_drop:g})") if self.aji_drop is not None else "; no annotations (no AJI drop)"
        return (f"accuracy gate on {len(self.images)} image(s): nucleus-mask agreement {self.np_agreement:.4f}{tc} "
                f"(limit {self.min_agreement:g}), AJI int8 vs fp32 "
                f"{'n/a' if self.aji_vs_fp32 is None else format(self.aji_vs_fp32, '.4f')}, nuclei "
                f"{self.nuclei_fp32} -> {self.nuclei_int8}{truth}: {'pass' if self.passed else 'FAIL'}")

    def to_dict(self) -> dict:
        return {**asdict(self), "aji_drop": self.aji_drop, "passed": self.passed}


def _mean(xs) -> float | None:
    xs = [x for x in xs if np.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def cells_gate(fp32, quantized, images, *, max_aji_drop: float = DEFAULT_MAX_AJI_DROP,
               min_agreement: float = DEFAULT_MIN_AGREEMENT, progress: bool = False,
               _cache: dict | None = None) -> CellGateReport:
    """Segment ``images`` (paths) with both models (:class:`OnnxCellModel` or ONNX paths) and
    compare them (see the module docstring)."""
    from tqdm.auto import tqdm

    from data_pipelines.cell_patches import read_instances
    from data_pipelines.tiles import load_image
    from stimage_jax.cells.instance_metrics import aji, dice

    f32 = fp32 if isinstance(fp32, OnnxCellModel) else OnnxCellModel(fp32)
    q8 = quantized if isinstance(quantized, OnnxCellModel) else OnnxCellModel(quantized)
    agree_np, agree_tc, aji_q, n_f, n_q, names = [], [], [], 0, 0, []
    truth_scores: list[tuple[float, float, float, float]] = []
    for path in tqdm(list(images), desc="gate", disable=not progress, leave=False):
        path = Path(path)
        rgb = (_cache or {}).get(str(path))
        rgb = load_image(path) if rgb is None else rgb
        pf, pq = f32.segment(rgb), q8.segment(rgb)
        mf, mq = pf.np_prob >= 0.5, pq.np_prob >= 0.5
        agree_np.append(float(np.mean(mf == mq)))
        if pf.tc_prob is not None and mf.any():
            agree_tc.append(float(np.mean(pf.tc_prob[mf].argmax(-1) == pq.tc_prob[mf].argmax(-1))))
        aji_q.append(aji(pq.instances, pf.instances))
        n_f, n_q = n_f + int(pf.instances.max(initial=0)), n_q + int(pq.instances.max(initial=0))
        names.append(path.name)
        ann = _annotation(path)
        if ann is not None:
            t = read_instances(ann, rgb.shape)
            truth_scores.append((dice(pf.instances, t), dice(pq.instances, t), aji(pf.instances, t),
                                 aji(pq.instances, t)))
    cols = list(zip(*truth_scores)) if truth_scores else [[]] * 4
    df, dq, af, aq = (_mean(c) for c in cols)
    if af is None or aq is None:
        af = aq = None
    return CellGateReport(images=tuple(names), np_agreement=float(np.mean(agree_np)),
                          tc_agreement=_mean(agree_tc) if f32.num_types else None,
                          aji_vs_fp32=_mean(aji_q),
                          nuclei_fp32=n_f, nuclei_int8=n_q, annotated=len(truth_scores), dice_fp32=df,
                          dice_int8=dq, aji_fp32=af, aji_int8=aq, max_aji_drop=float(max_aji_drop),
                          min_agreement=float(min_agreement))


def quantize_cells_with_gate(model, calibration, *, validate=None, n_tiles: int = DEFAULT_CELL_CALIBRATION_TILES,
                             max_aji_drop: float = DEFAULT_MAX_AJI_DROP, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                             force: bool = False, progress: bool = False, report=print):
    """The whole ``cells export-onnx --quantize int8`` step on an fp32 cell export (path or
    ModelProto): calibrate on ``calibration`` (images or folders), quantise, gate on
    ``validate`` (default the calibration images). ``report`` gets the gate's line. Returns
    ``(int8 ModelProto, CellGateReport)``; raises :class:`StimageError` when the gate fails
    and ``force`` is false (nothing is written by this function)."""
    import tempfile

    import onnx

    from data_pipelines.fingerprint import file_digest

    if not (0.0 <= float(max_aji_drop) <= 1.0):
        raise StimageError(f"--max-aji-drop must lie in [0, 1], got {max_aji_drop}")
    if not (0.0 <= float(min_agreement) <= 1.0):
        raise StimageError(f"--min-agreement must lie in [0, 1], got {min_agreement}")
    calibration = list_images(calibration)
    validate = list_images(validate) if validate else []
    proto = load_proto(model)
    meta = _check_cells_export(proto)
    cache: dict = {}
    tiles, info = calibration_windows(calibration, int(meta["size"]), n_tiles, _cache=cache)
    q = quantize_cells_int8(proto, tiles, calibration=info, progress=progress)
    with tempfile.TemporaryDirectory(prefix="stimage-cells-gate-") as tmp:
        paths = []
        for name, m in (("fp32", proto), ("int8", q)):
            onnx.save_model(m, Path(tmp) / f"{name}.onnx")
            paths.append(Path(tmp) / f"{name}.onnx")
        gate = cells_gate(*paths, validate or calibration, max_aji_drop=max_aji_drop, min_agreement=min_agreement,
                          progress=progress, _cache=cache)
    report(gate.line())
    record = json.loads(model_meta(q)["quantization"])
    record["gate"] = {**gate.to_dict(), "held_out": bool(validate), "forced": bool(force and not gate.passed),
                      "files": [{"file": p.name, "sha256": file_digest(p)} for p in (validate or calibration)]}
    set_model_meta(q, {**model_meta(q), "quantization": json.dumps(record)})
    if not gate.passed and not force:
        raise StimageError(f"int8 cell model refused by the accuracy gate (nucleus-mask agreement "
                           f"{gate.np_agreement:.4f}, limit {min_agreement:g}"
                           + (f"; type agreement {gate.tc_agreement:.4f}" if gate.tc_agreement is not None else "")
                           + (f"; AJI drop {gate.aji_drop:+.4f}, limit {max_aji_drop:g}"
                              if gate.aji_drop is not None else "")
                           + "); nothing written (--force writes it anyway)")
    return q, gate
