"""Plan, run and assemble a cohort: which slides still need predicting (by fingerprint),
who predicts them (this process, local worker processes, or a Dask cluster), and
``manifest.csv`` + ``cohort.h5ad`` from the per-slide files.

Layout of ``OUT``::

    slides/<slide_id>.h5ad   one obs per tissue tile (the `predict --slide` output)
    slides/<slide_id>.json   done-marker: fingerprint, n_tiles, tissue_mm2, seconds, model hash
    slides/<slide_id>_<gene>.png   heatmaps for --genes
    manifest.csv             slide_id,status,error,seconds,fingerprint (one row per listed slide)
    cohort.h5ad              one obs per ok slide: X = pseudo-bulk, layers = mean tile variances

A slide is skipped when its done-marker holds the fingerprint of this run: sha256 over the
model's content hash, the slide file's content hash and every setting that changes its
prediction (mpp, min_coverage, interval, batch_size, heatmap genes). Names never decide.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError
from export.cohort.worker import load_predictor, one_line, predict_one

__all__ = ["AGGREGATES", "read_slide_table", "model_digest", "slide_fingerprint", "predict_cohort",
           "aggregate_cohort", "MANIFEST_COLUMNS"]

AGGREGATES = ("mean", "sum", "median")
MANIFEST_COLUMNS = ("slide_id", "status", "error", "seconds", "fingerprint")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_slide_table(path) -> list[dict]:
    """``slide_id,path[,mpp]`` → [{"slide_id", "path" (absolute), "mpp" (float | None)}].
    Paths are relative to the CSV's folder. Duplicate or unsafe ids are refused."""
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"slide table {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise StimageError(f"slide table {path} is not UTF-8 text (a CSV: slide_id,path[,mpp])") from None
    if "\x00" in text:
        raise StimageError(f"slide table {path} holds a NUL byte: not a CSV of slide_id,path[,mpp]")
    import io as _io

    with _io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "slide_id" not in cols or "path" not in cols:
            raise StimageError(f"{path}: the header must name slide_id,path[,mpp] (found {','.join(cols) or 'none'})")
        rows = []
        for i, raw in enumerate(reader, start=2):
            r = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            sid, p = r["slide_id"], r["path"]
            if not _ID.match(sid):
                raise StimageError(f"{path} line {i}: slide_id {sid!r} must be letters, digits, '.', '_' or '-'")
            if not p:
                raise StimageError(f"{path} line {i}: slide {sid} has no path")
            mpp = None
            if r.get("mpp"):
                try:
                    mpp = float(r["mpp"])
                except ValueError:
                    raise StimageError(f"{path} line {i}: mpp {r['mpp']!r} is not a number") from None
                if not np.isfinite(mpp) or mpp <= 0:
                    raise StimageError(f"{path} line {i}: mpp must be positive (got {r['mpp']})")
            full = Path(p) if Path(p).is_absolute() else path.parent / p
            rows.append({"slide_id": sid, "path": str(full.absolute()), "mpp": mpp})
    ids = [r["slide_id"] for r in rows]
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise StimageError(f"{path}: slide_id listed twice: {', '.join(dup[:5])}")
    if not rows:
        raise StimageError(f"{path} lists no slides")
    return rows


