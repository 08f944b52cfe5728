"""ONNX inference speed: fp32 vs JAX (issue 5), int8 vs fp32 and fp32 vs sgemm (issue 19). One JSON line.

Same run, EfficientNet-Lite0 and ResNet50 at 299², batch 32, ``--threads`` intra-op threads:

- ``ort_tiles_per_s`` (fp32) and ``int8_tiles_per_s`` (``export.quantize`` static QDQ,
  calibrated on HER2ST C2 tissue tiles) keyed by backbone; ``int8_over_fp32``;
  ``jax_tiles_per_s`` and ``ort_over_jax`` (``--jax``);
- ``sgemm_gflops``: a 4096² float32 NumPy matrix product (BLAS kernel in ``blas``);
  ``resnet50_flop_efficiency_ort`` = ResNet50 fp32 tiles/s × 15.3 GFLOP / sgemm GFLOP/s;
- ``fp32_variants``: ResNet50 fp32 tiles/s under onnxruntime settings (optimisation level,
  threads, spinning, arena; ``--variants``), each as a ratio to the default session;
- the machine is shared, so every figure is measured ``--rounds`` times, interleaved (each
  round: sgemm, then every model), ratios are taken within a round, and the JSON gives the
  median with ``[min, max]`` over rounds;
- ``model_mb`` (fp32, int8), ``first_prediction_s`` (session creation + one tile);
- ``heldout``: HER2ST leave-one-section-out fold (``--heldout``): EfficientNet-Lite0
  (ImageNet weights, frozen) + NB heads trained on C2–C5, exported, quantised with
  calibration on C2–C5, gated on C6: mean PCC fp32 / int8, Δ, mean |Δ PCC| per gene;
- ``cpu_flags``: avx512f / avx512_vnni / amx_tile / amx_int8 / amx_bf16 as /proc/cpuinfo says.

Usage: python experiments/benchmarks/onnx_speed.py [--tiles 64] [--batch 32] [--threads 2]
       [--rounds 3] [--variants] [--jax] [--heldout] [--shared ../shared]
Unset OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE in the command line (env -u) for a fair sgemm.
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
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESNET50_GFLOP_299 = 15.3  # the figure for one 299² ResNet50 forward
BACKBONES = ("efficientnet_lite0", "resnet50")

from _common import cpu_flags  # noqa: E402  (this directory is on sys.path)


def sgemm_gflops(n: int = 4096, reps: int = 3) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def toy_model(backbone: str, genes: int = 14):
    from flax import nnx

    from stimage_jax import __version__
    from stimage_jax.ensemble.model import EnsembleModel
    from stimage_jax.features.registry import create_backbone
    from stimage_jax.nb.head import NBHead

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


VARIANTS = {  # name -> (optimisation level, threads, spinning, arena)
    "default": ("all", None, True, True),
    "extended_no_nchwc": ("extended", None, True, True),
    "basic": ("basic", None, True, True),
    "no_spinning": ("all", None, False, True),
    "no_arena": ("all", None, True, False),
    "threads_1": ("all", 1, True, True),
}
LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session(path: Path, threads: int, level: str = "all", spinning: bool = True,
            arena: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]  # "all" = + NCHWc blocked layout on x86
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = arena
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def tiles_per_s(sess, tiles: np.ndarray, batch: int) -> float:
    sess.run(["mu"], {"tiles": tiles[:batch]})  # warm up at the benchmark batch
    t = _timed(lambda: [sess.run(["mu"], {"tiles": tiles[s:s + batch]}) for s in range(0, len(tiles), batch)])
    return len(tiles) / t


def _summary(values: list[float], nd: int = 3) -> list:
    """median, [min, max] over rounds."""
    return [round(statistics.median(values), nd), [round(min(values), nd), round(max(values), nd)]]


def blas_info() -> dict:
    from threadpoolctl import threadpool_info

    info = [d for d in threadpool_info() if d.get("user_api") == "blas"]
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    return {"libraries": [{k: d.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
                          for d in info], "env": env}


def heldout_fold(shared: Path, workdir: Path) -> dict:
    """EfficientNet-Lite0 (ImageNet, frozen) + 3 NB members on C2–C5 → fp32 and int8 (calibrated
    on C2–C5) → the accuracy gate on held-out C6."""
    from _common import her2st_paths

    from export.quantize import quantize_with_gate
    from export.to_onnx import to_onnx_proto
    from stimage_jax.cli import main as cli
    from stimage_jax.ensemble.model import EnsembleModel

    paths = her2st_paths(shared, workdir, ["C2", "C3", "C4", "C5", "C6"])
    train = [str(paths[s]) for s in ("C2", "C3", "C4", "C5")]
    wd = workdir / "wd"
    if not (wd / "model").exists():
        assert cli(["--quiet", "train", "--data", *train, "--workdir", str(wd), "--backbone", "efficientnet_lite0",
                    "--members", "3", "--max-epochs", "100", "--lr", "1e-3"]) == 0
    proto = to_onnx_proto(EnsembleModel.load(wd))
    lines = []
    q, gate = quantize_with_gate(proto, train, validate=[paths["C6"]], force=True, report=lines.append)
    return {"train": ["C2", "C3", "C4", "C5"], "held_out": "C6", "genes": len(gate.genes),
            "mean_pcc_fp32": round(gate.mean_pcc_fp32, 4), "mean_pcc_int8": round(gate.mean_pcc_quantized, 4),
            "delta_mean_pcc": round(gate.mean_pcc_quantized - gate.mean_pcc_fp32, 4),
            "mean_abs_delta_pcc_per_gene": round(gate.mean_abs_delta_pcc, 4),
            "max_rel_mean_change": round(gate.max_rel_mean_change, 4), "gate_passed": gate.passed,
            "calibration_tiles": json.loads({p.key: p.value for p in q.metadata_props}["quantization"])
            ["calibration"]["tiles"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", action="store_true", help="also ResNet50 fp32 under other session settings")
    ap.add_argument("--jax", action="store_true", help="also JAX (jit) tiles/s")
    ap.add_argument("--heldout", action="store_true", help="HER2ST C2-C5 -> C6 fold: int8 vs fp32 mean PCC")
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED", str(Path(__file__).resolve().parents[3]
                                                                              / "shared")))
    ap.add_argument("--workdir", help="keep the HER2ST reads and the trained fold here (default: a temp dir)")
    args = ap.parse_args()
    from data_pipelines.slides import read_her2st
    from data_pipelines.tiles import spot_tiles
    from export.quantize import quantize_int8
    from export.to_onnx import export_onnx, graph_function

    out: dict = {"benchmark": "onnx_speed", "batch": args.batch, "tile_px": 299, "threads": args.threads,
                 "rounds": args.rounds, "onnxruntime": ort.__version__, "cpu_flags": cpu_flags(), "blas": blas_info()}
    tiles = np.random.default_rng(0).integers(0, 256, (args.tiles, 299, 299, 3), dtype=np.uint8)
    # int8 ranges from real tissue (speed hardly depends on them; accuracy: --heldout)
    c2 = read_her2st(Path(args.shared) / "data" / "her2st", "C2", require_image=True)
    calib = np.asarray(spot_tiles(c2, tile_px=299, progress=False))[:64]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, sizes, first = {}, {}, {}
        jax_tps = {}
        for name in BACKBONES:
            model = toy_model(name)
            if args.jax:
                import jax

                fn = jax.jit(graph_function(model))
                fn(tiles[:args.batch])[0].block_until_ready()  # compile (CPU: shift-add depthwise)
                t = _timed(lambda: [fn(tiles[s:s + args.batch])[0].block_until_ready()
                                    for s in range(0, args.tiles, args.batch)])
                jax_tps[name] = round(args.tiles / t, 2)
            fp32 = export_onnx(model, tmp / f"{name}.onnx")
            q = quantize_int8(fp32, calib)
            import onnx

            int8 = tmp / f"{name}.int8.onnx"
            onnx.save_model(q, int8)
            paths[name] = {"fp32": fp32, "int8": int8}
            sizes[name] = {k: round(p.stat().st_size / 1e6, 1) for k, p in paths[name].items()}
            for kind, p in paths[name].items():
                t0 = time.perf_counter()
                session(p, args.threads).run(["mu"], {"tiles": tiles[:1]})
                first[f"{name}:{kind}"] = round(time.perf_counter() - t0, 2)
            # int8 vs fp32 outputs on real tiles (random-weight toy heads: a fidelity check, not accuracy)
            a = session(fp32, args.threads).run(["mu"], {"tiles": calib[:32]})[0]
            b = session(int8, args.threads).run(["mu"], {"tiles": calib[:32]})[0]
            rel = np.abs(b - a) / np.abs(a)
            out.setdefault("int8_vs_fp32_mu_rel_err_her2st", {})[name] = {
                "median": float(f"{np.median(rel):.2g}"), "max": float(f"{rel.max():.2g}")}
        out["model_mb"], out["first_prediction_s"] = sizes, first
        if jax_tps:
            out["jax_tiles_per_s"] = jax_tps
        sess = {f"{n}:{k}": session(p, args.threads) for n in BACKBONES for k, p in paths[n].items()}
        variants = {v: session(paths["resnet50"]["fp32"], th or args.threads, lvl, spin, arena)
                    for v, (lvl, th, spin, arena) in VARIANTS.items() if v != "default"} if args.variants else {}
        per: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            g = sgemm_gflops()
            per.setdefault("sgemm", []).append(g)
            tps = {k: tiles_per_s(s, tiles, args.batch) for k, s in sess.items()}
            for k, v in tps.items():
                per.setdefault(k, []).append(v)
            for n in BACKBONES:
                per.setdefault(f"ratio:{n}", []).append(tps[f"{n}:int8"] / tps[f"{n}:fp32"])
            per.setdefault("eff", []).append(tps["resnet50:fp32"] * RESNET50_GFLOP_299 / g)
            per.setdefault("eff_int8_equiv", []).append(tps["resnet50:int8"] * RESNET50_GFLOP_299 / g)
            for v, s in variants.items():
                per.setdefault(f"var:{v}", []).append(tiles_per_s(s, tiles, args.batch) / tps["resnet50:fp32"])
            print(json.dumps({k: round(v[-1], 3) for k, v in per.items()}), file=sys.stderr, flush=True)
    out["sgemm_gflops"] = _summary(per["sgemm"], 1)
    out["ort_tiles_per_s"] = {n: _summary(per[f"{n}:fp32"], 2) for n in BACKBONES}
    out["int8_tiles_per_s"] = {n: _summary(per[f"{n}:int8"], 2) for n in BACKBONES}
    out["int8_over_fp32"] = {n: _summary(per[f"ratio:{n}"], 2) for n in BACKBONES}
    out["resnet50_flop_efficiency_ort"] = _summary(per["eff"])
    out["resnet50_int8_sgemm_equivalent"] = _summary(per["eff_int8_equiv"])  # int8 tiles/s in fp32-FLOP terms
    if variants:
        out["fp32_variants_over_default"] = {v: _summary(per[f"var:{v}"], 2) for v in variants}
    if jax_tps:
        out["ort_over_jax"] = {k: round(out["ort_tiles_per_s"][k][0] / jax_tps[k], 2) for k in jax_tps}
    if args.heldout:
        wd = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onnx_speed_"))
        out["heldout"] = heldout_fold(Path(args.shared), wd)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
