"""ONNX runtime predictor: numpy, onnxruntime, anndata and the project's NumPy code — no JAX.

    python -m export.predict --model model.onnx --data X.h5ad --out P.h5ad
    python -m export.predict --model model.onnx --slide S.svs --out P.h5ad [--genes G1,G2]
    ... --out P.zarr writes SpatialData; --data also reads a .zarr; --image-root DIR re-points images

writes the same h5ad as ``stimage predict`` with a JAX model (X = mean, var_aleatoric,
var_epistemic, q_lo, q_hi, tissue coverage, provenance): both go through
:func:`export.runtime.prediction.predict_adata`. Execution providers: TensorRT, then
CUDA, when the installed onnxruntime has them (``onnxruntime-gpu``), else CPU.
"""

from __future__ import annotations

import argparse
import sys

from export.runtime.onnx_model import ONNX_FORMAT, OnnxEnsemble
from export.runtime.options import OneLineParser, add_prediction_options, quiet_logs, run_command

__all__ = ["OnnxEnsemble", "ONNX_FORMAT", "main", "run"]


def _csv(s: str | None) -> list[str]:
    return [g.strip() for g in s.split(",") if g.strip()] if s else []


def run(model, a) -> str:
    """Predict ``a.data`` or ``a.slide`` with any predictor and write ``a.out``; the
    summary line. Shared by ``stimage predict`` (JAX or ONNX models) and this module."""
    from data_pipelines.scverse import set_image_root

    with set_image_root(getattr(a, "image_root", None)):
        return _run(model, a)


def _run(model, a) -> str:
    from data_pipelines.spatialdata_io import check_output, write_output
    from export.runtime.prediction import predict_adata, slide_to_files

    if a.slide:
        pred, maps = slide_to_files(a.slide, model, a.out, mpp=a.mpp, heatmap_genes=_csv(a.genes),
                                    min_coverage=a.min_coverage, batch_size=a.batch_size, overwrite=a.overwrite,
                                    progress=not a.quiet, interval=a.interval,
                                    zarr_image_px=getattr(a, "zarr_image_px", None), smooth=a.smooth)
        lines = [f"heatmap -> {p}" for p in maps]
        what = "tiles"
    else:
        from data_pipelines.slides import read_h5ad

        check_output(a.out, a.overwrite, [a.data])
        pred = predict_adata(read_h5ad(a.data), model, batch_size=a.batch_size, progress=not a.quiet,
                             interval=a.interval, smooth=a.smooth)
        write_output(pred, a.out, overwrite=a.overwrite, max_image_px=getattr(a, "zarr_image_px", None))
        lines, what = [], "spots"
    prov = pred.uns["stimage"]["prediction"]
    how = ", ".join([prov.get("runtime", "")] + list(prov.get("providers", [])))
    return "\n".join(lines + [f"predicted {pred.n_vars} genes for {pred.n_obs} {what} ({how}) -> {a.out}"])


def add_image_root(ap: argparse.ArgumentParser) -> None:
    """--image-root: where relative or moved image references of --data are looked up;
    --zarr-image-px: the H&E size in a SpatialData (.zarr) output."""
    from export.runtime.options import positive_int

    ap.add_argument("--image-root", help="folder the --data file's image references are resolved against "
                                         "(default: the file's own folder; also $STIMAGE_IMAGE_ROOT)")
    ap.add_argument("--zarr-image-px", type=positive_int, metavar="PX",
                    help="--out X.zarr: store the H&E at most PX px on its longer side (default: full resolution)")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m export.predict", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="exported .onnx file")
    add_prediction_options(ap)
    add_image_root(ap)
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its one line (or --help)
        return e.code if isinstance(e.code, int) else 0
    quiet_logs(a.quiet)
    return run_command(lambda args: print(run(OnnxEnsemble(args.model), args)), a, quiet=a.quiet)


if __name__ == "__main__":
    sys.exit(main())
