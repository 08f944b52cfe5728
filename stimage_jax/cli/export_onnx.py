"""``stimage export-onnx --model W --out M.onnx``: a trained ensemble → one ONNX file;
``--triton-repo REPO --name NAME``: the batch-major serving graph in a Triton model
repository (``REPO/NAME/config.pbtxt``, ``REPO/NAME/VERSION/model.onnx``). ``--model`` may
also be an exported ``.onnx`` file, which needs no JAX to become a repository."""

from __future__ import annotations

from pathlib import Path

from data_pipelines.errors import StimageError
from stimage_jax.cli.common import add_overwrite


def add_parser(sub, parents) -> None:
    x = sub.add_parser("export-onnx", parents=list(parents), help="export a trained model to ONNX")
    x.add_argument("--model", required=True, help="training workdir (or its model/ folder, or an exported .onnx)")
    x.add_argument("--out", help="the .onnx file to write")
    x.add_argument("--triton-repo", help="also (or instead) write a Triton model repository here")
    x.add_argument("--name", help="the model's name in the repository (with --triton-repo)")
    x.add_argument("--version", type=int, default=1, help="the model version folder (default 1)")
    x.add_argument("--max-batch-size", type=int, default=64, help="config.pbtxt's max_batch_size (default 64)")
    add_overwrite(x)
    x.set_defaults(func=run)


def run(a) -> None:
    from data_pipelines.io import check_writable

    if not a.out and not a.triton_repo:
        raise StimageError("give --out M.onnx, --triton-repo REPO --name NAME, or both")
    if a.triton_repo and not a.name:
        raise StimageError("--triton-repo needs --name (the model's folder in the repository)")
    if a.name and not a.triton_repo:
        raise StimageError("--name is the model's name in --triton-repo; give --triton-repo too")
    if a.out:
        check_writable(a.out, a.overwrite)
    if a.triton_repo:
        from export.serving.repo import check_repo_args

        check_repo_args(a.name, a.version, a.max_batch_size)  # before any folder is made or the export runs
        check_writable(Path(a.triton_repo) / a.name / str(a.version) / "model.onnx", a.overwrite)
    if str(a.model).endswith(".onnx") and Path(a.model).is_file():
        if a.out:
            raise StimageError("--model is already an .onnx file; --out is for exporting a training workdir")
        import onnx

        proto = onnx.load(str(a.model))
    else:
        from export.to_onnx import export_onnx, to_onnx_proto
        from stimage_jax.ensemble.model import EnsembleModel

        model = EnsembleModel.load(a.model)
        if a.out:
            out = export_onnx(model, a.out, overwrite=a.overwrite)
            print(f"exported {model.config['members']} member(s), {len(model.genes)} genes, "
                  f"{model.config['tile_px']}px uint8 tiles -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
            proto = None
        else:
            proto = to_onnx_proto(model)
        if a.triton_repo and proto is None:
            import onnx

            proto = onnx.load(str(out))
    if a.triton_repo:
        from export.serving.repo import write_triton_repo

        folder = write_triton_repo(proto, a.triton_repo, a.name, version=a.version,
                                   max_batch_size=a.max_batch_size, overwrite=a.overwrite)
        print(f"Triton model repository: {folder}/config.pbtxt and {folder}/{a.version}/model.onnx "
              f"(batch-major: mu, r, mean, var_aleatoric, var_epistemic)")
