"""Ensemble benchmark (issue 4): one JSON line on stdout, progress on stderr.

- ``throughput``: training throughput (member-spot updates per second after each
  member's first epoch, which carries the compilation) for E = 1 and E = 10 members with the ``vmap``
  and ``loop`` strategies, for NB heads on cached features (1,280-d, as EfficientNet-Lite0)
  and for fine-tuning a small CNN end to end (``resnet_tiny`` on 64 px tiles);
- HER2ST leave-one-section-out (C2–C6, EfficientNet-Lite0 ImageNet features of 100 µm
  tiles, top-50 HVGs of each fold's training sections): per held-out section, the mean
  per-gene PCC and the mean NB NLL of every single member and of the ensemble (NB
  mixture), the spread (SD) of single-member PCC across seeds, and the 80 % interval
  coverage — both the inclusive count interval ``q_lo <= y <= q_hi`` (which discreteness
  pushes above nominal) and the non-randomised PIT coverage (Czado et al. 2009) — plus
  the NB-mixture CRPS.

Usage: python experiments/benchmarks/ensemble.py [--workdir runs/bench_ensemble] [--members 10]
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
from data_pipelines.stain_normalisation import fit_stain
from data_pipelines.tiles import load_image, lowres_view, sample_image_path, stain_tag
from export.runtime.moments import mixture_logpmf, predictive_interval
from stimage_jax.ensemble.model import STimageNet
from stimage_jax.ensemble.stacked import create_members, fit_ensemble
from stimage_jax.ensemble.train import TrainConfig
from stimage_jax.features.extract import weights_fingerprint
from stimage_jax.features.registry import DEFAULT_WEIGHTS, create_backbone
from stimage_jax.metrics import pearson_per_gene
from stimage_jax.nb.head import NBHead, init_head_from_data
from stimage_jax.pipeline import counts_matrix, sample_features, train
from stimage_jax.uncertainty_metrics import nb_mixture_crps_per_gene, pit_coverage

from _common import her2st_paths  # noqa: E402  (this directory is on sys.path)

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def _log(rec: dict) -> None:
    print(json.dumps(rec), file=sys.stderr, flush=True)


def _steady_rate(make, x, y, n_members: int, strategy: str, epochs: int, batch: int, set_train_mode=None):
    """(member-spot updates/s after each member's first epoch, seconds of the whole run).

    Epoch ends are timed through ``on_epoch``; the first epoch of each member carries the
    compilation and is left out, so the rate is the steady state a long run sees.
    """
    keys = jax.random.split(jax.random.key(0), n_members)
    stacked = create_members(make, keys)
    if isinstance(stacked, NBHead):
        init_head_from_data(stacked, x, y)
    cfg = TrainConfig(lr=1e-3, max_epochs=epochs, batch_size=batch, patience=10**6)
    ends: dict[int, list[float]] = {m: [] for m in range(n_members)}
    t = time.perf_counter()
    fit_ensemble(stacked, x, y, keys=keys, config=cfg, strategy=strategy, progress=False, mesh=None,
                 set_train_mode=set_train_mode, on_epoch=lambda m, e, _: ends[m].append(time.perf_counter()))
    total = time.perf_counter() - t
    # Both strategies run epoch by epoch over all members (loop steps them in turn inside
    # each batch), so one clock times them.
    steady, updates = ends[0][-1] - ends[0][0], n_members * len(x) * (epochs - 1)
    return updates / steady, total


def throughput(kind: str, n_members: int, strategy: str) -> dict:
    """Training throughput in member-spot updates per second (steady state)."""
    rng = np.random.default_rng(0)
    if kind == "heads":
        n, d, g, batch, epochs = 550, 1280, 50, 32, 8
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = rng.poisson(3.0, size=(n, g)).astype(np.float32)

        def make(r):
            return NBHead(d, g, rngs=r)
        mode = None
    else:
        n, g, batch, epochs = 128, 14, 16, 3
        x = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        y = rng.poisson(3.0, size=(n, g)).astype(np.float32)

        def make(r):
            bb = create_backbone("resnet_tiny", rngs=r)
            return STimageNet(bb, NBHead(bb.num_features, g, rngs=r))

        def mode(net):
            net.train()
            net.backbone.eval()
    rate, total = _steady_rate(make, x, y, n_members, strategy, epochs, batch, mode)
    rec = {"kind": kind, "members": n_members, "strategy": strategy,
           "member_spot_updates_per_s": round(rate, 1), "run_s_incl_compile": round(total, 2)}
    _log(rec)
    return rec


def nb_logpmf_np(y, mu, r):
    from scipy.special import gammaln
    return (gammaln(y + r) - gammaln(r) - gammaln(y + 1) + r * np.log(r / (r + mu)) + y * np.log(mu / (r + mu)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bench_ensemble")
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED",
                                                        str(Path(__file__).resolve().parents[3] / "shared")))
    ap.add_argument("--genes", default="top-hvg:50")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--stain", default="none", help="stain normalisation for the LOSO folds (template: C2)")
    args = ap.parse_args()
    wd = Path(args.workdir)
    out: dict = {"benchmark": "ensemble", "backend": jax.default_backend(), "devices": len(jax.devices()),
                 "genes": args.genes, "members": args.members, "stain": args.stain}

    if not args.skip_throughput:
        tp = [throughput(kind, e, s) for kind in ("heads", "fine_tune") for e in (1, 10) for s in ("vmap", "loop")]
        out["throughput"] = tp
        for kind in ("heads", "fine_tune"):
            r = {(t["members"], t["strategy"]): t["member_spot_updates_per_s"] for t in tp if t["kind"] == kind}
            out[f"{kind}_vmap_over_loop_e10"] = round(r[(10, "vmap")] / r[(10, "loop")], 2)
            out[f"{kind}_e10_over_e1_vmap"] = round(r[(10, "vmap")] / r[(1, "vmap")], 2)

    paths = her2st_paths(args.shared, wd, SECTIONS)
    adatas = {s: read_h5ad(p) for s, p in paths.items()}
    weights = DEFAULT_WEIGHTS["efficientnet_lite0"]
    bb = create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0), weights=weights)
    geometry = {"backbone": "efficientnet_lite0", "tile_um": 100.0, "tile_px": 299}
    template = sample_image_path(adatas["C2"], "C2")
    ref = None if args.stain == "none" else fit_stain(args.stain, lowres_view(load_image(template)))
    feats = dict(zip(SECTIONS, sample_features(bb, [adatas[s] for s in SECTIONS], geometry,
                                               weights_fingerprint(weights), wd / "cache", progress=False,
                                               stain=ref)))
    folds = []
    for test in SECTIONS:
        tr = [s for s in SECTIONS if s != test]
        t0 = time.perf_counter()
        model = train([adatas[s] for s in tr], wd / f"fold_{test}_{args.stain}", genes=args.genes,
                      members=args.members, backbone="efficientnet_lite0",
                      config=TrainConfig(lr=args.lr, max_epochs=args.max_epochs), cache_dir=wd / "cache",
                      progress=False, strategy="auto", min_coverage=0.0,
                      stain=None if args.stain == "none" else args.stain, stain_template=template)
        assert stain_tag(model.stain) == stain_tag(ref), "the fold's stain reference differs from the features'"
        truth = counts_matrix(adatas[test], model.genes).astype(np.float64)
        mu, r = (np.asarray(a, np.float64) for a in model.member_params(None, features=feats[test], progress=False))
        member_pcc = np.array([np.nanmean(pearson_per_gene(m, truth)) for m in mu])
        member_nll = np.array([-np.mean(nb_logpmf_np(truth, m, rr)) for m, rr in zip(mu, r)])
        ens_pcc = float(np.nanmean(pearson_per_gene(mu.mean(0), truth)))
        ens_nll = float(-np.mean(mixture_logpmf(truth, mu, r)))
        lo, hi = predictive_interval(mu, r, 0.8)
        single_lo, single_hi = predictive_interval(mu[:1], r[:1], 0.8)
        rec = {"test": test, "strategy": model.config["strategy"],
               "single_mean_pcc": round(float(member_pcc.mean()), 4),
               "single_pcc_sd_over_seeds": round(float(member_pcc.std()), 4),
               "ensemble_pcc": round(ens_pcc, 4),
               "single_mean_nll": round(float(member_nll.mean()), 4), "ensemble_nll": round(ens_nll, 4),
               "coverage80_inclusive": round(float(((truth >= lo) & (truth <= hi)).mean()), 4),
               "coverage80_inclusive_single": round(float(((truth >= single_lo) & (truth <= single_hi)).mean()), 4),
               "coverage80_pit": round(float(pit_coverage(truth, mu, r, 0.8).mean()), 4),
               "coverage80_pit_single": round(float(pit_coverage(truth, mu[:1], r[:1], 0.8).mean()), 4),
               "crps": round(float(nb_mixture_crps_per_gene(truth, mu, r).mean()), 4),
               "crps_single": round(float(nb_mixture_crps_per_gene(truth, mu[:1], r[:1]).mean()), 4),
               "best_epochs_median": float(np.median(model.config["best_epochs"])),
               "seconds": round(time.perf_counter() - t0, 1)}
        folds.append(rec)
        _log(rec)
    out["loso_folds"] = folds
    for k in ("single_mean_pcc", "ensemble_pcc", "single_mean_nll", "ensemble_nll", "single_pcc_sd_over_seeds",
              "coverage80_inclusive", "coverage80_inclusive_single", "coverage80_pit", "coverage80_pit_single",
              "crps", "crps_single"):
        out[f"loso_{k}"] = round(float(np.mean([f[k] for f in folds])), 4)
    out["ensemble_over_single_pcc"] = round(out["loso_ensemble_pcc"] / out["loso_single_mean_pcc"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
