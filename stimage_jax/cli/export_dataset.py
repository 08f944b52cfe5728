"""``stimage export-dataset --data A.h5ad B.h5ad ... --out DIR``: spot tiles and counts as a
TFDS dataset in ArrayRecord format (:mod:`data_pipelines.tfds_dataset`), read without
TensorFlow by ``tfds.builder_from_directory(DIR).as_data_source("train")`` or through grain
(:func:`data_pipelines.grain_source.spot_loader`)."""

from __future__ import annotations

from pathlib import Path

from stimage_jax.cli.common import add_overwrite, existing_file, positive_float, positive_int, quiet


def add_parser(sub, parents) -> None:
    from data_pipelines.stain_normalisation import METHODS

    p = sub.add_parser("export-dataset", parents=list(parents),
                       help="write spot tiles, counts, sample ids and coordinates as a TFDS/ArrayRecord dataset")
    p.add_argument("--data", nargs="+", required=True, help=".h5ad files (one or more samples each)")
    p.add_argument("--out", required=True, help="the dataset's folder (TFDS prepared version: dataset_info.json, "
                                                "ArrayRecord shards, stimage.json)")
    p.add_argument("--genes", default="markers", help="markers | top-hvg:N | file:PATH | G1,G2,... (default markers)")
    p.add_argument("--tile-um", type=positive_float, default=None, help="tile side in µm (default: spot diameter)")
    p.add_argument("--tile-px", type=positive_int, default=299, help="tile side in px (default 299)")
    p.add_argument("--stain", default="none", choices=("none", *METHODS), help="stain-normalise tiles (default none)")
    p.add_argument("--stain-template", type=existing_file, default=None,
                   help="template H&E image for --stain (default: the first sample's image, low resolution)")
    add_overwrite(p, "replace an existing --out folder")
    p.set_defaults(func=run)


def run(a) -> None:
    from data_pipelines import keys
    from data_pipelines.errors import StimageError
    from data_pipelines.stain_normalisation import fit_stain
    from data_pipelines.tfds_dataset import export_dataset
    from data_pipelines.tiles import load_image, lowres_view, sample_image_path
    from stimage_jax.genes import select_genes
    from stimage_jax.pipeline import _load, split_samples

    if Path(a.out).exists() and not a.overwrite:
        raise StimageError(f"{a.out} exists; pass --overwrite to replace it")
    adatas = split_samples(_load(a.data))
    genes = select_genes(a.genes, adatas)
    stain = None
    if a.stain != "none":
        first = adatas[0]
        template = a.stain_template or sample_image_path(first, str(first.obs[keys.SAMPLE].iloc[0]))
        stain = fit_stain(a.stain, lowres_view(load_image(template)))
    out = export_dataset(adatas, genes, a.out, tile_um=a.tile_um, tile_px=a.tile_px, stain=stain,
                         progress=not quiet(a), overwrite=a.overwrite)
    print(f"wrote {sum(x.n_obs for x in adatas)} spots of {len(adatas)} sample(s), {len(genes)} genes, "
          f"{a.tile_px}px tiles -> {out}")
