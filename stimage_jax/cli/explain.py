"""``stimage explain --model M (--data X --spot ID | --tile PNG) --gene G --out DIR``."""

from __future__ import annotations

from pathlib import Path

from data_pipelines.errors import StimageError
from export.runtime.segmenters import add_nuclei_options
from stimage_jax.cli.common import positive_int, quiet


def add_parser(sub, parents) -> None:
    ex = sub.add_parser("explain", parents=list(parents), help="why a spot gets its prediction (saliency, LIME)")
    ex.add_argument("--model", required=True, help="training workdir, or an exported .onnx (LIME only)")
    ex.add_argument("--data", help=".h5ad holding the spot")
    ex.add_argument("--spot", help="obs name of the spot to explain")
    ex.add_argument("--tile", help="or a tile image of the model's size")
    ex.add_argument("--gene", required=True)
    ex.add_argument("--method", default="lime", choices=["lime", "saliency"])
    ex.add_argument("--samples", type=positive_int, default=None,
                    help="perturbations (LIME, default 1000) or noisy copies (SmoothGrad, default 25)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--out", required=True, help="output folder")
    add_nuclei_options(ex)  # LIME's segments are these nuclei
    ex.set_defaults(func=run)


def run(a) -> None:
    from data_pipelines.slides import read_h5ad
    from stimage_jax.explain.spot import explain_saliency, read_tile, spot_tile
    from stimage_jax.models import is_onnx, load_model

    if bool(a.data) == bool(a.tile):
        raise StimageError("give --data with --spot, or --tile")
    if a.data and not a.spot:
        raise StimageError("--data needs --spot ID (an obs name)")
    if is_onnx(a.model) and a.method != "lime":
        raise StimageError("saliency needs gradients: give the training workdir, not the .onnx file")
    from data_pipelines.io import check_writable

    check_writable(Path(a.out) / ".stimage-explain", overwrite=True)  # the folder can be made, before any work
    if a.method != "lime" and (a.nuclei != "classical" or a.cellpose_model):
        raise StimageError("--nuclei/--cellpose-model choose LIME's segments: they need --method lime")
    from export.runtime.segmenters import segmenter_from_args

    segment = segmenter_from_args(a) if a.method == "lime" else None  # a bad model file stops here
    model = load_model(a.model)  # LIME is forward passes only: an .onnx runs them fastest on CPU
    if a.gene not in model.genes:
        raise StimageError(f"gene {a.gene!r} is not predicted by this model ({', '.join(model.genes[:5])}, ...)")
    if a.tile:
        tile, name = read_tile(a.tile, model.tile_px), Path(a.tile).stem
    else:
        tile, name = spot_tile(read_h5ad(a.data), model, a.spot), a.spot
    if a.method == "saliency":
        res = explain_saliency(model, tile, a.gene, a.out, name=name, seed=a.seed, n_samples=a.samples or 25)
        print(f"SmoothGrad of {a.gene} (predicted mean {res['mean']:.2f}) -> {res['png']}, {res['npy']}")
    else:
        from stimage_jax.explain.lime_nuclei import explain_lime

        res = explain_lime(model, tile, a.gene, a.out, name=name, seed=a.seed, num_samples=a.samples or 1000,
                           progress=not quiet(a), segment=segment)
        print(f"LIME over {res['n_nuclei']} nuclei for {a.gene} (predicted {res['value']:.3f}): "
              f"{res['note']}-> {res['png']}, {res['csv']}")
