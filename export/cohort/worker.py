"""The per-slide task a local process or a Dask worker runs (importable on its own, JAX-free).

:func:`predict_one` takes a plain dict (picklable, so any executor can ship it), predicts one
slide with the existing slide pipeline, writes ``slides/<id>.h5ad`` (+ heatmaps) and a
``slides/<id>.json`` done-marker holding the fingerprint, and returns a summary dict. It
never raises: a bad slide comes back as ``status="failed"`` with the error's one line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["predict_one", "load_predictor", "one_line"]

_MODELS: dict[tuple, object] = {}  # one model per (path, threads, loader) per process


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _onnx(path: str, threads: int | None):
    """An :class:`~export.runtime.onnx_model.OnnxEnsemble` whose session uses ``threads``
    intra-op threads (cores / workers), validated exactly as the plain loader validates."""
    import onnxruntime as ort

    from data_pipelines.errors import StimageError
    from export.runtime.onnx_model import PREFERRED_PROVIDERS, OnnxEnsemble

    if not Path(path).is_file():
        raise StimageError(f"model file {path} not found")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    avail = ort.get_available_providers()
    m = object.__new__(OnnxEnsemble)
    try:
        m.session = ort.InferenceSession(path, so, providers=[p for p in PREFERRED_PROVIDERS if p in avail])
    except Exception as e:  # onnxruntime's own untyped errors
        raise StimageError(f"{path} is not an ONNX model onnxruntime can run ({one_line(e)})") from None
    m.path = Path(path)
    m.meta = dict(m.session.get_modelmeta().custom_metadata_map)
    m._validate()
    m.providers = m.session.get_providers()
    m.provenance = {**m._trained, "runtime": "onnxruntime", "providers": list(m.providers),
                    "intra_op_threads": int(threads or 0)}
    return m


def load_predictor(path: str, threads: int | None = None, loader: str | None = None):
    """The model at ``path``, loaded once per process. ``.onnx`` → onnxruntime only;
    anything else needs ``loader`` ("module:function", e.g. the JAX side's loader)."""
    key = (path, threads, loader)
    if key not in _MODELS:
        if str(path).endswith(".onnx"):
            _MODELS[key] = _onnx(path, threads)
        else:
            if not loader:
                from data_pipelines.errors import StimageError

                raise StimageError(f"{path} is not an .onnx model; run `stimage cohort predict` (JAX) for workdirs")
            mod, fn = loader.split(":")
            _MODELS[key] = getattr(importlib.import_module(mod), fn)(path)
    return _MODELS[key]


def _dask_threads() -> int | None:
    """On a Dask worker of a remote cluster: this machine's cores / the worker's task threads."""
    try:
        from distributed import get_worker

        return max(1, (os.cpu_count() or 1) // max(1, get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    from data_pipelines.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, sort_keys=True))


def predict_one(task: dict) -> dict:
    """Predict one slide; see the module docstring. ``task`` keys: slide_id, path, mpp,
    fingerprint, out_dir, model, model_hash, threads, loader, min_coverage, batch_size,
    interval, genes (heatmaps)."""
    t0 = time.perf_counter()
    res = {"slide_id": task["slide_id"], "fingerprint": task["fingerprint"], "status": "failed", "error": "",
           "seconds": 0.0, "pid": os.getpid(), "jax_loaded": "jax" in sys.modules}
    try:
        import numpy as np

        from data_pipelines import keys
        from data_pipelines.io import write_h5ad
        from data_pipelines.wsi import open_slide
        from export.runtime.prediction import predict_slide, write_heatmaps

        model = load_predictor(task["model"], task.get("threads") or _dask_threads(), task.get("loader"))
        slide = open_slide(task["path"], mpp=task.get("mpp"))
        pred = predict_slide(slide, model, min_coverage=task["min_coverage"], batch_size=task["batch_size"],
                             progress=task.get("progress", False), interval=task["interval"])
        if pred.n_obs == 0:
            raise ValueError(f"no tile of slide {task['path']} has {task['min_coverage']:g} tissue coverage")
        seconds = round(time.perf_counter() - t0, 3)
        cov = pred.obs[keys.TISSUE_COVERAGE].to_numpy(np.float64)
        summary = {"n_tiles": int(pred.n_obs), "tissue_mm2": float(cov.sum() * (model.tile_um / 1000.0) ** 2),
                   "mpp": float(slide.mpp), "seconds": seconds, "fingerprint": task["fingerprint"],
                   "model_hash": task["model_hash"], "path": str(task["path"])}
        pred.uns[keys.STIMAGE_UNS]["cohort"] = summary
        out = Path(task["out_dir"]) / "slides"
        write_h5ad(pred, out / f"{task['slide_id']}.h5ad", overwrite=True)
        if task.get("genes"):
            write_heatmaps(pred, task["genes"], str(out / task["slide_id"]), overwrite=True)
        _write_json(out / f"{task['slide_id']}.json", summary)  # the done-marker, written last
        res.update(status="ok", seconds=seconds)
    except Exception as e:  # fault isolation: one bad slide never stops the cohort
        res.update(error=one_line(e), seconds=round(time.perf_counter() - t0, 3))
    res["jax_loaded"] = "jax" in sys.modules
    res["peak_rss_mib"] = _peak_rss_mib()
    return res


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory: VmHWM (per address space, so a spawned worker
    does not report the parent's peak as getrusage's ru_maxrss would after fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
