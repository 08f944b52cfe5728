"""What the viewer serves: a section (spots of an ``.h5ad`` or a tile grid over a slide),
the model's prediction of it, overlays, spot numbers, and explanations run in the
background. NumPy, anndata, OpenCV and the project's JAX-free code only.

Predictions go through :func:`export.runtime.prediction.predict_adata` /
:func:`~export.runtime.prediction.predict_slide` (the one prediction path) and are cached
as ``.h5ad`` under the cache folder, keyed by content: the model's digest, the data's
fingerprint (or the slide file's digest, mpp and tissue threshold) and the interval, so a
reopened viewer is instant and a changed model or section is never served stale numbers.
Explanations are cached the same way (model, data, spot, gene, samples, seed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import cv2
import numpy as np

from data_pipelines import keys
from data_pipelines.errors import StimageError

__all__ = ["Section", "ViewerState", "LAYERS", "model_digest", "open_section"]

log = logging.getLogger(__name__)

# overlay layers: name → (label, where the values come from)
LAYERS = {"mean": "predicted mean", "var_epistemic": "epistemic variance", "var_aleatoric": "aleatoric variance",
          "observed": "observed counts"}
CACHE_FORMAT = "stimage-view/1"  # bump when a cached file's layout changes
OVERLAY_MAX_SIDE = 2048  # overlay PNG side (px): spots stay several px wide on a 40k slide


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_digest(path) -> str:
    """sha256 of a model's content: an ``.onnx`` file, or every file of a workdir's
    ``model/`` folder (relative names and bytes)."""
    from data_pipelines.fingerprint import file_digest
    from export.runtime.predictor import resolve_model_dir

    p = Path(path)
    if p.is_file():
        return file_digest(p)
    root = resolve_model_dir(p)
    files = sorted(f for f in root.rglob("*") if f.is_file())
    return _sha([[str(f.relative_to(root)), file_digest(f)] for f in files])


@dataclass
class Section:
    """The picture and its spots: ``slide`` (a :class:`data_pipelines.wsi.Slide` of the H&E),
    ``adata`` (the spots: the data, or the slide's tile grid after prediction), spot
    ``centres`` (N, 2) in slide px, spot ``diameter_px``, ``shape`` ("circle" spots or
    "square" grid tiles), ``observed`` (counts AnnData or None) and a content ``digest``."""

    kind: str  # "data" | "slide"
    name: str
    slide: object
    digest: str
    adata: ad.AnnData | None = None
    observed: ad.AnnData | None = None
    image_scale: float = 1.0
    diameter_px: float = 0.0
    shape: str = "circle"
    min_coverage: float = 0.7


def open_section(*, data=None, slide=None, mpp=None, min_coverage: float = 0.7) -> Section:
    """Read ``data`` (.h5ad of one section with its image) or open ``slide`` lazily."""
    from data_pipelines.fingerprint import adata_fingerprint, file_digest
    from data_pipelines.wsi import open_slide

    if (data is None) == (slide is None):
        raise StimageError("give --data X.h5ad or --slide S")
    if slide is not None:
        s = open_slide(slide, mpp=mpp)
        digest = _sha(["slide", file_digest(s.path), s.mpp, min_coverage])
        return Section("slide", Path(slide).stem, s, digest, shape="square", min_coverage=min_coverage)
    from data_pipelines.slides import read_h5ad
    from data_pipelines.tiles import sample_image_path, tile_geometry

    adata = read_h5ad(data)
    geo = tile_geometry(adata)
    if len(geo["samples"]) != 1:
        raise StimageError(f"{data} holds {len(geo['samples'])} samples; the viewer shows one section at a time")
    lib = next(iter(geo["samples"]))
    g = geo["samples"][lib]
    image = sample_image_path(adata, lib)
    if not image or not Path(image).is_file():
        raise StimageError(f"{data}: the image of sample {lib} ({image or 'none recorded'}) is not there")
    s = open_slide(image, mpp=g["mpp"] / g["image_scale"])
    return Section("data", lib, s, _sha(["data", adata_fingerprint(adata)]), adata=adata,
                   observed=adata if adata.n_vars else None, image_scale=float(g["image_scale"]),
                   diameter_px=float(geo["tile_um"]) / g["mpp"] * g["image_scale"])


class _Counting:
    """A Predictor that runs another one chunk by chunk and counts tiles, so the page can
    show the prediction's progress (``predict_adata`` has no callback)."""

    def __init__(self, inner, on_tiles):
        self._inner, self._on_tiles = inner, on_tiles
        for k in ("task", "genes", "tile_um", "tile_px", "stain", "provenance"):
            setattr(self, k, getattr(inner, k))

    def __getattr__(self, name):  # spot_features, embedding_sources, ... when the model has them
        return getattr(self._inner, name)

    def needs_tiles(self, features=None):
        return self._inner.needs_tiles(features)

    def params(self, tiles, *, batch_size=32, progress=False, features=None):
        if tiles is None or features:
            return self._inner.params(tiles, batch_size=batch_size, progress=progress, features=features)
        parts: dict[str, list] = {}
        for s in range(0, len(tiles), batch_size):
            for k, v in self._inner.params(tiles[s:s + batch_size], batch_size=batch_size, progress=False).items():
                parts.setdefault(k, []).append(np.asarray(v))
            self._on_tiles(min(batch_size, len(tiles) - s))
        return {k: np.concatenate(v, axis=1 if k in ("mu", "r") else 0) for k, v in parts.items()}


@dataclass
class Job:
    """A background explanation: state "queued" | "running" | "done" | "error"."""

    key: str
    spot: str
    gene: str
    state: str = "queued"
    done: int = 0
    total: int = 1
    error: str = ""
    result: dict = field(default_factory=dict)

    def status(self) -> dict:
        out = {"job": self.key, "spot": self.spot, "gene": self.gene, "state": self.state,
               "progress": round(self.done / max(self.total, 1), 4)}
        if self.error:
            out["error"] = self.error
        if self.state == "done":
            out.update({k: v for k, v in self.result.items() if k != "png"})
            out["image"] = f"/api/explain/{self.key}/image.png"
            out["csv"] = f"/api/explain/{self.key}/nuclei.csv"
        return out


@dataclass
class Loaded:
    """A model with its prediction of the section (swapped whole when a model is uploaded)."""

    model: object
    name: str
    digest: str
    pred: ad.AnnData | None = None
    centres: np.ndarray | None = None   # (N, 2) slide px
    index: dict = field(default_factory=dict)  # obs name → row
    source: str = ""  # where the prediction came from: "pred" (--pred), "cache" or "predicted"


class ViewerState:
    """Everything the app's routes read; thread-safe for uvicorn's worker threads."""

    def __init__(self, section: Section, model, model_name: str, model_hash: str, cache_dir, *, pred_path=None,
                 interval: float = 0.8, batch_size: int = 32, samples: int = 1000, progress: bool = True):
        self.section, self.cache = section, Path(cache_dir)
        self.interval, self.batch_size, self.samples, self.progress = interval, batch_size, samples, progress
        self.lock = threading.Lock()
        self.status = {"state": "starting", "message": "starting", "progress": 0.0, "generation": 0}
        self.current = Loaded(model, model_name, model_hash)
        self._overlays: dict = {}
        self.jobs: dict[str, Job] = {}
        self._explainer = ThreadPoolExecutor(1, thread_name_prefix="explain")  # LIME saturates the cores
        self._pred_path = pred_path
        self._stains: dict = {}

    # ---------------------------------------------------------------- predictions
    def start(self, wait: bool = False) -> None:
        """Predict (or read the cache / ``--pred``) in a background thread."""
        t = threading.Thread(target=self._predict, args=(self.current,), daemon=True, name="predict")
        t.start()
        if wait:
            t.join()

    def _set_status(self, state, message, progress=None, **extra):
        with self.lock:
            self.status = {**self.status, "state": state, "message": message, **extra}
            if progress is not None:
                self.status["progress"] = round(float(progress), 4)

    def _pred_cache(self, loaded: Loaded) -> Path:
        key = _sha([CACHE_FORMAT, "pred", loaded.digest, self.section.digest, self.interval])
        return self.cache / f"pred-{key[:40]}.h5ad"

    def _predict(self, loaded: Loaded) -> None:
        try:
            t0 = time.perf_counter()
            pred = self._load_or_predict(loaded)
            self._install(loaded, pred)
            self._set_status("ready", f"{loaded.name}: {pred.n_vars} genes on {pred.n_obs} "
                             f"{'spots' if self.section.kind == 'data' else 'tiles'} "
                             f"({time.perf_counter() - t0:.1f} s)", 1.0, source=loaded.source)
        except StimageError as e:
            self._set_status("error", f"error: {' '.join(str(e).split())}")
        except Exception as e:  # a server keeps serving; the page shows one line
            log.exception("prediction failed")
            self._set_status("error", f"error: prediction failed ({type(e).__name__}: {' '.join(str(e).split())})")

    def _load_or_predict(self, loaded: Loaded) -> ad.AnnData:
        from data_pipelines.io import write_h5ad
        from export.runtime.prediction import predict_adata, predict_slide

        if self._pred_path is not None and loaded is self.current and self.status["generation"] == 0:
            self._set_status("loading", f"reading {self._pred_path}", 0.0)
            loaded.source = "pred"
            return _check_pred(ad.read_h5ad(self._pred_path), str(self._pred_path), self.section)
        cached = self._pred_cache(loaded)
        if cached.is_file():
            self._set_status("loading", "reading cached predictions", 0.0)
            try:
                loaded.source = "cache"
                return ad.read_h5ad(cached)
            except Exception:  # a damaged cache file is recomputed, never served
                log.warning("cached prediction %s is unreadable; predicting again", cached)
        sec = self.section
        if sec.kind == "data":
            total = sec.adata.n_obs
        else:
            from data_pipelines.wsi import slide_grid

            self._set_status("predicting", "finding tissue", 0.0)
            total = len(slide_grid(sec.slide, tile_um=loaded.model.tile_um, min_coverage=sec.min_coverage)[0])
        seen = [0]

        def on_tiles(n):
            seen[0] += n
            self._set_status("predicting", f"predicting {seen[0]}/{total} {'spots' if sec.kind == 'data' else 'tiles'}",
                             seen[0] / total)

        first = f"cutting {total} tiles" if sec.kind == "data" else f"predicting 0/{total} tiles"
        self._set_status("predicting", first, 0.0)
        model = _Counting(loaded.model, on_tiles)
        loaded.source = "predicted"
        if sec.kind == "data":
            pred = predict_adata(sec.adata, model, batch_size=self.batch_size, progress=self.progress,
                                 interval=self.interval)
        else:
            pred = predict_slide(sec.slide, model, min_coverage=sec.min_coverage, batch_size=self.batch_size,
                                 progress=self.progress, interval=self.interval)
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            write_h5ad(pred, cached, overwrite=True)
        except OSError as e:  # a read-only cache folder costs a recomputation next time, nothing else
            log.warning("could not cache predictions in %s: %s", self.cache, e)
        return pred

    def _install(self, loaded: Loaded, pred: ad.AnnData) -> None:
        if keys.SPATIAL not in pred.obsm:
            raise StimageError("the prediction has no obsm['spatial'] spot positions")
        centres = np.asarray(pred.obsm[keys.SPATIAL], np.float64) * self.section.image_scale
        if self.section.kind == "slide" and not self.section.diameter_px:
            lib = next(iter(pred.uns.get(keys.SPATIAL_UNS, {})), None)
            sf = pred.uns[keys.SPATIAL_UNS][lib]["scalefactors"] if lib is not None else {}
            self.section.diameter_px = float(sf.get(keys.SPOT_DIAMETER_FULLRES, 0.0)) or 1.0
        loaded.pred, loaded.centres = pred, centres
        loaded.index = {n: i for i, n in enumerate(pred.obs_names)}
        with self.lock:
            self.current = loaded
            self._overlays.clear()

    def switch_model(self, model, name: str, digest: str) -> None:
        """Use another model: predicted in the background; the old one serves until then."""
        with self.lock:
            gen = self.status["generation"] + 1
            self.status = {**self.status, "generation": gen}
        nxt = Loaded(model, name, digest)
        threading.Thread(target=self._predict, args=(nxt,), daemon=True, name="predict").start()

    def ready(self) -> Loaded:
        cur = self.current
        if cur.pred is None:
            st = self.status
            if st["state"] == "error":
                raise StimageError(st["message"].removeprefix("error: "))
            raise _NotReady(f"predictions are being computed ({st['message']})")
        return cur

    # ---------------------------------------------------------------- queries
    def genes(self) -> dict:
        cur = self.current
        genes = list(cur.pred.var_names) if cur.pred is not None else list(cur.model.genes)
        layers = [k for k in LAYERS if k != "observed" or self.section.observed is not None]
        observed = ([g for g in genes if g in set(self.section.observed.var_names)]
                    if self.section.observed is not None else [])
        return {"genes": genes, "layers": layers, "layer_labels": {k: LAYERS[k] for k in layers},
                "observed_genes": observed, "ready": cur.pred is not None, "model": cur.name}

    def values(self, gene: str, layer: str) -> np.ndarray:
        """(N,) float64 values of ``layer`` for ``gene`` at the prediction's spots."""
        cur = self.ready()
        if layer not in LAYERS:
            raise StimageError(f"unknown layer {layer!r} (choose from {', '.join(LAYERS)})")
        if layer == "observed":
            obs = self.section.observed
            if obs is None or gene not in set(obs.var_names):
                raise StimageError(f"no observed counts for {gene!r} in this section")
            col = obs[:, gene].X
            col = np.asarray(col.toarray() if hasattr(col, "toarray") else col).ravel()
            where = obs.obs_names.get_indexer(cur.pred.obs_names)
            return np.where(where >= 0, col[np.clip(where, 0, None)], np.nan).astype(np.float64)
        if gene not in set(cur.pred.var_names):
            raise StimageError(f"gene {gene!r} is not predicted by this model")
        j = cur.pred.var_names.get_loc(gene)
        m = cur.pred.X if layer == "mean" else cur.pred.layers[layer]
        col = m[:, j]
        return np.asarray(col.toarray() if hasattr(col, "toarray") else col, np.float64).ravel()

    def spots(self, gene: str, layer: str) -> dict:
        cur = self.ready()
        v = self.values(gene, layer)
        lo, hi = _limits(v)
        return {"gene": gene, "layer": layer, "ids": list(cur.pred.obs_names), "x": cur.centres[:, 0].tolist(),
                "y": cur.centres[:, 1].tolist(), "values": [None if not np.isfinite(x) else float(x) for x in v],
                "vmin": lo, "vmax": hi, "diameter_px": self.section.diameter_px, "shape": self.section.shape,
                "width": self.section.slide.width, "height": self.section.slide.height}

    def spot_at(self, x: float, y: float) -> str | None:
        """The spot whose disc (or grid square) holds slide px (x, y), else None."""
        cur = self.ready()
        d = cur.centres - np.array([x, y])
        r = self.section.diameter_px / 2
        if self.section.shape == "square":
            inside = (np.abs(d) <= r).all(1)
            dist = np.abs(d).max(1)
        else:
            dist = np.hypot(d[:, 0], d[:, 1])
            inside = dist <= r
        if not inside.any():
            return None
        return str(cur.pred.obs_names[int(np.argmin(np.where(inside, dist, np.inf)))])

    def spot(self, spot: str, gene: str) -> dict:
        """A spot's numbers for ``gene``, straight from the prediction AnnData."""
        cur = self.ready()
        if spot not in cur.index:
            raise StimageError(f"spot {spot!r} is not in this section")
        if gene not in set(cur.pred.var_names):
            raise StimageError(f"gene {gene!r} is not predicted by this model")
        i, j = cur.index[spot], cur.pred.var_names.get_loc(gene)

        def at(m):
            v = m[i, j]
            return float(np.asarray(v.toarray() if hasattr(v, "toarray") else v).ravel()[0])

        p = cur.pred
        out = {"spot": spot, "gene": gene, "model": cur.name, "mean": at(p.X),
               "x": float(cur.centres[i, 0]), "y": float(cur.centres[i, 1])}
        for k in (keys.Q_LO, keys.Q_HI, keys.VAR_ALEATORIC, keys.VAR_EPISTEMIC):
            out[k] = at(p.layers[k]) if k in p.layers else None
        out["interval"] = float(p.uns.get(keys.STIMAGE_UNS, {}).get(keys.PREDICTION, {}).get("interval", self.interval))
        cov = p.obs[keys.TISSUE_COVERAGE].iloc[i] if keys.TISSUE_COVERAGE in p.obs else None
        out["tissue_coverage"] = None if cov is None else float(cov)
        obs = self.section.observed
        if obs is not None and gene in set(obs.var_names) and spot in obs.obs_names:
            v = obs[spot, gene].X
            out["observed"] = float(np.asarray(v.toarray() if hasattr(v, "toarray") else v).ravel()[0])
        else:
            out["observed"] = None
        return out

    def overlay_png(self, gene: str, layer: str) -> bytes:
        """RGBA PNG over the whole slide (longest side ≤ 2048 px): each spot (disc) or tile
        (square) filled with viridis of its value between the 1st and 99th percentiles;
        transparent elsewhere. Cached per (model, gene, layer)."""
        cur = self.ready()
        key = (id(cur), gene, layer)
        with self.lock:
            hit = self._overlays.get(key)
        if hit is not None:
            return hit
        v = self.values(gene, layer)
        lo, hi = _limits(v)
        sl = self.section.slide
        s = OVERLAY_MAX_SIDE / max(sl.width, sl.height)
        w, h = max(1, round(sl.width * s)), max(1, round(sl.height * s))
        scaled = np.clip((v - lo) / ((hi - lo) or 1.0), 0, 1)
        lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_VIRIDIS)[:, 0, ::-1]
        img = np.zeros((h, w, 4), np.uint8)
        r = self.section.diameter_px / 2 * s
        for (cx, cy), t in zip(cur.centres * s, scaled):
            if not np.isfinite(t):
                continue
            colour = (*(int(c) for c in lut[int(round(t * 255))]), 255)
            if self.section.shape == "square":
                cv2.rectangle(img, (int(round(cx - r)), int(round(cy - r))),
                              (max(int(round(cx + r)) - 1, int(round(cx - r))), max(int(round(cy + r)) - 1,
                                                                                      int(round(cy - r)))),
                              colour, thickness=-1)
            else:
                cv2.circle(img, (int(round(cx)), int(round(cy))), max(1, int(round(r))), colour, thickness=-1,
                           lineType=cv2.LINE_AA)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA))
        data = buf.tobytes()
        with self.lock:
            self._overlays[key] = data
        return data

    # ---------------------------------------------------------------- explanations
    def _tile(self, cur: Loaded, spot: str) -> np.ndarray:
        """The uint8 tile the model reads for ``spot`` (as prediction cut it)."""
        model, sec = cur.model, self.section
        if sec.kind == "data":
            from data_pipelines.tiles import spot_tiles

            return np.asarray(spot_tiles(sec.adata[[spot]].copy(), tile_um=model.tile_um, tile_px=model.tile_px,
                                         progress=False, stain=model.stain))[0]
        from data_pipelines.wsi import iter_grid_tiles

        i = cur.index[spot]
        crop_px = model.tile_um / sec.slide.mpp
        _, tiles = next(iter_grid_tiles(sec.slide, cur.centres[i:i + 1], crop_px, model.tile_px, 1))
        if model.stain is not None:
            from data_pipelines.stain_normalisation import apply_stain, fit_source

            src = self._stains.get(model.stain.method)
            if src is None:
                src = self._stains[model.stain.method] = fit_source(model.stain.method, sec.slide.thumbnail()[0])
            tiles = apply_stain(model.stain, src, tiles)
        return tiles[0]

    def explain(self, spot: str, gene: str, samples: int | None = None, seed: int = 0) -> Job:
        """Start (or return the finished or running) explanation of ``spot`` for ``gene``."""
        cur = self.ready()
        if spot not in cur.index:
            raise StimageError(f"spot {spot!r} is not in this section")
        if gene not in list(cur.model.genes):
            raise StimageError(f"gene {gene!r} is not predicted by this model")
        samples = int(samples or self.samples)
        if not 1 <= samples <= 100_000:
            raise StimageError(f"samples must be between 1 and 100000 (got {samples})")
        key = _sha([CACHE_FORMAT, "explain", cur.digest, self.section.digest, spot, gene, samples, int(seed)])[:32]
        with self.lock:
            job = self.jobs.get(key)
            if job is not None and job.state != "error":
                return job
            job = self.jobs[key] = Job(key, spot, gene, total=samples + 1)
        if self._load_explanation(job):
            return job
        self._explainer.submit(self._run_explain, job, cur, samples, int(seed))
        return job

    def _files(self, key: str) -> tuple[Path, Path]:
        return self.cache / f"explain-{key}.json", self.cache / f"explain-{key}.png"

    def _load_explanation(self, job: Job) -> bool:
        meta, png = self._files(job.key)
        if not (meta.is_file() and png.is_file()):
            return False
        try:
            job.result = {**json.loads(meta.read_text()), "png": png.read_bytes()}
        except (OSError, ValueError):
            return False
        job.state, job.done = "done", job.total
        return True

    def _run_explain(self, job: Job, cur: Loaded, samples: int, seed: int) -> None:
        from data_pipelines.io import atomic_path
        from export.runtime.lime import explain_tile, weight_image

        try:
            job.state = "running"
            tile = self._tile(cur, job.spot)

            def on_batch(done, total):
                job.done, job.total = done, total

            res = explain_tile(cur.model, tile, job.gene, num_samples=samples, seed=seed,
                               batch_size=min(50, samples + 1), progress=False, on_batch=on_batch)
            scale = max(1, int(np.ceil(384 / tile.shape[0])))
            img = weight_image(tile, res["instances"], res["weights_by_id"], scale=scale)
            ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            table = res["table"]
            rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}  # exact floats in JSON
                    for r in table.to_dict("records")]
            result = {"rows": rows, "columns": list(table.columns),
                      "n_nuclei": res["n_nuclei"], "score": res["score"], "value": res["value"],
                      "intercept": res["intercept"], "background_weight": res["background_weight"],
                      "note": res["note"], "samples": samples, "seed": seed, "mpp": res["mpp"],
                      "model": cur.name}
            try:
                self.cache.mkdir(parents=True, exist_ok=True)
                meta, png = self._files(job.key)
                with atomic_path(png) as tmp:
                    tmp.write_bytes(buf.tobytes())
                with atomic_path(meta) as tmp:  # the JSON last: its presence means both are complete
                    tmp.write_text(json.dumps(result))
            except OSError as e:
                log.warning("could not cache the explanation in %s: %s", self.cache, e)
            job.result = {**result, "png": buf.tobytes()}
            job.done = job.total
            job.state = "done"
        except StimageError as e:
            job.error, job.state = " ".join(str(e).split()), "error"
        except Exception as e:
            log.exception("explanation failed")
            job.error, job.state = f"explanation failed ({type(e).__name__}: {' '.join(str(e).split())})", "error"

    def close(self) -> None:
        self._explainer.shutdown(wait=False, cancel_futures=True)


class _NotReady(Exception):
    """Predictions are still being computed (the API answers 503)."""


def _limits(v: np.ndarray) -> tuple[float, float]:
    """Colour scale: the 1st and 99th percentiles of the finite values (robust to outliers)."""
    f = v[np.isfinite(v)]
    if not len(f):
        return 0.0, 1.0
    lo, hi = np.percentile(f, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _check_pred(pred: ad.AnnData, where: str, section: Section) -> ad.AnnData:
    """A ``--pred`` file must be a regression prediction with spot positions; for ``--data``
    its spots must be the data's."""
    missing = [k for k in (keys.Q_LO, keys.Q_HI, keys.VAR_ALEATORIC, keys.VAR_EPISTEMIC) if k not in pred.layers]
    if missing:
        raise StimageError(f"{where} is not a stimage regression prediction (no layers {', '.join(missing)})")
    if keys.SPATIAL not in pred.obsm:
        raise StimageError(f"{where} has no obsm['spatial'] spot positions")
    if section.kind == "data":
        extra = pred.obs_names.difference(section.adata.obs_names)
        if len(extra):
            raise StimageError(f"{where}: {len(extra)} spot(s) are not in the data (e.g. {extra[0]}); "
                               "is it a prediction of this section?")
    return pred
