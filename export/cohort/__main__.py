"""``python -m export.cohort predict --model M.onnx --slides S.csv --out DIR [--workers N |
--dask ADDRESS | --dask-local N]``: the cohort path without JAX (exit 1 if a slide failed)."""

from __future__ import annotations

import argparse
import sys

from data_pipelines.errors import StimageError
from export.cohort.cli import add_predict_options, run_predict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.cohort", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict every slide of a cohort")
    add_predict_options(p)
    p.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        return run_predict(a)
    except StimageError as e:
        print(f"stimage: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
