"""``stimage export-onnx --model W --out M.onnx``: a trained ensemble → one ONNX file."""

from __future__ import annotations

from stimage_jax.cli.common import add_overwrite


def add_parser(sub, parents) -> None:
    x = sub.add_parser("export-onnx", parents=list(parents), help="export a trained model to ONNX")
    x.add_argument("--model", required=True, help="training workdir (or its model/ folder)")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    add_overwrite(x)
    x.set_defaults(func=run)


def run(a) -> None:
    from data_pipelines.io import check_writable
    from export.to_onnx import export_onnx
    from stimage_jax.ensemble.model import EnsembleModel

    check_writable(a.out, a.overwrite)
    model = EnsembleModel.load(a.model)
    out = export_onnx(model, a.out, overwrite=a.overwrite)
    print(f"exported {model.config['members']} member(s), {len(model.genes)} genes, "
          f"{model.config['tile_px']}px uint8 tiles -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