def model_digest(path) -> str:
    """sha256 of a model file, or of a model folder's files (relative names and contents)."""
    from data_pipelines.fingerprint import file_digest

    from export.runtime.predictor import resolve_model_dir

    p = Path(path)
    if p.is_file():
        return file_digest(p)
    p = resolve_model_dir(p)  # a workdir's model/ folder: checkpoints and caches are not the model
    if not p.is_dir():
        raise StimageError(f"model {p} not found")
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and "cache" not in x.relative_to(p).parts):
        h.update(f"{f.relative_to(p).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def slide_fingerprint(model_hash: str, slide_path, settings: dict) -> str:
    """Model content + slide content + settings → sha256 hex. OSError if the slide is unreadable."""
    from data_pipelines.fingerprint import file_digest

    blob = json.dumps({"model": model_hash, "slide": file_digest(slide_path), "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _done(out: Path, sid: str, fp: str) -> bool:
    marker = out / "slides" / f"{sid}.json"
    try:
        return (json.loads(marker.read_text()).get("fingerprint") == fp
                and (out / "slides" / f"{sid}.h5ad").is_file())
    except (OSError, ValueError):
        return False


def _write_manifest(out: Path, rows: dict, order: list[str]) -> None:
    from data_pipelines.io import atomic_path

    with atomic_path(out / "manifest.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(MANIFEST_COLUMNS)
            for sid in order:
                if sid in rows:
                    w.writerow([rows[sid].get(c, "") for c in MANIFEST_COLUMNS])


@contextlib.contextmanager
def _workers_skip_main():
    """Spawned workers re-run the parent's ``__main__`` (the ``stimage`` script would import
    the JAX CLI into every worker). The task lives in :mod:`export.cohort.worker`, never in
    ``__main__``, so while workers start, ``__main__`` is named as a package ``__main__``
    module, which multiprocessing does not re-import in the child."""
    import importlib.machinery
    import sys

    main = sys.modules.get("__main__")
    had = hasattr(main, "__spec__")
    old = getattr(main, "__spec__", None)
    if main is not None:
        main.__spec__ = importlib.machinery.ModuleSpec("export.cohort.__main__", None)
    try:
        yield
    finally:
        if main is not None:
            if had:
                main.__spec__ = old
            else:
                del main.__spec__


def _executor(workers: int, dask: str | None, dask_local: int | None):
    """(submit(fn, task) -> future, as_completed, close, n_workers, threads per worker)."""
    cores = os.cpu_count() or 1
    if dask or dask_local:
        try:
            from distributed import Client, LocalCluster
            from distributed import as_completed as dask_completed
        except ImportError:
            raise StimageError("--dask/--dask-local need dask.distributed: pip install 'stimage-jax[cohort]'") from None
        import logging

        # Dask's start/stop chatter, here and in the workers a LocalCluster spawns; warnings stay
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "distributed"]:
            logging.getLogger(name).setLevel(logging.WARNING)
        if dask_local:
            with _workers_skip_main():
                cluster = LocalCluster(n_workers=dask_local, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
            client = Client(cluster)
            n, threads = dask_local, max(1, cores // dask_local)
        else:
            cluster = None
            try:
                client = Client(dask, timeout="30s")
            except (OSError, TimeoutError) as e:
                raise StimageError(f"cannot reach the Dask scheduler {dask} ({one_line(e)})") from None
            n, threads = max(1, len(client.scheduler_info().get("workers", {}))), None  # the worker's own cores

        def submit(task):
            return client.submit(predict_one, task, key=f"stimage-slide-{task['slide_id']}-{task['fingerprint'][:12]}",
                                 pure=False, retries=0)

        def close():
            client.close()
            if cluster is not None:
                cluster.close()
        return submit, dask_completed, close, n, threads
    if workers > 1:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        return (lambda task: pool.submit(predict_one, task)), as_completed, \
            (lambda: pool.shutdown(wait=True, cancel_futures=True)), workers, max(1, cores // workers)

    class _Now:  # this process, in order: the single-slide pipeline
        def __init__(self, task):
            self.task = task

        def result(self):
            return predict_one(self.task)
    return _Now, (lambda fs: iter(fs)), (lambda: None), 1, cores


def aggregate_cohort(out: Path, ok_ids: list[str], aggregate: str = "mean"):
    """cohort.h5ad from ``slides/<id>.h5ad``: X = per-gene ``aggregate`` of the tiles'
    predicted mean; layers var_aleatoric / var_epistemic = mean over tiles of each tile's
    variance; obs from the done-markers."""
    import anndata as ad
    import pandas as pd

    from data_pipelines import keys

    if aggregate not in AGGREGATES:
        raise StimageError(f"--aggregate must be one of {', '.join(AGGREGATES)} (got {aggregate!r})")
    fn = {"mean": np.mean, "sum": np.sum, "median": np.median}[aggregate]
    X, va, ve, obs, genes = [], [], [], [], None
    for sid in ok_ids:
        a = ad.read_h5ad(out / "slides" / f"{sid}.h5ad")
        if genes is None:
            genes = list(a.var_names)
        elif list(a.var_names) != genes:
            raise StimageError(f"slide {sid} was predicted with other genes; rerun it")
        X.append(fn(np.asarray(a.X, np.float64), axis=0))
        va.append(np.asarray(a.layers[keys.VAR_ALEATORIC], np.float64).mean(axis=0))
        ve.append(np.asarray(a.layers[keys.VAR_EPISTEMIC], np.float64).mean(axis=0))
        s = json.loads((out / "slides" / f"{sid}.json").read_text())
        obs.append({"n_tiles": s["n_tiles"], "tissue_mm2": s["tissue_mm2"], "seconds": s["seconds"],
                    "mpp": s["mpp"], "model_hash": s["model_hash"], "fingerprint": s["fingerprint"],
                    "path": s["path"]})
    if not ok_ids:
        return None
    c = ad.AnnData(X=np.asarray(X, np.float32), obs=pd.DataFrame(obs, index=pd.Index(ok_ids, name="slide_id")),
                   var=pd.DataFrame(index=pd.Index(genes)))
    c.layers[keys.VAR_ALEATORIC] = np.asarray(va, np.float32)
    c.layers[keys.VAR_EPISTEMIC] = np.asarray(ve, np.float32)
    return c


def predict_cohort(model: str, slides_csv, out, *, workers: int = 1, dask: str | None = None,
                   dask_local: int | None = None, aggregate: str = "mean", min_coverage: float = 0.7,
                   batch_size: int = 32, interval: float = 0.8, genes=(), loader: str | None = None,
                   progress: bool = True) -> dict:
    """Predict every slide of ``slides_csv`` not already done into ``out``; write the manifest
    and cohort.h5ad. Returns {"ok", "failed", "skipped", "seconds", "manifest", "cohort"}."""
    from tqdm.auto import tqdm

    from data_pipelines.io import workdir_lock, write_h5ad

    if aggregate not in AGGREGATES:
        raise StimageError(f"--aggregate must be one of {', '.join(AGGREGATES)} (got {aggregate!r})")
    if sum(bool(x) for x in (workers > 1, dask, dask_local)) > 1:
        raise StimageError("give one of --workers N, --dask ADDRESS, --dask-local N")
    rows = read_slide_table(slides_csv)
    model = str(Path(model).absolute())
    if not model.endswith(".onnx") and not loader:
        raise StimageError(f"{model} is not an .onnx model (use `stimage cohort predict` for a JAX workdir)")
    probe = load_predictor(model, 1, loader)  # a bad model is one line now, not N failed slides
    bad = [g for g in genes if g not in set(probe.genes)]
    if bad:
        raise StimageError(f"gene(s) not predicted by this model: {', '.join(bad)}")
    model_hash = model_digest(model)
    out = Path(out).absolute()
    t0 = time.perf_counter()
    with workdir_lock(out):
        (out / "slides").mkdir(exist_ok=True)
        results: dict[str, dict] = {}
        todo = []
        for r in rows:
            settings = {"mpp": r["mpp"], "min_coverage": min_coverage, "interval": interval,
                        "batch_size": batch_size, "genes": list(genes)}
            try:
                fp = slide_fingerprint(model_hash, r["path"], settings)
            except OSError as e:
                results[r["slide_id"]] = {"slide_id": r["slide_id"], "status": "failed", "seconds": 0.0,
                                          "error": f"slide {r['path']}: {e.strerror or one_line(e)}",
                                          "fingerprint": ""}
                continue
            if _done(out, r["slide_id"], fp):
                s = json.loads((out / "slides" / f"{r['slide_id']}.json").read_text())
                results[r["slide_id"]] = {"slide_id": r["slide_id"], "status": "ok", "error": "",
                                          "seconds": s["seconds"], "fingerprint": fp, "skipped": True}
                continue
            todo.append({"slide_id": r["slide_id"], "path": r["path"], "mpp": r["mpp"], "fingerprint": fp,
                         "out_dir": str(out), "model": model, "model_hash": model_hash, "loader": loader,
                         "min_coverage": min_coverage, "batch_size": batch_size, "interval": interval,
                         "genes": list(genes)})
        order = [r["slide_id"] for r in rows]
        skipped = sum(1 for r in results.values() if r.get("skipped"))
        if todo:
            submit, completed, close, n, threads = _executor(workers, dask, dask_local)
            try:
                futures = {}
                with _workers_skip_main():  # a process pool starts its workers at the first submit
                    for t in todo:  # tiles' progress bar only when slides run here, one at a time
                        futures[submit({**t, "threads": threads, "progress": progress and n == 1
                                        and not (dask or dask_local)})] = t
                bar = tqdm(total=len(todo), desc="slides", unit="slide", disable=not progress)
                for fut in completed(list(futures)):
                    t = futures[fut]
                    try:
                        res = fut.result()
                    except Exception as e:  # a worker died (segfault, OOM kill): that slide failed
                        res = {"slide_id": t["slide_id"], "status": "failed", "error": one_line(e),
                               "seconds": 0.0, "fingerprint": t["fingerprint"]}
                    results[t["slide_id"]] = res
                    _write_manifest(out, results, order)  # progress survives a crash
                    bar.update(1)
                    bar.set_postfix(failed=sum(r["status"] != "ok" for r in results.values()))
                bar.close()
            finally:
                close()
        _write_manifest(out, results, order)
        ok = [sid for sid in order if results[sid]["status"] == "ok"]
        cohort = aggregate_cohort(out, ok, aggregate)
        if cohort is not None:
            cohort.uns["stimage"] = {"cohort": {"model": model, "model_hash": model_hash, "aggregate": aggregate,
                                                "min_coverage": min_coverage, "interval": interval,
                                                "provenance": json.dumps(probe.provenance, default=str)}}
            write_h5ad(cohort, out / "cohort.h5ad", overwrite=True)
        elif (out / "cohort.h5ad").exists():
            (out / "cohort.h5ad").unlink()  # no slide succeeded: no stale cohort either
    return {"ok": len(ok), "failed": len(order) - len(ok), "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 3), "manifest": str(out / "manifest.csv"),
            "cohort": str(out / "cohort.h5ad") if ok else None, "results": results}
