"""``stimage latent --model W --data X.h5ad --genes G1,G2 --out latent.png``."""

from __future__ import annotations

from stimage_jax.cli.common import add_overwrite, csv, quiet


def add_parser(sub, parents) -> None:
    la = sub.add_parser("latent", parents=list(parents), help="PCA of backbone features coloured by expression (PNG)")
    la.add_argument("--model", required=True)
    la.add_argument("--data", required=True)
    la.add_argument("--genes", required=True)
    la.add_argument("--out", required=True, help="PNG")
    add_overwrite(la)
    la.set_defaults(func=run)


def run(a) -> None:
    from data_pipelines.io import check_distinct, check_writable
    from data_pipelines.slides import read_h5ad
    from stimage_jax.explain.spot import latent_figure
    from stimage_jax.models import load_model

    from data_pipelines.errors import StimageError

    if not csv(a.genes):
        raise StimageError("--genes is empty: name one or more genes to colour the latent space by")
    check_writable(a.out, a.overwrite)
    check_distinct(a.out, a.data)
    model = load_model(a.model)
    path = latent_figure(read_h5ad(a.data), model, csv(a.genes), a.out, progress=not quiet(a))
    print(f"latent space (PCA of features) -> {path}")
