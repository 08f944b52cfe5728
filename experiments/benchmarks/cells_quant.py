"""INT8 cell model on MoNuSeg (issue 19): accuracy gate and speed, fp32 vs int8. One JSON line.

Takes a trained cell model (``experiments/benchmarks/cells.py --workdir W`` makes one),
exports it at ``--size``², quantises it with ``stimage_jax.cells.quantize`` calibrated on
``--calibration-tiles`` windows of the 13 MoNuSeg ``train`` tiles, and gates it on the 7
``test`` tiles (held out; their XML annotations give the Dice/AJI of both models). Reports
the gate's figures, both models' windows/s at batch ``--batch`` (``--rounds`` interleaved
rounds: median and [min, max] of the int8/fp32 ratio), model sizes and the CPU flags.

Usage: python experiments/benchmarks/cells_quant.py --model W [--size 256] [--calibration-tiles 64]
       [--batch 8] [--rounds 5] [--threads 2] [--shared ../shared] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_flags  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--calibration-tiles", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED", str(Path(__file__).resolve().parents[3] / "shared")))
    ap.add_argument("--out-dir", help="keep fp32.onnx / int8.onnx here (default a temporary folder)")
    a = ap.parse_args()

    import onnx
    import onnxruntime as ort

    from export.quantize import save
    from stimage_jax.cells.hovernet import cells_onnx_proto
    from stimage_jax.cells.model import CellModel
    from stimage_jax.cells.quantize import quantize_cells_with_gate

    root = Path(a.shared) / "data" / "monuseg"
    out = Path(a.out_dir or tempfile.mkdtemp(prefix="cells_quant-"))
    out.mkdir(parents=True, exist_ok=True)
    model = CellModel.load(a.model)
    fp32 = out / "fp32.onnx"
    onnx.save_model(cells_onnx_proto(model.net, size=a.size, metadata={"type_names": model.type_names}), fp32)
    t = time.perf_counter()
    q, gate = quantize_cells_with_gate(fp32, [root / "train"], validate=[root / "test"],
                                       n_tiles=a.calibration_tiles, force=True, progress=False,
                                       report=lambda s: print(s, file=sys.stderr))
    quant_s = time.perf_counter() - t
    int8 = save(q, out / "int8.onnx", overwrite=True)

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                for k, p in (("fp32", fp32), ("int8", int8))}
    x = np.random.default_rng(0).integers(0, 256, (a.batch, a.size, a.size, 3), dtype=np.uint8)
    rates: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"tiles": x})
    for _ in range(a.rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"tiles": x})
            rates[k].append(a.batch / (time.perf_counter() - t))
    ratio = [i / f for i, f in zip(rates["int8"], rates["fp32"])]
    print(json.dumps({
        "backbone": model.config.get("backbone"), "size": a.size, "batch": a.batch, "threads": a.threads,
        "calibration": "MoNuSeg train (13 tiles)", "calibration_tiles": a.calibration_tiles,
        "gate_on": "MoNuSeg test (7 tiles, held out)", "gate": gate.to_dict() | {"images": len(gate.images)},
        "quantise_and_gate_s": round(quant_s, 1),
        "fp32_windows_per_s": round(statistics.median(rates["fp32"]), 2),
        "int8_windows_per_s": round(statistics.median(rates["int8"]), 2),
        "int8_over_fp32": round(statistics.median(ratio), 3),
        "int8_over_fp32_range": [round(min(ratio), 3), round(max(ratio), 3)],
        "model_mb": {"fp32": round(fp32.stat().st_size / 1e6, 2), "int8": round(int8.stat().st_size / 1e6, 2)},
        "load_avg": os.getloadavg()[0], "cpu_flags": cpu_flags()}))


if __name__ == "__main__":
    main()
