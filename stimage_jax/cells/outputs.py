"""What ``stimage cells predict`` writes and ``stimage cells evaluate`` scores: an instance
map with its per-nucleus table and type-entropy map, and HoVer-Net's metrics of an
instance map against a MoNuSeg XML or instance-map truth (plus type metrics)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["INSTANCE_SUFFIXES", "sidecar", "prediction_paths", "write_cell_prediction", "evaluate_instances"]

INSTANCE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


def sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.stem}{suffix}")


def prediction_paths(out) -> list[Path]:
    """The instance map and its sidecars: ``_types.csv``, ``_entropy.npy``, ``_entropy.png``."""
    out = Path(out)
    if out.suffix.lower() not in INSTANCE_SUFFIXES:
        raise StimageError(f"--out {out} must end in .png, .tif or .npy (an instance map)")
    return [out, sidecar(out, "_types.csv"), sidecar(out, "_entropy.npy"), sidecar(out, "_entropy.png")]


def write_cell_prediction(model, rgb: np.ndarray, out, *, overwrite: bool = False) -> tuple[int, list[Path]]:
    """Segment and type the nuclei of ``rgb`` (H, W, 3) uint8 with a cell model and write
    the instance map and its sidecars (every path checked before any is written)."""
    import cv2
    import pandas as pd

    from data_pipelines.cell_patches import write_instances
    from data_pipelines.io import atomic_path, check_writable
    from stimage_jax.cells.instance_metrics import centroids

    paths = prediction_paths(out)
    for p in paths:
        check_writable(p, overwrite)
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
    k = model.net.num_types or 2
    img = np.clip(pred.entropy / math.log(k) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    with atomic_path(paths[0], overwrite=overwrite) as tmp:
        write_instances(tmp, inst)
    with atomic_path(paths[1], overwrite=overwrite) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(paths[2], overwrite=overwrite) as tmp:
        np.save(tmp, pred.entropy)
    with atomic_path(paths[3], overwrite=overwrite) as tmp:
        cv2.imwrite(str(tmp), img)
    return len(ids), paths


def _pred_types(path: Path, n: int) -> np.ndarray | None:
    """Types of instances 1..n from a predict table (None when it has no type column); ids and
    types must be whole numbers (ids 1..n, types >= 0), one row per id."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many kinds for a bad CSV
        raise StimageError(f"prediction table {path} is not a readable CSV ({type(e).__name__})") from None
    if "type" not in df.columns:
        return None
    if "id" not in df.columns:
        raise StimageError(f"prediction table {path} lacks the id column")

    def whole(col: str) -> np.ndarray:
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
        if not np.all(np.isfinite(v)) or np.any(v != np.round(v)) or np.any(np.abs(v) > 2**31 - 1):
            raise StimageError(f"prediction table {path}: column {col!r} must hold whole numbers")
        return v.astype(np.int64)

    ids, kinds = whole("id"), whole("type")
    if np.any(kinds < 0):
        raise StimageError(f"prediction table {path}: types must be 0 or more")
    if len(np.unique(ids)) != len(ids):
        raise StimageError(f"prediction table {path}: an id appears twice")
    types = np.full(n, -1, np.int64)
    ok = (ids >= 1) & (ids <= n)
    types[ids[ok] - 1] = kinds[ok]
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
    p_tab = Path(pred_types) if pred_types else sidecar(pred_path, "_types.csv")
    t_tab = Path(truth_types) if truth_types else sidecar(truth_path, "_types.csv")
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


