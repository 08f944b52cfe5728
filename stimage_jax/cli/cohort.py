"""``stimage cohort predict --model M --slides SLIDES.csv --out DIR [--workers N | --dask ADDRESS |
--dask-local N]``: every slide of a cohort through the slide pipeline, resumable, fault-isolated
(:mod:`export.cohort`; exit 1 when a slide failed, each failure in DIR/manifest.csv)."""

from __future__ import annotations

# The JAX side's loader, named (not imported) so workers import it only for a training workdir.
JAX_LOADER = "stimage_jax.models:load_model"


def add_parser(sub, parents) -> None:
    from export.cohort.cli import add_predict_options

    p = sub.add_parser("cohort", parents=list(parents), help="predict a cohort of slides (locally or on Dask)")
    csub = p.add_subparsers(dest="cohort_command", required=True, parser_class=type(p))
    pr = csub.add_parser("predict", parents=list(parents), help="every slide of SLIDES.csv → DIR/cohort.h5ad")
    add_predict_options(pr)
    pr.set_defaults(func=run)


def run(a) -> int:
    from export.cohort.cli import run_predict

    return run_predict(a, loader=None if str(a.model).endswith(".onnx") else JAX_LOADER)
