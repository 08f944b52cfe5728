"""Run an experiment config: ``python experiments/run.py her2st_hvg_loso [--workdir DIR]``.

Reads HER2ST from ``$STIMAGE_SHARED`` (default ``../shared``) in place, runs
:func:`stimage_jax.loso.run_loso` with the config, and prints one JSON line with the
per-method means (the full tables are in the workdir: metrics.csv, summary.md,
boxplot.png). Reruns resume finished folds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments.configs` without installing

from data_pipelines.io import write_h5ad  # noqa: E402
from data_pipelines.paths import shared_dir  # noqa: E402
from data_pipelines.slides import read_her2st  # noqa: E402
from stimage_jax.loso import run_loso  # noqa: E402
from stimage_jax.metrics import summarise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", help="module name under experiments/configs")
    ap.add_argument("--workdir", help="default runs/<config>")
    ap.add_argument("--shared", default=str(shared_dir()))
    args = ap.parse_args()
    cfg = dict(importlib.import_module(f"experiments.configs.{args.config}").CONFIG)
    wd = Path(args.workdir or f"runs/{args.config}")
    paths = []
    for s in cfg.pop("sections"):
        p = wd / "data" / f"{s}.h5ad"
        if not p.exists():
            write_h5ad(read_her2st(Path(args.shared) / "data" / "her2st", s, require_image=True), p)
        paths.append(p)
    t0 = time.perf_counter()
    table = run_loso(paths, wd, progress=False, **cfg)
    out = {"experiment": args.config, "minutes": round((time.perf_counter() - t0) / 60, 1)}
    for m, t in table.groupby("method", sort=False):
        s = summarise(t)
        out[m] = {k: round(s[k], 4) for k in ("mean_pcc", "median_pcc", "mean_spearman", "auc", "moran_bv", "iou")
                  if k in s}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
