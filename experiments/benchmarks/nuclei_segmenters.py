"""Nucleus segmenters on MoNuSeg 2018 test (7 tiles): classical vs cellpose trained here. One JSON line.

cellpose 3's CPnet is trained FROM SCRATCH on the 13 MoNuSeg train tiles
(``export.runtime.nuclei_cellpose.train_cellpose``: whole 1000² tiles, random 112-px crops
rescaled to nuclei of 30 px, AdamW) for ``--epochs`` epochs, or for a bounded time: a short
calibration run measures the seconds per epoch (counting the one-off flow computation, so it
undershoots on an idle machine), then the real run gets ``--minutes`` worth of epochs. Both segmenters run
at each tile's own µm/px and are scored with HoVer-Net's definitions
(``stimage_jax.cells.instance_metrics``): mean Dice, AJI, PQ, detection F1 over tiles, and
seconds per 1000² tile (segmentation only). cellpose is scored at its default flow check
(``flow_threshold`` 0.4) and without it (0.0: keeps masks whose flows disagree, which a
briefly trained net needs). The HoVer-Net-style figures come from ``cells.py`` (30 min of
training; not re-run here).

Measured (2026-11-30, 2 shared Xeon cores with AVX-512/VNNI/AMX; batch 8 of 112-px crops, widths
16-32-64-256 = 5.2M parameters, AdamW lr 0.02). Test Dice / AJI / PQ / detection F1:

- classical: 0.757 / 0.531 / 0.519 / 0.800 (0.4 s per tile)
- cellpose, ``--epochs 600`` = 1200 steps, 12 min at load ≈ 2: 0.786 / 0.586 / 0.603 / 0.844 with cellpose's
  default flow check (8.3 s per tile); 0.788 / 0.589 / 0.593 / 0.811 with it off
- cellpose, 112 epochs = 224 steps (2.7 min): 0.726 / 0.504 / 0.522 / 0.796 (flow check off: 0.759 / 0.529)
- cellpose, 34 epochs = 68 steps (15 min at load 5-6): flow check off 0.715 / 0.413; default 0.117 / 0.062
  (a briefly trained net's flows fail the check)

Usage: python experiments/benchmarks/nuclei_segmenters.py [--epochs 600 | --minutes 15] [--widths 16,32,64,256]
       [--lr 0.02] [--bsize 112] [--model M.pt (skip training)] [--save-model M.pt]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_flags  # noqa: E402

from data_pipelines.monuseg import list_monuseg, load_monuseg_pair, monuseg_mpp  # noqa: E402
from export.runtime.nuclei import DEFAULT_MPP, segment_nuclei  # noqa: E402
from export.runtime.nuclei_cellpose import (CellposeParams, load_cellpose_model,  # noqa: E402
                                            segment_nuclei_cellpose, train_cellpose)
from stimage_jax.cells.instance_metrics import instance_stats  # noqa: E402

KEYS = {"dice": "dice", "aji": "aji", "pq": "pq", "f1": "f1_detection"}


def load_split(root: Path, split: str):
    return [(im.stem, *load_monuseg_pair(im, xml), monuseg_mpp(xml) or DEFAULT_MPP) for im, xml in list_monuseg(root, split)]


def score(tiles, seg) -> dict:
    per, secs = [], []
    for _name, rgb, true, mpp in tiles:
        t = time.perf_counter()
        pred = seg(rgb, mpp)
        secs.append(time.perf_counter() - t)
        per.append(instance_stats(pred, true))
    out = {k: round(float(np.mean([p[v] for p in per])), 4) for k, v in KEYS.items()}
    out["s_per_tile"] = round(float(np.mean(secs)), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED",
                                                        str(Path(__file__).resolve().parents[3] / "shared")))
    ap.add_argument("--minutes", type=float, default=15.0, help="cellpose training budget")
    ap.add_argument("--widths", default="16,32,64,256")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--bsize", type=int, default=112)
    ap.add_argument("--epochs", type=int, help="train this many epochs instead of calibrating to --minutes")
    ap.add_argument("--model", help="a trained cellpose model: skip training")
    ap.add_argument("--save-model", help="keep the trained model here")
    a = ap.parse_args()
    root = Path(a.shared) / "data" / "monuseg"
    test = load_split(root, "test")
    res: dict = {"tiles": len(test)}
    res["classical"] = score(test, lambda rgb, mpp: segment_nuclei(rgb, mpp=mpp))
    print(json.dumps({"classical": res["classical"]}), file=sys.stderr, flush=True)
    if a.model:
        model_path = Path(a.model)
    else:
        train = load_split(root, "train")
        images, labels = [t[1] for t in train], [t[2] for t in train]
        mpp = float(np.mean([t[3] for t in train]))
        widths = tuple(int(w) for w in a.widths.split(","))
        tmp = Path(tempfile.mkdtemp(prefix="nuclei-seg-"))
        kw = dict(mpp=mpp, widths=widths, learning_rate=a.lr, bsize=a.bsize, overwrite=True)
        if a.epochs:
            epochs = a.epochs
        else:
            t = time.perf_counter()
            train_cellpose(images, labels, tmp / "calib.pt", epochs=3, **kw)
            # includes computing the flows once (~20 s): an overestimate, by several times on an idle machine
            s_epoch = (time.perf_counter() - t) / 3
            epochs = max(10, int(a.minutes * 60 / s_epoch))
        model_path = Path(a.save_model) if a.save_model else tmp / "cellpose.pt"
        t = time.perf_counter()
        r = train_cellpose(images, labels, model_path, epochs=epochs, **kw)
        res["cellpose_train"] = {"epochs": epochs, "steps": epochs * -(-len(images) // 8), "batch": 8,
                                 "crop_px": a.bsize, "widths": list(widths), "lr": a.lr,
                                 "minutes": round((time.perf_counter() - t) / 60, 1),
                                 "final_loss": round(float(np.mean(r["train_losses"][-5:])), 3),
                                 "diam_labels_px": round(r["diam_labels"], 1), "train_tiles": len(images)}
        print(json.dumps(res["cellpose_train"]), file=sys.stderr, flush=True)
    model = load_cellpose_model(model_path)
    res["cellpose_params_M"] = round(sum(p.numel() for p in model.model.net.parameters()) / 1e6, 2)
    for ft in (0.4, 0.0):
        params = CellposeParams(flow_threshold=ft)
        res[f"cellpose_flow{ft}"] = score(test, lambda rgb, mpp: segment_nuclei_cellpose(rgb, mpp=mpp, model=model,
                                                                                           params=params))
        print(json.dumps({f"cellpose_flow{ft}": res[f"cellpose_flow{ft}"]}), file=sys.stderr, flush=True)
    res["cpu"] = cpu_flags()
    res["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
