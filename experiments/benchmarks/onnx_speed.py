"""ONNX vs JAX inference speed (issue 5): one JSON line.

Fields: ``ort_tiles_per_s`` and ``jax_tiles_per_s`` keyed by backbone (299², batch 32, same
run), ``sgemm_gflops`` (a 4096² float32 matrix product with NumPy, same run),
``resnet50_flop_efficiency_ort`` = ResNet50 ORT tiles/s × 15.3 GFLOP / sgemm_gflops,
model sizes (MB) and first-prediction latency (session creation + one tile, s).

Usage: python experiments/benchmarks/onnx_speed.py [--tiles 64] [--batch 32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import onnxruntime as ort
from flax import nnx

from export.to_onnx import export_onnx, graph_function
from stimage_jax import __version__
from stimage_jax.ensemble.model import EnsembleModel
from stimage_jax.features.registry import create_backbone
from stimage_jax.nb.head import NBHead

RESNET50_GFLOP_299 = 15.3  # the figure for one 299² ResNet50 forward


def sgemm_gflops(n: int = 4096, reps: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def toy_model(backbone: str, genes: int = 14) -> EnsembleModel:
    bb = create_backbone(backbone, rngs=nnx.Rngs(0))
    head = NBHead(bb.num_features, genes, rngs=nnx.Rngs(1))
    head.eval()
    cfg = {"genes": [f"G{i}" for i in range(genes)], "tile_um": 100.0, "tile_px": 299, "backbone": backbone,
           "members": 1, "fine_tune": False, "version": __version__, "training_samples": [],
           "nb_parameterisation": "mean-dispersion (log link): var = mu + mu^2/r", "train": {"loss": "nb"},
           "num_features": bb.num_features,
           "sources": [{"name": backbone, "kind": "backbone", "backbone": backbone, "num_features": bb.num_features}],
           "member_sources": [backbone]}
    return EnsembleModel(cfg, {backbone: bb}, [head])


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    out: dict = {"benchmark": "onnx_speed", "batch": args.batch, "tile_px": 299, "threads": args.threads,
                 "ort_tiles_per_s": {}, "jax_tiles_per_s": {}, "model_mb": {}, "first_prediction_s": {}}
    tiles = np.random.default_rng(0).integers(0, 256, (args.tiles, 299, 299, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("efficientnet_lite0", "resnet50"):
            model = toy_model(name)
            fn = jax.jit(graph_function(model))
            fn(tiles[:args.batch])[0].block_until_ready()  # compile (CPU: shift-add depthwise)
            t = _timed(lambda: [fn(tiles[s:s + args.batch])[0].block_until_ready()
                                for s in range(0, args.tiles, args.batch)])
            out["jax_tiles_per_s"][name] = round(args.tiles / t, 2)
            path = export_onnx(model, Path(tmp) / f"{name}.onnx")
            out["model_mb"][name] = round(path.stat().st_size / 1e6, 1)
            t0 = time.perf_counter()
            sess = session(path, args.threads)
            sess.run(["mu"], {"tiles": tiles[:1]})
            out["first_prediction_s"][name] = round(time.perf_counter() - t0, 2)
            sess.run(["mu"], {"tiles": tiles[:args.batch]})  # warm up at the benchmark batch
            t = _timed(lambda: [sess.run(["mu"], {"tiles": tiles[s:s + args.batch]})
                                for s in range(0, args.tiles, args.batch)])
            out["ort_tiles_per_s"][name] = round(args.tiles / t, 2)
    out["sgemm_gflops"] = round(sgemm_gflops(), 1)
    out["resnet50_flop_efficiency_ort"] = round(
        out["ort_tiles_per_s"]["resnet50"] * RESNET50_GFLOP_299 / out["sgemm_gflops"], 3)
    out["ort_over_jax"] = {k: round(out["ort_tiles_per_s"][k] / out["jax_tiles_per_s"][k], 2) for k in out["jax_tiles_per_s"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
