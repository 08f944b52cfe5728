"""``stimage export-onnx --model W --out M.onnx``: a trained ensemble → one ONNX file;
``--triton-repo REPO --name NAME``: the batch-major serving graph in a Triton model
repository (``REPO/NAME/config.pbtxt``, ``REPO/NAME/VERSION/model.onnx``). ``--model`` may
also be an exported ``.onnx`` file, which needs no JAX to become a repository (or, with
``--quantize``, an int8 model).

``--quantize int8 --calibration X.h5ad [...]``: a static int8 (QDQ) model calibrated on the
sections' tissue tiles (:mod:`export.quantize`), written only when the accuracy gate passes
(mean PCC drop ≤ ``--max-pcc-drop`` on ``--validate`` or the calibration sections) or
``--force`` is given; the gate's line is printed on every quantised export."""

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
    x.add_argument("--quantize", choices=["int8"], help="static int8 (QDQ) backbone; NB heads stay fp32")
    x.add_argument("--calibration", nargs="+", metavar="X.h5ad", help="sections whose tissue tiles calibrate --quantize")
    x.add_argument("--calibration-tiles", type=int, default=256, help="calibration tiles (default 256)")
    x.add_argument("--validate", nargs="+", metavar="Y.h5ad",
                   help="held-out sections for the accuracy gate (default: the calibration sections)")
    x.add_argument("--max-pcc-drop", type=float, default=0.01,
                   help="refuse the int8 model when its mean PCC drops by more (default 0.01)")
    x.add_argument("--force", action="store_true", help="write the int8 model even when the accuracy gate fails")
    add_overwrite(x)
    x.set_defaults(func=run)


def _check_quantize_args(a) -> None:
    if not a.quantize:
        given = [f for f, v in (("--calibration", a.calibration), ("--validate", a.validate), ("--force", a.force))
                 if v]
        if given:
            raise StimageError(f"{', '.join(given)} go with --quantize int8")
        return
    if not a.calibration:
        raise StimageError("--quantize int8 needs --calibration X.h5ad (sections whose tiles set the int8 ranges)")
    if a.calibration_tiles < 1:
        raise StimageError(f"--calibration-tiles must be a positive integer, got {a.calibration_tiles}")
    if not 0.0 <= a.max_pcc_drop <= 1.0:
        raise StimageError(f"--max-pcc-drop must lie in [0, 1], got {a.max_pcc_drop}")
    for p in [*a.calibration, *(a.validate or [])]:
        if not Path(p).is_file():
            raise StimageError(f"section file {p} not found")


def run(a) -> None:
    from data_pipelines.io import check_writable

    if not a.out and not a.triton_repo:
        raise StimageError("give --out M.onnx, --triton-repo REPO --name NAME, or both")
    if a.triton_repo and not a.name:
        raise StimageError("--triton-repo needs --name (the model's folder in the repository)")
    if a.name and not a.triton_repo:
        raise StimageError("--name is the model's name in --triton-repo; give --triton-repo too")
    _check_quantize_args(a)
    if a.out:
        check_writable(a.out, a.overwrite)
    if a.triton_repo:
        from export.serving.repo import check_repo_args

        check_repo_args(a.name, a.version, a.max_batch_size)  # before any folder is made or the export runs
        check_writable(Path(a.triton_repo) / a.name / str(a.version) / "model.onnx", a.overwrite)
    out = None
    if str(a.model).endswith(".onnx") and Path(a.model).is_file():
        if a.out and not a.quantize:
            raise StimageError("--model is already an .onnx file; --out is for exporting a training workdir "
                               "(or for --quantize int8)")
        import onnx

        proto = onnx.load(str(a.model))
    else:
        from export.to_onnx import export_onnx, to_onnx_proto
        from stimage_jax.ensemble.model import EnsembleModel

        model = EnsembleModel.load(a.model)
        if a.out and not a.quantize:
            out = export_onnx(model, a.out, overwrite=a.overwrite)
            print(f"exported {model.config['members']} member(s), {len(model.genes)} genes, "
                  f"{model.config['tile_px']}px uint8 tiles -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
            proto = None
        else:
            proto = to_onnx_proto(model)
    if a.quantize:
        from export.quantize import quantize_with_gate, save

        fp32_mb = proto.ByteSize() / 1e6
        proto, gate = quantize_with_gate(proto, a.calibration, validate=a.validate, n_tiles=a.calibration_tiles,
                                         max_drop=a.max_pcc_drop, force=a.force, progress=not a.quiet)
        if not gate.passed:
            print("warning: writing the int8 model although the accuracy gate failed (--force)")
        if a.out:
            out = save(proto, a.out, overwrite=a.overwrite)
            print(f"int8 model ({len(proto.graph.node)} nodes) -> {out} ({out.stat().st_size / 1e6:.1f} MB, "
                  f"fp32 {fp32_mb:.1f} MB)")
    if a.triton_repo:
        from export.serving.repo import write_triton_repo

        if proto is None:
            import onnx

            proto = onnx.load(str(out))
        folder = write_triton_repo(proto, a.triton_repo, a.name, version=a.version,
                                   max_batch_size=a.max_batch_size, overwrite=a.overwrite)
        print(f"Triton model repository: {folder}/config.pbtxt and {folder}/{a.version}/model.onnx "
              f"(batch-major: mu, r, mean, var_aleatoric, var_epistemic)")
