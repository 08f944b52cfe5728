"""Explanation benchmark (issue 7): one JSON line on stdout, progress on stderr.

- ``lime_s_per_explanation``: LIME over nuclei with ``--samples`` (default 1000)
  perturbations through a 1-member EfficientNet-Lite0 model at 299 px (wall time per
  explanation, after one warm-up explanation that compiles); ``..._onnx`` the same
  through the exported model in onnxruntime (``stimage explain --model M.onnx``);
- ``nuclei_dice``, ``nuclei_aji``: the default nucleus segmentation on MoNuSeg test tiles
  (as ``experiments/benchmarks/nuclei.py``, first ``--monuseg-tiles`` tiles);
- the real-data check: on HER2ST C6, explain the ``--spots`` spots with the highest
  predicted FASN (fatty-acid synthase, a tumour marker in HER2+ breast cancer; ERBB2 is
  not among the paper's 14 markers) for FASN, and those with the highest predicted CD74
  (immune marker, MHC-II on antigen-presenting cells) for CD74; compare the areas (µm²)
  of nuclei with positive LIME weight (Mann–Whitney U, two-sided). The paper reports
  cancer nuclei larger than immune ones.

Usage: python experiments/benchmarks/explain.py [--workdir runs/bench_explain] [--spots 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from data_pipelines.slides import read_h5ad
from stimage_jax.ensemble.train import TrainConfig
from stimage_jax.explain.lime_nuclei import explain_lime
from stimage_jax.explain.spot import spot_tile
from stimage_jax.pipeline import predict, train

from _common import her2st_paths  # noqa: E402  (this directory is on sys.path)

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def _log(**kw) -> None:
    print(json.dumps(kw), file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bench_explain")
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED",
                                                        str(Path(__file__).resolve().parents[3] / "shared")))
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--spots", type=int, default=6, help="spots explained per marker")
    ap.add_argument("--monuseg-tiles", type=int, default=14)
    ap.add_argument("--onnx-spots", type=int, default=2, help="explanations also timed through onnxruntime")
    args = ap.parse_args()
    wd = Path(args.workdir)
    out: dict = {"benchmark": "explain", "samples": args.samples}

    paths = her2st_paths(args.shared, wd, SECTIONS)
    model = train([paths[s] for s in SECTIONS[:4]], wd / "model", genes="markers", backbone="efficientnet_lite0",
                  members=1, config=TrainConfig(lr=1e-4, max_epochs=200), progress=False)
    c6 = read_h5ad(paths["C6"])
    pred = predict(c6, model, progress=False)

    areas = {}
    times = []
    for gene in ("FASN", "CD74"):
        g = list(pred.var_names).index(gene)
        top = np.argsort(-np.asarray(pred.X)[:, g])[:args.spots]
        areas[gene] = []
        for i in top:
            spot = c6.obs_names[i]
            tile = spot_tile(c6, model, spot)
            if not times:  # warm-up: compiles the batch shape
                explain_lime(model, tile, gene, wd / "warmup", name=spot, num_samples=100)
            t = time.perf_counter()
            res = explain_lime(model, tile, gene, wd / "lime", name=spot, num_samples=args.samples)
            times.append(time.perf_counter() - t)
            tab = res["table"]
            areas[gene] += tab.loc[tab["weight"] > 0, "area_um2"].tolist()
            _log(gene=gene, spot=spot, nuclei=res["n_nuclei"], positive=int((tab["weight"] > 0).sum()),
                 seconds=round(times[-1], 1), r2=round(res["score"], 3))
    out["lime_s_per_explanation"] = round(float(np.median(times)), 2)
    if args.onnx_spots:
        # The same explanations through onnxruntime (LIME needs forward passes only).
        from export.predict import OnnxEnsemble
        from export.to_onnx import export_onnx

        onx_path = wd / "model.onnx"
        if not onx_path.exists():
            export_onnx(model, onx_path)
        onx = OnnxEnsemble(onx_path)
        g = list(pred.var_names).index("FASN")
        t_onnx = []
        for i in np.argsort(-np.asarray(pred.X)[:, g])[:args.onnx_spots]:
            spot = c6.obs_names[i]
            tile = spot_tile(c6, model, spot)
            t = time.perf_counter()
            explain_lime(onx, tile, "FASN", wd / "lime_onnx", name=spot, num_samples=args.samples)
            t_onnx.append(time.perf_counter() - t)
            _log(runtime="onnx", spot=spot, seconds=round(t_onnx[-1], 1))
        out["lime_s_per_explanation_onnx"] = round(float(np.median(t_onnx)), 2)
    from scipy.stats import mannwhitneyu

    a, b = np.asarray(areas["FASN"]), np.asarray(areas["CD74"])
    out["positive_nuclei_area_um2"] = {"FASN": {"n": int(a.size), "median": round(float(np.median(a)), 1)},
                                       "CD74": {"n": int(b.size), "median": round(float(np.median(b)), 1)}}
    out["fasn_over_cd74_median_area"] = round(float(np.median(a) / np.median(b)), 3)
    out["area_mannwhitney_p"] = float(mannwhitneyu(a, b, alternative="two-sided").pvalue)

    from data_pipelines.monuseg import list_monuseg, load_monuseg_pair
    from stimage_jax.cells.instance_metrics import aji, dice
    from stimage_jax.cells.nuclei import segment_nuclei

    pairs = list_monuseg(Path(args.shared) / "data" / "monuseg", "test")[:args.monuseg_tiles]
    d, j = [], []
    for img, xml in pairs:
        rgb, inst = load_monuseg_pair(img, xml)
        seg = segment_nuclei(rgb, mpp=0.25)
        d.append(dice(seg, inst))
        j.append(aji(seg, inst))
    out["nuclei_dice"] = round(float(np.mean(d)), 4)
    out["nuclei_aji"] = round(float(np.mean(j)), 4)
    out["monuseg_tiles"] = len(pairs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
