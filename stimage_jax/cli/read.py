"""``stimage read her2st|visium|hest|xenium PATH --out ...``: spatial transcriptomics → .h5ad
(scanpy/squidpy-ready) or SpatialData ``.zarr``."""

from __future__ import annotations

from pathlib import Path

from export.runtime.options import positive_int
from stimage_jax.cli import read_xenium
from stimage_jax.cli.common import add_overwrite, csv

FORMATS = ["her2st", "visium", "hest", "xenium"]


def add_parser(sub, parents) -> None:
    r = sub.add_parser("read", parents=list(parents), help="read spatial transcriptomics into .h5ad or .zarr")
    r.add_argument("format", choices=FORMATS)
    r.add_argument("path", help="HER2ST root folder, a Space Ranger output folder, or a HEST-1k root")
    r.add_argument("--sections", default="C2,C3,C4,C5,C6", help="HER2ST sections (comma separated)")
    r.add_argument("--ids", help="HEST sample ids (comma separated; default: every st/<id>.h5ad)")
    r.add_argument("--out", required=True,
                   help="folder (her2st, hest) or file (visium): .h5ad, or .zarr for SpatialData")
    r.add_argument("--as", dest="out_format", choices=["h5ad", "zarr"], default="h5ad",
                   help="her2st/hest: write DIR/<id>.h5ad (default) or DIR/<id>.zarr (SpatialData)")
    r.add_argument("--image", help="Visium full-resolution image (default: the hires PNG)")
    r.add_argument("--sample-id", help="Visium sample id (default: the library id in the data)")
    r.add_argument("--allow-missing-image", action="store_true",
                   help="HER2ST/HEST: read counts of sections without an H&E image")
    r.add_argument("--image-root", help="store image paths relative to DIR when the images lie below it "
                                        "(resolved against --image-root / $STIMAGE_IMAGE_ROOT when read)")
    r.add_argument("--zarr-image-px", type=positive_int, metavar="PX",
                   help=".zarr outputs: store the H&E at most PX px on its longer side (default: full resolution)")
    read_xenium.add_arguments(r)
    add_overwrite(r)
    r.set_defaults(func=run)


def _write_each(names, read_one, out_dir, ext: str, overwrite: bool, image_px: int | None) -> None:
    """One output per section/sample in ``out_dir``; every target refused before reading any."""
    from data_pipelines.spatialdata_io import check_output, write_output

    targets = [Path(out_dir) / f"{n}.{ext}" for n in names]
    for t in targets:
        check_output(t, overwrite)
    for n, t in zip(names, targets):
        adata = read_one(n)
        write_output(adata, t, overwrite=overwrite, max_image_px=image_px)
        print(f"{n}: {adata.n_obs} spots x {adata.n_vars} genes -> {t}")


def run(a) -> None:
    from data_pipelines.scverse import set_image_root

    with set_image_root(a.image_root):
        _run(a)


def _run(a) -> None:
    from data_pipelines.errors import StimageError
    from data_pipelines.slides import hest_ids, read_hest, read_her2st, read_visium
    from data_pipelines.spatialdata_io import check_output, write_output

    if a.format == "xenium":
        return read_xenium.run(a)
    if a.format == "her2st":
        _write_each(csv(a.sections), lambda s: read_her2st(a.path, s, require_image=not a.allow_missing_image),
                    a.out, a.out_format, a.overwrite, a.zarr_image_px)
    elif a.format == "hest":
        ids = csv(a.ids) or hest_ids(a.path)
        if not ids:
            raise StimageError(f"no HEST samples under {Path(a.path) / 'st'} (expected st/<id>.h5ad)")
        _write_each(ids, lambda i: read_hest(a.path, i, require_image=not a.allow_missing_image),
                    a.out, a.out_format, a.overwrite, a.zarr_image_px)
    else:  # visium
        check_output(a.out, a.overwrite)
        adata = read_visium(a.path, image=a.image, sample_id=a.sample_id)
        write_output(adata, a.out, overwrite=a.overwrite, max_image_px=a.zarr_image_px)
        print(f"{adata.n_obs} spots x {adata.n_vars} genes -> {a.out}")
