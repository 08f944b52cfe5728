"""``stimage read her2st|visium|xenium PATH --out ...``: spatial transcriptomics → .h5ad."""

from __future__ import annotations

from pathlib import Path

from stimage_jax.cli import read_xenium
from stimage_jax.cli.common import add_overwrite, csv


def add_parser(sub, parents) -> None:
    r = sub.add_parser("read", parents=list(parents), help="read spatial transcriptomics into .h5ad")
    r.add_argument("format", choices=["her2st", "visium", "xenium"])
    r.add_argument("path", help="HER2ST root folder, or a Space Ranger output folder")
    r.add_argument("--sections", default="C2,C3,C4,C5,C6", help="HER2ST sections (comma separated)")
    r.add_argument("--out", required=True, help="folder (her2st) or .h5ad file (visium)")
    r.add_argument("--image", help="Visium full-resolution image (default: the hires PNG)")
    r.add_argument("--sample-id", help="Visium sample id (default: the library id in the data)")
    r.add_argument("--allow-missing-image", action="store_true",
                   help="HER2ST: read counts of sections without an H&E image")
    read_xenium.add_arguments(r)
    add_overwrite(r)
    r.set_defaults(func=run)


def run(a) -> None:
    from data_pipelines.io import check_writable, write_h5ad
    from data_pipelines.slides import read_her2st, read_visium

    if a.format == "xenium":
        return read_xenium.run(a)
    if a.format == "her2st":
        sections = csv(a.sections)
        targets = [Path(a.out) / f"{s}.h5ad" for s in sections]
        for t in targets:  # refuse before reading anything
            check_writable(t, a.overwrite)
        for s, t in zip(sections, targets):
            adata = read_her2st(a.path, s, require_image=not a.allow_missing_image)
            write_h5ad(adata, t, overwrite=a.overwrite)
            print(f"{s}: {adata.n_obs} spots x {adata.n_vars} genes -> {t}")
    else:
        check_writable(a.out, a.overwrite)
        adata = read_visium(a.path, image=a.image, sample_id=a.sample_id)
        write_h5ad(adata, a.out, overwrite=a.overwrite)
        print(f"{adata.n_obs} spots x {adata.n_vars} genes -> {a.out}")
