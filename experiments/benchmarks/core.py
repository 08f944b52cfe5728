"""Core benchmark (issue 2): one JSON line.

- ``features_tiles_per_s``: backbone forward throughput at 299², batch 32, per backbone;
- ``head_spot_updates_per_s``: NB-head training on cached features (spots × epochs / s);
- leave-one-section-out on HER2ST C2–C6 with EfficientNet-Lite0 features, top-50 HVGs
  chosen on each fold's training sections: mean per-gene PCC of the NB head and of the
  HEST ridge baseline on identical features and folds, per fold and overall; the NB head
  both as single members (mean over ``--members`` seeds, and their spread) and as the
  ``--members``-seed ensemble.

Usage: python experiments/benchmarks/core.py [--workdir runs/bench_core] [--genes top-hvg:50]
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
from flax import nnx

from data_pipelines.slides import read_h5ad
from stimage_jax.baselines import apply_ridge, fit_ridge
from stimage_jax.ensemble.stacked import fit_ensemble, stack_members
from stimage_jax.ensemble.train import TrainConfig
from stimage_jax.features.extract import extract_features, weights_fingerprint
from stimage_jax.features.registry import DEFAULT_WEIGHTS, create_backbone
from stimage_jax.genes import select_genes
from stimage_jax.metrics import pearson_per_gene
from stimage_jax.nb.head import NBHead, init_head_from_data
from stimage_jax.pipeline import counts_matrix, predict, sample_features, train

from _common import her2st_paths  # noqa: E402  (this directory is on sys.path)

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def forward_speed(name: str, n: int, batch: int = 32) -> float:
    bb = create_backbone(name, rngs=nnx.Rngs(0))
    tiles = np.random.default_rng(0).integers(0, 255, (n, 299, 299, 3), dtype=np.uint8)
    extract_features(bb, tiles[:batch], batch_size=batch, progress=False)  # compile
    t = time.perf_counter()
    extract_features(bb, tiles, batch_size=batch, progress=False)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bench_core")
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED", str(Path(__file__).resolve().parents[3] / "shared")))
    ap.add_argument("--genes", default="top-hvg:50")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--speed-tiles", type=int, default=64)
    ap.add_argument("--members", type=int, default=5, help="ensemble size compared with single members")
    args = ap.parse_args()
    wd = Path(args.workdir)
    out: dict = {"benchmark": "core", "backend": jax.default_backend(), "genes": args.genes}

    out["features_tiles_per_s"] = {b: round(forward_speed(b, args.speed_tiles), 2)
                                   for b in ("efficientnet_lite0", "resnet50")}

    paths = her2st_paths(args.shared, wd, SECTIONS)
    adatas = {s: read_h5ad(p) for s, p in paths.items()}
    weights = DEFAULT_WEIGHTS["efficientnet_lite0"]
    bb = create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0), weights=weights)
    geometry = {"backbone": "efficientnet_lite0", "tile_um": 100.0, "tile_px": 299}
    feats = dict(zip(SECTIONS, sample_features(bb, [adatas[s] for s in SECTIONS], geometry,
                                               weights_fingerprint(weights), wd / "cache", progress=False)))

    # head training throughput on cached features (all 910 spots, 14 markers, 20 epochs)
    genes = select_genes("markers", list(adatas.values()))
    x = np.concatenate([feats[s] for s in SECTIONS])
    y = np.concatenate([counts_matrix(adatas[s], genes) for s in SECTIONS])
    head = init_head_from_data(NBHead(x.shape[1], len(genes), rngs=nnx.Rngs(0)), x, y)

    def fit_head(epochs: int) -> None:  # one model: a one-member ensemble
        fit_ensemble(stack_members([head]), x, y, keys=jax.random.key(0)[None],
                     config=TrainConfig(max_epochs=epochs), strategy="vmap", progress=False, mesh=None)
    fit_head(1)  # compile
    t = time.perf_counter()
    fit_head(20)
    out["head_spot_updates_per_s"] = round(20 * len(x) / (time.perf_counter() - t), 1)

    folds = []
    for test in SECTIONS:
        tr = [s for s in SECTIONS if s != test]
        t0 = time.perf_counter()
        model = train([adatas[s] for s in tr], wd / f"fold_{test}", genes=args.genes, members=args.members,
                      backbone="efficientnet_lite0", config=TrainConfig(lr=args.lr, max_epochs=args.max_epochs),
                      cache_dir=wd / "cache", progress=False)
        g = model.genes
        truth = counts_matrix(adatas[test], g)
        mu, _ = model.member_params(None, features=feats[test], progress=False)
        member_pcc = [float(np.nanmean(pearson_per_gene(m, truth))) for m in mu]
        nb_mean = np.asarray(predict(adatas[test], model, progress=False, features=feats[test]).X)
        ridge = fit_ridge(np.concatenate([feats[s] for s in tr]),
                          np.concatenate([counts_matrix(adatas[s], g) for s in tr]), g)
        ridge_pred = apply_ridge(ridge, feats[test])
        pcc_nb, pcc_ridge = pearson_per_gene(nb_mean, truth), pearson_per_gene(ridge_pred, truth)
        folds.append({"test": test, "nb_single_mean_pcc": round(float(np.mean(member_pcc)), 4),
                      "nb_single_pcc_sd_over_seeds": round(float(np.std(member_pcc)), 4),
                      "nb_mean_pcc": round(float(np.nanmean(pcc_nb)), 4),
                      "ridge_mean_pcc": round(float(np.nanmean(pcc_ridge)), 4),
                      "best_epochs": model.config["best_epochs"], "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(folds[-1]), file=sys.stderr)
    out["loso_folds"] = folds
    out["members"] = args.members
    out["loso_nb_single_mean_pcc"] = round(float(np.mean([f["nb_single_mean_pcc"] for f in folds])), 4)
    out["loso_nb_mean_pcc"] = round(float(np.mean([f["nb_mean_pcc"] for f in folds])), 4)
    out["loso_ridge_mean_pcc"] = round(float(np.mean([f["ridge_mean_pcc"] for f in folds])), 4)
    out["nb_ensemble_over_ridge"] = round(out["loso_nb_mean_pcc"] / out["loso_ridge_mean_pcc"], 3)
    out["nb_single_over_ridge"] = round(out["loso_nb_single_mean_pcc"] / out["loso_ridge_mean_pcc"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
