"""``stimage benchmark --data DIR --workdir W``: leave-one-sample-out, every method on the
same folds (library: :func:`stimage_jax.loso.run_loso`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_pipelines.errors import StimageError
from data_pipelines.tissue import DEFAULT_MIN_COVERAGE
from stimage_jax.cli.common import add_overwrite, csv, positive_float, positive_int, quiet, unit_fraction


def _protocol(text: str) -> str:
    if text != "loso":
        raise argparse.ArgumentTypeError(f"unknown protocol {text!r}; only 'loso' (leave one sample out) exists")
    return text


def add_parser(sub, parents) -> None:
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.loso import DEFAULT_METHODS, METHODS

    t = TrainConfig()
    b = sub.add_parser("benchmark", parents=list(parents),
                       help="leave-one-sample-out: STimage (ensemble, single), ridge and MSE on the same folds")
    b.add_argument("--data", nargs="+", required=True, help=".h5ad files, or one folder of them")
    b.add_argument("--protocol", default="loso", type=_protocol, help="loso (leave one sample out)")
    b.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    b.add_argument("--context-k", type=positive_int, default=6,
                   help="*_ctx / *_smooth methods: neighbours of a spot (nearest spots of its sample)")
    b.add_argument("--smooth", type=unit_fraction, default=0.5,
                   help="*_smooth methods: weight of the neighbours' mean in each member's NB mean")
    b.add_argument("--global-um", type=positive_float, default=500.0,
                   help="*_global* methods: side in µm of the field around each spot (resized to the backbone's "
                        "input: a lower-magnification view)")
    b.add_argument("--global-pca", type=positive_int, default=64,
                   help="*_global_pca* methods: principal components of the field's features (fitted per fold on "
                        "its training samples)")
    b.add_argument("--samples", help="hold out only these samples (default: each in turn)")
    b.add_argument("--workdir", required=True)
    b.add_argument("--genes", default="top-hvg:50", help="chosen per fold on its training samples")
    b.add_argument("--backbone", default="efficientnet_lite0")
    b.add_argument("--members", type=positive_int, default=5)
    b.add_argument("--tile-um", type=positive_float)
    b.add_argument("--tile-px", type=positive_int, default=299)
    b.add_argument("--lr", type=positive_float, default=t.lr)
    b.add_argument("--max-epochs", type=positive_int, default=t.max_epochs)
    b.add_argument("--patience", type=positive_int, default=t.patience)
    b.add_argument("--min-coverage", type=unit_fraction, default=DEFAULT_MIN_COVERAGE)
    b.add_argument("--seed", type=int, default=0)
    add_overwrite(b, "discard folds of a different run in --workdir")
    b.set_defaults(func=run)


def run(a) -> None:
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.loso import run_loso
    from stimage_jax.metrics import summarise

    if not csv(a.methods):
        raise StimageError("--methods is empty")
    from data_pipelines.spatialdata_io import is_zarr

    one = a.data[0] if len(a.data) == 1 else None
    data = one if one is not None and Path(one).is_dir() and not is_zarr(one) else a.data
    table = run_loso(data, a.workdir, methods=csv(a.methods), genes=a.genes, backbone=a.backbone,
                     members=a.members, config=TrainConfig(lr=a.lr, max_epochs=a.max_epochs, patience=a.patience),
                     tile_um=a.tile_um, tile_px=a.tile_px, seed=a.seed, min_coverage=a.min_coverage,
                     samples=csv(a.samples) or None, progress=not quiet(a), overwrite=a.overwrite,
                     context_k=a.context_k, smooth=a.smooth, global_um=a.global_um, global_pca=a.global_pca)
    for m, t in table.groupby("method", sort=False):
        s = summarise(t)
        print(f"{m}: mean PCC {s['mean_pcc']:.3f} over {t['fold'].nunique()} held-out sample(s), "
              f"{s['n_pcc_positive']}/{s['rows']} gene rows with PCC > 0")
    wd = Path(a.workdir)
    print(f"-> {wd / 'metrics.csv'}, {wd / 'summary.md'}, {wd / 'boxplot.png'}")
