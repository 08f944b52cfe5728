"""Where EfficientNet-Lite0's int8 time goes, and which quantisation choices change it (issue 19).
One JSON line.

Same toy model as ``onnx_speed.py`` (ImageNet-shaped Lite0 backbone + NB head, 299², batch
``--batch``), calibrated on HER2ST C2 tissue tiles. Variants of ``export.quantize.quantize_qdq``:

- ``qdq``: the export before this study (Conv/Relu/Clip/Add/MaxPool QDQ, per-channel weights,
  the backbone's last convolutions fp32), input scaling left as fp32 ``Cast → Div → Sub``;
- ``fold``: the exporter's default now: the input scaling folded into the first convolution
  and the input's Pad/Transpose run on the uint8 tiles (``fold_input_scaling(uint8_path=True)``),
  whose quantisation is then an identity and removed (``drop_identity_input_quantize``): no
  fp32 work on the input at all;
- ``fold_no_tail``: + the backbone's last convolutions quantised too (accuracy: see onnx_speed);
- ``fold_stem_fp32``: + the stem convolution (3 → 32, 3×3 /2) left fp32;
- ``fold_dw_fp32``: + every depthwise convolution left fp32;
- ``fold_per_tensor``: per-tensor weights;
- ``fold_reduce_range``: 7-bit weights (``reduce_range``: for CPUs without VNNI);
- ``fold_qoperator``: QOperator format instead of QDQ (QLinearConv nodes in the file);
- ``fold@extended``: the ``fold`` model run at graph optimisation level "extended".

Every variant and fp32 are timed in ``--rounds`` interleaved rounds (ratios taken within a round,
median and [min, max] reported). ``profile``: onnxruntime's per-op time shares of fp32 and of the
``fold`` int8 model, and the convolutions' time split into depthwise / dense / stem with their
GOP/s. ``fidelity``: median relative difference of the backbone features' NB means vs fp32 on
real tiles (random-weight toy head: a fidelity check; accuracy is the gate of ``onnx_speed.py
--heldout``).

Usage: python experiments/benchmarks/lite0_quant.py [--tiles 64] [--batch 32] [--threads 2]
       [--rounds 5] [--shared ../shared] [--variants fold,qdq,...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_flags  # noqa: E402
from onnx_speed import session, tiles_per_s, toy_model  # noqa: E402

VARIANTS = ("qdq", "fold", "fold_no_tail", "fold_stem_fp32", "fold_dw_fp32", "fold_per_tensor",
            "fold_reduce_range", "fold_qoperator")


def _convs(proto):
    from onnx import numpy_helper

    init = {t.name: t for t in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.op_type == "Conv" and n.input[1] in init:
            group = ([a.i for a in n.attribute if a.name == "group"] or [1])[0]
            out.append((n.name, group, numpy_helper.to_array(init[n.input[1]]).shape))
    return out


def build(variant: str, fp32: Path, calib: np.ndarray, out: Path) -> Path:
    import onnx
    import export.quantize as eq

    proto = onnx.load(str(fp32))
    fold = variant != "qdq"

    def exclude(pre):
        names = [] if variant == "fold_no_tail" else eq._feature_tail(pre)
        convs = _convs(pre)
        if variant == "fold_stem_fp32":
            names.append(convs[0][0])
        if variant == "fold_dw_fp32":
            names += [c[0] for c in convs if c[1] > 1]
        return names

    q = eq.quantize_qdq(proto, eq.TileReader(calib, 8, False), exclude=exclude, fold_input=fold,
                        per_channel=variant != "fold_per_tensor", reduce_range=variant == "fold_reduce_range",
                        qoperator=variant == "fold_qoperator")
    path = out / f"lite0.{variant}.onnx"
    onnx.save_model(q, path)
    return path


def profile(path: Path, tiles: np.ndarray, threads: int, prefix: Path) -> dict:
    """Per-op-type time shares and the convolutions' split (depthwise / dense; the stem apart)."""
    import onnx

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.log_severity_level = 3
    so.profile_file_prefix = str(prefix)
    so.optimized_model_filepath = str(prefix) + ".opt.onnx"
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    s.run(["mu"], {"tiles": tiles})
    runs = 3
    for _ in range(runs):
        s.run(["mu"], {"tiles": tiles})
    events = json.load(open(s.end_profiling()))
    by_op, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name")] += e["dur"]
            by_node[e["name"][:-len("_kernel_time")]] += e["dur"]
    total = sum(by_op.values())
    opt = onnx.load(str(prefix) + ".opt.onnx")
    init = {t.name for t in opt.graph.initializer}
    split = collections.Counter()
    first = True
    for n in opt.graph.node:
        if n.op_type not in ("Conv", "QLinearConv", "FusedConv"):
            continue
        group = ([a.i for a in n.attribute if a.name == "group"] or [1])[0]
        kind = "stem" if first else ("depthwise" if group > 1 else "dense")
        first = False
        split[kind] += by_node.get(n.name, 0)
    del init
    ms = lambda us: round(us / (runs + 1) / 1e3, 1)  # noqa: E731 - µs summed over runs → ms per batch
    return {"ms_per_batch": ms(total),
            "op_share": {k: round(v / total, 3) for k, v in by_op.most_common(10)},
            "conv_ms": {k: ms(v) for k, v in split.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED", str(Path(__file__).resolve().parents[3]
                                                                              / "shared")))
    a = ap.parse_args()
    from data_pipelines.slides import read_her2st
    from data_pipelines.tiles import spot_tiles
    from export.to_onnx import export_onnx

    variants = [v for v in a.variants.split(",") if v]
    c2 = read_her2st(Path(a.shared) / "data" / "her2st", "C2", require_image=True)
    calib = np.asarray(spot_tiles(c2, tile_px=299, progress=False))[:64]
    tiles = np.random.default_rng(0).integers(0, 256, (a.tiles, 299, 299, 3), dtype=np.uint8)
    out: dict = {"benchmark": "lite0_quant", "batch": a.batch, "tile_px": 299, "threads": a.threads,
                 "rounds": a.rounds, "onnxruntime": ort.__version__, "cpu_flags": cpu_flags()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_onnx(toy_model("efficientnet_lite0"), tmp / "lite0.onnx")
        paths = {"fp32": fp32, **{v: build(v, fp32, calib, tmp) for v in variants}}
        sess = {k: session(p, a.threads) for k, p in paths.items()}
        if "fold" in paths:
            sess["fold@extended"] = session(paths["fold"], a.threads, "extended")
        ref = sess["fp32"].run(["mu"], {"tiles": calib[:32]})[0]
        out["fidelity_median_rel_mu"] = {
            k: float(f"{np.median(np.abs(s.run(['mu'], {'tiles': calib[:32]})[0] - ref) / np.abs(ref)):.2g}")
            for k, s in sess.items() if k != "fp32"}
        out["model_mb"] = {k: round(p.stat().st_size / 1e6, 2) for k, p in paths.items()}
        per: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(a.rounds):
            tps = {k: tiles_per_s(s, tiles, a.batch) for k, s in sess.items()}
            for k, v in tps.items():
                per[k].append(v)
                if k != "fp32":
                    per[f"ratio:{k}"].append(v / tps["fp32"])
            print(json.dumps({k: round(v[-1], 3) for k, v in per.items()}), file=sys.stderr, flush=True)
        med = lambda xs, nd=2: [round(statistics.median(xs), nd), [round(min(xs), nd), round(max(xs), nd)]]  # noqa
        out["tiles_per_s"] = {k: med(per[k]) for k in sess}
        out["int8_over_fp32"] = {k: med(per[f"ratio:{k}"], 3) for k in sess if k != "fp32"}
        if not a.no_profile:
            out["profile"] = {k: profile(paths[k], tiles[:a.batch], a.threads, tmp / f"prof_{k}")
                              for k in ("fp32", "fold") if k in paths}
        out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
