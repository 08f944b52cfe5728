"""``stimage cells``: train, apply and score the HoVer-Net-style nucleus model.

    stimage cells train --data DIR --workdir W [--backbone efficientnet_lite0|resnet50|tiny]
                        [--minutes M] [--steps N] [--batch-size B] [--lr LR] ...
    stimage cells predict --model W_OR_CELLS.onnx --image TILE.png --out INSTANCES.png
    stimage cells evaluate --pred INSTANCES.png --truth XML_OR_INSTANCES --out metrics.json
    stimage cells export-onnx --model W --out cells.onnx [--size 256]
    stimage cells export-onnx --model W_OR_CELLS.onnx --out cells_int8.onnx --quantize int8
                              --calibration IMG_OR_FOLDER [...] [--calibration-tiles 64]
                              [--validate IMG_OR_FOLDER ...] [--max-aji-drop 0.01]
                              [--min-agreement 0.98] [--force]

``predict`` writes the instance map (16-bit PNG, or ``.npy``), ``<stem>_types.csv`` (one
row per nucleus: id, centroid x/y, area, and with a TC branch its type, type name, the
fraction of its pixels voting for it and the mean probability of every class) and
``<stem>_entropy.npy`` / ``<stem>_entropy.png`` (per-pixel entropy in nats of the type
probabilities — of the nucleus/background probability for a model without types; the
PNG scales 0..log K to 0..255). ``evaluate`` writes HoVer-Net's instance metrics as JSON,
plus type metrics when the prediction has types and the truth a type table
(``--truth-types``, or ``<truth stem>_types.csv`` beside the truth).

``predict --model M.onnx`` runs an exported network (fp32 or int8) with onnxruntime
(:class:`stimage_jax.cells.onnx_model.OnnxCellModel`), no JAX. ``export-onnx --quantize int8``
calibrates a static int8 model on H&E images and writes it only when the accuracy gate
passes (:mod:`stimage_jax.cells.quantize`); ``--model`` may then also be an fp32 export.

``add_parser(subparsers)`` adds the ``cells`` command to the main parser; handlers raise
:class:`StimageError` for bad input (the main CLI prints it as one line). The library
code is in :mod:`stimage_jax.cells.outputs` and :mod:`stimage_jax.cells.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from data_pipelines.errors import StimageError
from stimage_jax.cli.common import add_overwrite, nonnegative_int, positive_float, positive_int

__all__ = ["add_parser", "cmd_cells_train", "cmd_cells_predict", "cmd_cells_evaluate", "cmd_cells_export"]


def _quiet(a) -> bool:
    return bool(getattr(a, "quiet", False))


def cmd_cells_train(a) -> int:
    from stimage_jax.cells.train import CellTrainConfig, train_cells

    steps = a.steps if a.steps is not None else (10**9 if a.minutes is not None else 2000)
    cfg = CellTrainConfig(backbone=a.backbone, weights=None if a.weights == "none" else a.weights,
                          num_types=a.num_types, patch_size=a.patch_size, stride=a.stride, min_nuclei=a.min_nuclei,
                          batch_size=a.batch_size, lr=a.lr, encoder_lr_scale=a.encoder_lr_scale, steps=steps,
                          minutes=a.minutes, checkpoint_every=a.checkpoint_every, frozen_levels=a.frozen_levels, augment=a.augment,
                          seed=a.seed)
    if a.backbone == "tiny" and a.weights == "default":
        cfg = dataclasses.replace(cfg, weights=None)  # no pretrained tiny encoder exists
    model = train_cells(a.data, a.workdir, cfg, overwrite=a.overwrite, progress=not _quiet(a))
    if not _quiet(a):
        c = model.config
        print(f"trained {c['steps']} steps in {c['train_minutes']:.1f} min on {c['patches']} patches of "
              f"{c['tiles']} tiles → {Path(a.workdir) / 'model'}")
    return 0


def cmd_cells_predict(a) -> int:
    from data_pipelines.io import check_distinct
    from data_pipelines.tiles import load_image
    from stimage_jax.cells.outputs import prediction_paths, write_cell_prediction
    from stimage_jax.cells.train import CellModel

    from stimage_jax.cells.onnx_model import OnnxCellModel, is_cells_onnx

    for p in prediction_paths(a.out):
        check_distinct(p, a.image)
    model = OnnxCellModel(a.model) if is_cells_onnx(a.model) else CellModel.load(a.model)
    n, paths = write_cell_prediction(model, load_image(a.image), a.out, overwrite=a.overwrite)
    if not _quiet(a):
        print(f"{n} nuclei → {paths[0]} (+ {', '.join(p.name for p in paths[1:])})")
    return 0


def cmd_cells_evaluate(a) -> int:
    from data_pipelines.io import atomic_path, check_distinct, check_writable
    from stimage_jax.cells.outputs import evaluate_instances

    out = Path(a.out)
    check_writable(out, a.overwrite)
    check_distinct(out, a.pred, a.truth)
    res = evaluate_instances(a.pred, a.truth, pred_types=a.pred_types, truth_types=a.truth_types, radius=a.radius)
    clean = json.loads(json.dumps(res, default=float).replace("NaN", "null"))  # JSON has no NaN
    with atomic_path(out, overwrite=a.overwrite) as tmp:
        tmp.write_text(json.dumps(clean, indent=1))
    if not _quiet(a):
        print(" ".join(f"{k} {res[k]:.3f}" for k in ("dice", "aji", "pq", "f1_detection")) + f" → {out}")
    return 0


def _check_quantize_args(a) -> None:
    given = [f for f, v in (("--calibration", a.calibration), ("--validate", a.validate), ("--force", a.force))
             if v]
    if not a.quantize and given:
        raise StimageError(f"{', '.join(given)} go with --quantize int8")
    if a.quantize and not a.calibration:
        raise StimageError("--quantize int8 needs --calibration IMG_OR_FOLDER (H&E images whose windows set the "
                           "int8 ranges)")


def cmd_cells_export(a) -> int:
    from data_pipelines.io import check_writable
    from stimage_jax.cells.onnx_model import is_cells_onnx

    _check_quantize_args(a)
    out = check_writable(a.out, a.overwrite, [a.model])
    if is_cells_onnx(a.model):
        if not a.quantize:
            raise StimageError(f"--model {a.model} is already an ONNX export (an .onnx --model is for --quantize int8)")
        proto = a.model
    else:
        from stimage_jax.cells.hovernet import cells_onnx_proto, export_cells_onnx
        from stimage_jax.cells.train import CellModel

        model = CellModel.load(a.model)
        meta = {"type_names": model.type_names, "model_config": model.config}
        if not a.quantize:
            path = export_cells_onnx(model.net, out, size=a.size, overwrite=a.overwrite, metadata=meta)
            if not _quiet(a):
                print(f"wrote {path}")
            return 0
        proto = cells_onnx_proto(model.net, size=a.size, metadata=meta)
    from export.quantize import save
    from stimage_jax.cells.quantize import quantize_cells_with_gate

    q, gate = quantize_cells_with_gate(proto, a.calibration, validate=a.validate, n_tiles=a.calibration_tiles,
                                       max_aji_drop=a.max_aji_drop, min_agreement=a.min_agreement, force=a.force,
                                       progress=not _quiet(a), report=(lambda _: None) if _quiet(a) else print)
    path = save(q, out, overwrite=a.overwrite)
    if not _quiet(a):
        print(f"wrote {path} (int8{', gate FAILED, forced' if not gate.passed else ''})")
    return 0


def add_parser(subparsers, parents: tuple = ()) -> argparse.ArgumentParser:
    """Add ``cells {train, predict, evaluate, export-onnx}`` to ``subparsers``; returns the parser.

    Each leaf sets ``func`` (taking the parsed args, returning 0), as the main CLI expects.
    """
    c = subparsers.add_parser("cells", parents=list(parents),
                              help="nucleus segmentation and classification (HoVer-Net style)")
    sub = c.add_subparsers(dest="cells_command", required=True)

    t = sub.add_parser("train", parents=list(parents), help="train on H&E tiles with nucleus annotations")
    t.add_argument("--data", required=True, help="folder of images with <name>.xml or <name>_instances.png/.npy "
                   "(and optional <name>_types.csv: x, y, type)")
    t.add_argument("--workdir", required=True)
    t.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "resnet50", "tiny"])
    t.add_argument("--weights", default="default", help="encoder weights: default (ImageNet Lite0), none, or a file")
    t.add_argument("--minutes", type=positive_float, help="training-time budget (summed over resumed runs)")
    t.add_argument("--steps", type=positive_int, help="maximum steps (default 2000, unlimited with --minutes)")
    t.add_argument("--batch-size", type=positive_int, default=4)
    t.add_argument("--lr", type=positive_float, default=1e-4)
    t.add_argument("--encoder-lr-scale", type=positive_float, default=1.0,
                   help="encoder learning rate = --lr × this (e.g. 0.1: fast new decoders, gentle pretrained encoder)")
    t.add_argument("--patch-size", type=positive_int, default=256)
    t.add_argument("--stride", type=positive_int, default=128, help="patch grid stride (px)")
    t.add_argument("--min-nuclei", type=nonnegative_int, default=2, help="patches with fewer nuclei are dropped")
    t.add_argument("--num-types", type=nonnegative_int, help="TC classes incl. background (default 5 with type tables, else 0)")
    t.add_argument("--frozen-levels", type=nonnegative_int, default=0,
                   help="encoder resolution levels (strides 2, 4, ...) kept frozen; saves CPU time")
    t.add_argument("--augment", default="default", choices=["none", "dihedral", "default"])
    t.add_argument("--checkpoint-every", type=positive_int, default=100)
    t.add_argument("--seed", type=int, default=0)
    add_overwrite(t, "replace a different run in --workdir")
    t.set_defaults(func=cmd_cells_train)

    p = sub.add_parser("predict", parents=list(parents), help="segment and classify the nuclei of one image")
    p.add_argument("--model", required=True, help="training workdir (or its model/ folder), or a cells .onnx "
                   "export (fp32 or int8)")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="instance map: .png (16-bit), .tif or .npy")
    add_overwrite(p)
    p.set_defaults(func=cmd_cells_predict)

    e = sub.add_parser("evaluate", parents=list(parents), help="HoVer-Net instance metrics of a prediction")
    e.add_argument("--pred", required=True, help="predicted instance map")
    e.add_argument("--truth", required=True, help="MoNuSeg XML or an instance map")
    e.add_argument("--out", required=True, help="metrics JSON")
    e.add_argument("--pred-types", help="predicted types table (default <pred stem>_types.csv)")
    e.add_argument("--truth-types", help="true types: x, y, type CSV (default <truth stem>_types.csv if present)")
    e.add_argument("--radius", type=positive_float, default=12.0, help="detection pairing radius (px)")
    add_overwrite(e)
    e.set_defaults(func=cmd_cells_evaluate)

    x = sub.add_parser("export-onnx", parents=list(parents), help="export a trained cell model to ONNX")
    x.add_argument("--model", required=True, help="training workdir (or model/ folder); with --quantize also an "
                   "fp32 cells .onnx")
    x.add_argument("--out", required=True)
    x.add_argument("--size", type=positive_int, default=256, help="input side (multiple of 32); batch is dynamic")
    x.add_argument("--quantize", choices=["int8"], help="static int8 (QDQ) network, gated against fp32")
    x.add_argument("--calibration", nargs="+", metavar="IMG_OR_FOLDER",
                   help="H&E images (or folders of them) whose windows calibrate --quantize")
    x.add_argument("--calibration-tiles", type=positive_int, default=64, help="calibration windows (size²) at most")
    x.add_argument("--validate", nargs="+", metavar="IMG_OR_FOLDER",
                   help="images the accuracy gate segments with both models (default the calibration images)")
    x.add_argument("--max-aji-drop", type=float, default=0.01,
                   help="refuse the int8 model when AJI on annotated gate images drops by more")
    x.add_argument("--min-agreement", type=float, default=0.98,
                   help="refuse the int8 model when nucleus-mask or type pixel agreement with fp32 is lower")
    x.add_argument("--force", action="store_true", help="write the int8 model even when the gate fails")
    add_overwrite(x)
    x.set_defaults(func=cmd_cells_export)

    from stimage_jax.cli import cells_cellpose  # cellpose 3 from scratch (torch, optional extra)

    cells_cellpose.add_parser(sub, parents)
    return c
