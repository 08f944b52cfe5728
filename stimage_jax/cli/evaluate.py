"""``stimage evaluate --pred P.h5ad --truth X.h5ad --out metrics.csv [--plot ...]``
(library: :func:`stimage_jax.evaluation.evaluate_files`)."""

from __future__ import annotations

from stimage_jax.cli.common import add_overwrite, csv


def add_parser(sub, parents) -> None:
    e = sub.add_parser("evaluate", parents=list(parents), help="score predictions against observed counts")
    e.add_argument("--pred", required=True)
    e.add_argument("--truth", required=True)
    e.add_argument("--out", required=True, help="metrics CSV, one row per sample and gene")
    e.add_argument("--plot", help="PNG of observed vs predicted maps")
    e.add_argument("--plot-genes", help="genes to plot (default: the two best by PCC)")
    e.add_argument("--plot-uncertainty", metavar="GENE[,GENE]",
                   help="PNG per gene of observed, predicted mean, aleatoric and epistemic SD maps, "
                        "written next to --out as <out stem>_uncertainty_<GENE>.png")
    e.add_argument("--plot-calibration", metavar="PATH.png",
                   help="PNG of observed vs nominal coverage (quantile interval and PIT) over levels "
                        "0.1-0.95; needs the members' NB parameters (stimage predict --data keeps them)")
    add_overwrite(e)
    e.set_defaults(func=run)


def run(a) -> None:
    from stimage_jax.evaluation import evaluate_files

    report = evaluate_files(a.pred, a.truth, a.out, overwrite=a.overwrite, plot=a.plot,
                            plot_genes=csv(a.plot_genes) or None, uncertainty_genes=csv(a.plot_uncertainty) or None,
                            calibration=a.plot_calibration)
    print("\n".join(report.lines()))
