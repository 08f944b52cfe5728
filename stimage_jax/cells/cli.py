"""``stimage cells``: train, apply and score the HoVer-Net-style nucleus model.

    stimage cells train --data DIR --workdir W [--backbone efficientnet_lite0|resnet50|tiny]
                        [--minutes M] [--steps N] [--batch-size B] [--lr LR] ...
    stimage cells predict --model W --image TILE.png --out INSTANCES.png
    stimage cells evaluate --pred INSTANCES.png --truth XML_OR_INSTANCES --out metrics.json
    stimage cells export-onnx --model W --out cells.onnx [--size 256]

``predict`` writes the instance map (16-bit PNG, or ``.npy``), ``<stem>_types.csv`` (one
row per nucleus: id, centroid x/y, area, and with a TC branch its type, type name, the
fraction of its pixels voting for it and the mean probability of every class) and
``<stem>_entropy.npy`` / ``<stem>_entropy.png`` (per-pixel entropy in nats of the type
probabilities — of the nucleus/background probability for a model without types; the
PNG scales 0..log K to 0..255). ``evaluate`` writes HoVer-Net's instance metrics as JSON,
plus type metrics when the prediction has types and the truth a type table
(``--truth-types``, or ``<truth stem>_types.csv`` beside the truth).

``add_cells_parser(subparsers)`` adds the ``cells`` command to the main parser; handlers
raise :class:`StimageError` for bad input (the main CLI prints it as one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["add_cells_parser", "cmd_cells_train", "cmd_cells_predict", "cmd_cells_evaluate", "cmd_cells_export",
           "evaluate_instances"]


def _quiet(a) -> bool:
    return bool(getattr(a, "quiet", False))


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.stem}{suffix}")


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
    import cv2
    import pandas as pd

    from data_pipelines.cell_patches import write_instances
    from data_pipelines.io import atomic_path, check_writable
    from data_pipelines.tiles import load_image
    from stimage_jax.cells.instance_metrics import centroids
    from stimage_jax.cells.train import CellModel

    out = Path(a.out)
    if out.suffix.lower() not in (".png", ".tif", ".tiff", ".npy"):
        raise StimageError(f"--out {out} must end in .png, .tif or .npy (an instance map)")
    sidecars = [_sidecar(out, "_types.csv"), _sidecar(out, "_entropy.npy"), _sidecar(out, "_entropy.png")]
    for p in (out, *sidecars):
        check_writable(p, a.overwrite)
    model = CellModel.load(a.model)
    rgb = load_image(a.image)
    pred = model.segment(rgb)
    inst = pred.instances
    xy = centroids(inst)  # ids are 1..N in order, so row i is instance i + 1
    ids = np.arange(1, len(xy) + 1)
    area = np.bincount(inst.ravel(), minlength=len(ids) + 1)[1:]
    table = pd.DataFrame({"id": ids, "x": np.round(xy[:, 0], 2), "y": np.round(xy[:, 1], 2), "area_px": area})
    if pred.types is not None:
        names = model.type_names
        table["type"] = pred.types.types
        table["type_name"] = [names[t] for t in pred.types.types]
        table["type_prob"] = np.round(pred.types.type_prob, 4)
        for c, name in enumerate(names):
            table[f"p_{name}"] = np.round(pred.types.mean_probs[:, c], 4)
    with atomic_path(out, overwrite=a.overwrite) as tmp:
        write_instances(tmp, inst)
    with atomic_path(sidecars[0], overwrite=a.overwrite) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(sidecars[1], overwrite=a.overwrite) as tmp:
        np.save(tmp, pred.entropy)
    k = model.net.num_types or 2
    img = np.clip(pred.entropy / math.log(k) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    with atomic_path(sidecars[2], overwrite=a.overwrite) as tmp:
        cv2.imwrite(str(tmp), img)
    if not _quiet(a):
        print(f"{len(ids)} nuclei → {out} (+ {sidecars[0].name}, {sidecars[1].name}, {sidecars[2].name})")
    return 0


def _pred_types(path: Path, n: int) -> np.ndarray | None:
    """Types of instances 1..n from a predict table (None when it has no type column)."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise StimageError(f"prediction table {path} is not a readable CSV ({type(e).__name__})") from None
    if "type" not in df.columns:
        return None
    if "id" not in df.columns:
        raise StimageError(f"prediction table {path} lacks the id column")
    types = np.full(n, -1, np.int64)
    ids = df["id"].to_numpy(np.int64)
    ok = (ids >= 1) & (ids <= n)
    types[ids[ok] - 1] = df["type"].to_numpy(np.int64)[ok]
    return types


