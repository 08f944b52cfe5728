"""Options and the run of ``cohort predict``, shared by ``python -m export.cohort`` (JAX-free)
and ``stimage cohort predict``."""

from __future__ import annotations

import argparse

from data_pipelines.tissue import DEFAULT_MIN_COVERAGE
from export.runtime.options import open_fraction, positive_int, unit_fraction

__all__ = ["add_predict_options", "run_predict"]


def add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported .onnx (or, with `stimage`, a training workdir)")
    p.add_argument("--slides", required=True, help="CSV slide_id,path[,mpp] (paths relative to the CSV allowed)")
    p.add_argument("--out", required=True, help="output folder (slides/, manifest.csv, cohort.h5ad)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, default=1, help="local worker processes (default 1)")
    where.add_argument("--dask", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--dask-local", type=positive_int, metavar="N", help="start a Dask LocalCluster of N workers")
    p.add_argument("--aggregate", choices=("mean", "sum", "median"), default="mean",
                   help="pseudo-bulk over a slide's tissue tiles (default mean)")
    p.add_argument("--genes", help="heatmap PNG per gene and slide (comma separated)")
    p.add_argument("--min-coverage", type=unit_fraction, default=DEFAULT_MIN_COVERAGE)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--interval", type=open_fraction, default=0.8)


def run_predict(a, loader: str | None = None) -> int:
    from export.cohort.run import predict_cohort

    genes = [g.strip() for g in (a.genes or "").split(",") if g.strip()]
    r = predict_cohort(a.model, a.slides, a.out, workers=a.workers, dask=a.dask, dask_local=a.dask_local,
                       aggregate=a.aggregate, min_coverage=a.min_coverage, batch_size=a.batch_size,
                       interval=a.interval, genes=genes, loader=loader, progress=not getattr(a, "quiet", False))
    for sid, res in r["results"].items():
        if res["status"] != "ok":
            print(f"failed: {sid}: {res['error']}")
    print(f"{r['ok']} ok ({r['skipped']} already done), {r['failed']} failed in {r['seconds']:.1f} s "
          f"-> {r['manifest']}" + (f", {r['cohort']}" if r["cohort"] else ""))
    return 1 if r["failed"] else 0
