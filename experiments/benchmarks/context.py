"""Spatial context, global context, test-time augmentation and smoothing (issue 21): one JSON line.

Leave-one-section-out on HER2ST C2–C6 (top-50 HVGs chosen per fold on its training
sections, 5-member NB ensembles, EfficientNet-Lite0 features, tiles under 70 % tissue
dropped) through ``stimage benchmark``'s harness, every method on identical folds, for each
of ``--seeds``: per method the mean PCC over folds and seeds (± SD over folds, ± SD over
seeds), PIT coverage of the 80 % interval, the ratio to the plain ensemble; and the
prediction time per spot of each feature path (backbone on the tile; + neighbour pooling;
× 8 dihedral views; + the global field cut, resized and through the backbone) on C6's tiles.

Global context (``*_global*`` methods) at each of ``--global-um`` (µm; the first in
``WORKDIR/seed<s>`` with every method, each further one in ``WORKDIR/um<UM>/seed<s>`` with
``stimage`` and the global methods, reported as ``<method>@<UM>um``). Tiles and frozen
features are cached by content in one ``--cache`` shared by all seeds and scales.

Usage: python experiments/benchmarks/context.py [--workdir runs/bench_ctx] [--seeds 0,1,2]
           [--methods stimage,stimage_tta_smooth,stimage_global,...] [--global-um 300,500]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from data_pipelines import keys
from data_pipelines.slides import read_h5ad
from data_pipelines.tiles import spot_tiles
from export.runtime.context import context_features, neighbour_index
from stimage_jax.features.extract import extract_features
from stimage_jax.features.tta import tta_features
from stimage_jax.features.global_context import field_tiles
from stimage_jax.loso import CONTEXT_METHODS, GLOBAL_METHODS, run_loso
from stimage_jax.ensemble.train import TrainConfig

from _common import cpu_flags, her2st_paths  # noqa: E402  (this directory is on sys.path)

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
METHODS = ("stimage",) + CONTEXT_METHODS




def per_spot_times(workdir: Path, c6, global_ums=()) -> dict:
    """Seconds per spot: features of the tile, + neighbour context, with 8-view TTA; and,
    cut from the image (no tile cache) + features, the spot tile alone vs the tile and each
    global field."""
    from stimage_jax.ensemble.model import EnsembleModel

    model = EnsembleModel.load(workdir / "folds" / "C6" / "stimage")
    src = model.sources[0]
    bb = model.backbones[src["name"]]
    tiles = spot_tiles(c6, tile_um=model.config["tile_um"], tile_px=model.config["tile_px"], progress=False)
    extract_features(bb, tiles[:32], progress=False)  # compile
    t = time.perf_counter()
    f = extract_features(bb, tiles, progress=False)
    base = time.perf_counter() - t
    t = time.perf_counter()
    context_features(f, neighbour_index(c6.obsm[keys.SPATIAL], c6.obs[keys.SAMPLE].astype(str).to_numpy(), 6))
    ctx = time.perf_counter() - t
    t = time.perf_counter()
    tta_features(bb, tiles, 8, None, progress=False)
    tta = time.perf_counter() - t
    n = len(tiles)
    out = {"spots": n, "plain_s_per_spot": base / n, "ctx_s_per_spot": (base + ctx) / n,
           "ctx_ratio": (base + ctx) / base, "tta8_s_per_spot": tta / n, "tta8_ratio": tta / base}
    if global_ums:
        px = model.config["tile_px"]

        def cut_and_embed(um: float) -> float:
            t = time.perf_counter()
            extract_features(bb, field_tiles(c6, um, px, cache_dir=None, progress=False), progress=False)
            return time.perf_counter() - t

        own = cut_and_embed(model.config["tile_um"])
        out["tile_cut_and_features_s_per_spot"] = own / n
        for um in global_ums:
            g = cut_and_embed(um)
            out[f"global{um:g}_s_per_spot"] = (own + g) / n
            out[f"global{um:g}_ratio"] = (own + g) / own
    return out


def summarise_methods(per_seed: dict, methods, suffix: str = "") -> dict:
    """method → mean PCC over folds and seeds, SDs over folds and seeds, per fold, PIT."""
    out, base = {}, None
    for m in methods:
        fold_means = np.array([[t[t["method"] == m].groupby("fold")["pcc"].mean()[s] for s in SECTIONS]
                               for t in per_seed.values()])  # (seeds, folds)
        pit = float(np.mean([t[t["method"] == m]["pit_coverage"].mean() for t in per_seed.values()]))
        mean = float(fold_means.mean())
        base = mean if m == "stimage" else base
        out[m + suffix] = {"mean_pcc": round(mean, 4),
                           "sd_over_folds": round(float(fold_means.mean(0).std(ddof=1)), 4),
                           "sd_over_seeds": round(float(fold_means.mean(1).std(ddof=1)), 4) if len(per_seed) > 1
                           else None,
                           "per_fold": {s: round(float(v), 4) for s, v in zip(SECTIONS, fold_means.mean(0))},
                           "per_seed": [round(float(v), 4) for v in fold_means.mean(1)],
                           "pit_coverage_80": round(pit, 4)}
    if base:
        for m in methods:
            out[m + suffix]["ratio_to_stimage"] = round(out[m + suffix]["mean_pcc"] / base, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bench_ctx")
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED",
                                                       str(Path(__file__).resolve().parents[3] / "shared")))
    ap.add_argument("--data", help="folder of C2–C6 .h5ad (default: read from --shared into WORKDIR/data)")
    ap.add_argument("--genes", default="top-hvg:50")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--context-k", type=int, default=6)
    ap.add_argument("--smooth", type=float, default=0.5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--global-um", default="500", help="comma separated field sizes (µm) for *_global* methods")
    ap.add_argument("--global-pca", type=int, default=64)
    ap.add_argument("--cache", help="tiles and features, shared by seeds and scales (default WORKDIR/cache)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--timing-global-um", help="field sizes (µm) to time (default: --global-um)")
    args = ap.parse_args()
    wd = Path(args.workdir)
    paths = ({s: Path(args.data) / f"{s}.h5ad" for s in SECTIONS} if args.data
             else her2st_paths(args.shared, wd, SECTIONS))
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    ums = [float(u) for u in args.global_um.split(",")]
    cache = Path(args.cache) if args.cache else wd / "cache"
    glob_methods = [m for m in methods if m in GLOBAL_METHODS]
    out = {"benchmark": "context", "backend": jax.default_backend(), "cpu_flags": cpu_flags(), "genes": args.genes,
           "members": args.members, "seeds": seeds, "context_k": args.context_k, "smooth": args.smooth,
           "global_um": ums, "global_pca": args.global_pca, "methods": {}}
    for i, um in enumerate(ums):
        ms = methods if i == 0 else ["stimage", *glob_methods]
        if i and not glob_methods:
            break
        per_seed = {}
        for seed in seeds:
            run_wd = wd / f"seed{seed}" if i == 0 else wd / f"um{um:g}" / f"seed{seed}"
            per_seed[seed] = run_loso([paths[s] for s in SECTIONS], run_wd, methods=ms, genes=args.genes,
                                      members=args.members, config=TrainConfig(), seed=seed, progress=False,
                                      context_k=args.context_k, smooth=args.smooth, global_um=um,
                                      global_pca=args.global_pca, cache_dir=cache)
        out["methods"].update(summarise_methods(per_seed, ms if i == 0 else glob_methods + ["stimage"],
                                                "" if i == 0 else f"@{um:g}um"))
        if i:
            out["methods"].pop(f"stimage@{um:g}um")  # the same base ensemble as the first scale's
    if not args.skip_timing:
        timing_ums = [float(u) for u in args.timing_global_um.split(",")] if args.timing_global_um else ums
        out["prediction_time"] = per_spot_times(wd / f"seed{seeds[0]}", read_h5ad(paths["C6"]),
                                                timing_ums if glob_methods else ())
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