def evaluate_instances(pred_path: str | Path, truth_path: str | Path, *, pred_types: str | Path | None = None,
                       truth_types: str | Path | None = None, radius: float = 12.0) -> dict:
    """HoVer-Net metrics of an instance map against an XML or instance-map truth (+ types)."""
    from data_pipelines.cell_patches import CELL_TYPES, assign_types, read_instances, read_type_table
    from stimage_jax.cells.instance_metrics import centroids, instance_stats, per_class_f1, remap_label

    pred_path, truth_path = Path(pred_path), Path(truth_path)
    if pred_path.suffix.lower() == ".xml":
        raise StimageError(f"--pred {pred_path} must be an instance map (.png/.tif/.npy), not XML")
    pred = remap_label(read_instances(pred_path))
    truth = read_instances(truth_path, pred.shape)  # XML is rasterised at the prediction's size
    stats = instance_stats(pred, truth, radius=radius)
    res: dict = {k: (float(v) if isinstance(v, float) else int(v)) for k, v in stats.items()}
    res.update(pred=str(pred_path), truth=str(truth_path))
    p_tab = Path(pred_types) if pred_types else _sidecar(pred_path, "_types.csv")
    t_tab = Path(truth_types) if truth_types else _sidecar(truth_path, "_types.csv")
    if truth_types and not t_tab.is_file():
        raise StimageError(f"--truth-types {t_tab} not found")
    if pred_types and not p_tab.is_file():
        raise StimageError(f"--pred-types {p_tab} not found")
    if p_tab.is_file() and t_tab.is_file():
        n_pred = int(pred.max(initial=0))
        ptypes = _pred_types(p_tab, n_pred) if n_pred else np.zeros(0, np.int64)
        if ptypes is not None:
            truth_r = remap_label(truth)
            ta = assign_types(truth_r, read_type_table(t_tab, CELL_TYPES), where=str(t_tab))
            ttypes = ta.lut[1:].astype(np.int64)  # instance i + 1 → type (−1: no centroid in it)
            classes = [c for c in range(1, len(CELL_TYPES)) if np.any(ttypes == c) or np.any(ptypes == c)]
            tf = per_class_f1(centroids(pred), ptypes, centroids(truth_r), ttypes, radius=radius, classes=classes)
            res["types"] = {"f1_detection": tf["f1_detection"], "accuracy": tf["accuracy"],
                            "per_class_f1": {CELL_TYPES[c]: f for c, f in tf["per_class"].items()},
                            "truth_typed": int(np.sum(ttypes >= 0)), "truth_untyped": int(np.sum(ttypes < 0))}
    return res


def cmd_cells_evaluate(a) -> int:
    from data_pipelines.io import atomic_path

    out = Path(a.out)
    res = evaluate_instances(a.pred, a.truth, pred_types=a.pred_types, truth_types=a.truth_types, radius=a.radius)
    clean = json.loads(json.dumps(res, default=float).replace("NaN", "null"))  # JSON has no NaN
    with atomic_path(out, overwrite=a.overwrite) as tmp:
        tmp.write_text(json.dumps(clean, indent=1))
    if not _quiet(a):
        print(" ".join(f"{k} {res[k]:.3f}" for k in ("dice", "aji", "pq", "f1_detection")) + f" → {out}")
    return 0


def cmd_cells_export(a) -> int:
    from stimage_jax.cells.hovernet import export_cells_onnx
    from stimage_jax.cells.train import CellModel

    model = CellModel.load(a.model)
    path = export_cells_onnx(model.net, a.out, size=a.size, overwrite=a.overwrite,
                             metadata={"type_names": model.type_names, "model_config": model.config})
    if not _quiet(a):
        print(f"wrote {path}")
    return 0


def add_cells_parser(subparsers, parents: tuple = ()) -> argparse.ArgumentParser:
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
    t.add_argument("--minutes", type=float, help="training-time budget (summed over resumed runs)")
    t.add_argument("--steps", type=int, help="maximum steps (default 2000, unlimited with --minutes)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--encoder-lr-scale", type=float, default=1.0,
                   help="encoder learning rate = --lr × this (e.g. 0.1: fast new decoders, gentle pretrained encoder)")
    t.add_argument("--patch-size", type=int, default=256)
    t.add_argument("--stride", type=int, default=128, help="patch grid stride (px)")
    t.add_argument("--min-nuclei", type=int, default=2, help="patches with fewer nuclei are dropped")
    t.add_argument("--num-types", type=int, help="TC classes incl. background (default 5 with type tables, else 0)")
    t.add_argument("--frozen-levels", type=int, default=0,
                   help="encoder resolution levels (strides 2, 4, ...) kept frozen; saves CPU time")
    t.add_argument("--augment", default="default", choices=["none", "dihedral", "default"])
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help="replace a different run in --workdir")
    t.set_defaults(func=cmd_cells_train)

    p = sub.add_parser("predict", parents=list(parents), help="segment and classify the nuclei of one image")
    p.add_argument("--model", required=True, help="training workdir (or its model/ folder)")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="instance map: .png (16-bit), .tif or .npy")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_cells_predict)

    e = sub.add_parser("evaluate", parents=list(parents), help="HoVer-Net instance metrics of a prediction")
    e.add_argument("--pred", required=True, help="predicted instance map")
    e.add_argument("--truth", required=True, help="MoNuSeg XML or an instance map")
    e.add_argument("--out", required=True, help="metrics JSON")
    e.add_argument("--pred-types", help="predicted types table (default <pred stem>_types.csv)")
    e.add_argument("--truth-types", help="true types: x, y, type CSV (default <truth stem>_types.csv if present)")
    e.add_argument("--radius", type=float, default=12.0, help="detection pairing radius (px)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_cells_evaluate)

    x = sub.add_parser("export-onnx", parents=list(parents), help="export a trained cell model to ONNX")
    x.add_argument("--model", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--size", type=int, default=256, help="input side (multiple of 32); batch is dynamic")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_cells_export)
    return c
