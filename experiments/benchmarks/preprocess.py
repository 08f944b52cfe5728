"""Preprocessing benchmark (issue 3): one JSON line on stdout (progress on stderr).

Real data are read in place from ``$STIMAGE_SHARED`` (default ``../shared`` beside the
repository); everything written (trained models, feature caches, predictions, generated
slides) goes under ``--workdir``.

Fields:
- ``stain_ms_per_tile``: Vahadane ``apply_stain`` per 299² tile after the per-slide fit
  (template: ``fit_stain`` on a low-resolution view of HER2ST C2; source: ``fit_source`` on
  the same view of C3), on a batch of ``--stain-tiles`` real C3 spot tiles
  (``spot_tiles(read_her2st(.., "C3"), tile_px=299)``); warm-up call, then best of ``--reps``.
  ``stain_fit_source_s``: that per-slide fit. ``staintools_ms_per_tile``: staintools' Vahadane
  (fitted on the template, ``transform`` per tile, which refits the tile's stains) timed on
  8 of the tiles, or null when staintools is not importable.
- ``pipeline_vs_model``: end-to-end slide → h5ad throughput divided by model-only throughput,
  same run. Model: a 1-member EfficientNet-Lite0 model with Vahadane stain normalisation,
  trained on HER2ST C2+C3 for 3 epochs (``stimage_jax.pipeline.train``; cached in the
  workdir). Pipeline (``pipeline_tiles_per_s``): ``export.runtime.prediction.slide_to_files`` on the
  C4 H&E JPEG opened at the mpp HER2ST's reader estimates, with the model's
  ``member_params`` as ``stimage predict --slide`` calls it (reading, tiling, tissue QC,
  Vahadane, model, writing the .h5ad), after the model was compiled at the batch size.
  Model only (``model_tiles_per_s``): ``member_params`` on ``--model-tiles`` pre-made uint8
  299² tiles, batch ``--batch`` (32). The slide is run ``--pipeline-reps`` (2) times with a
  model-only timing before, between and after; each side reports its best (the machine may
  be shared; ``load_avg_1min`` at the end). Also ``slide_tiles`` (tiles predicted on C4),
  ``pipeline_s`` (best run), ``pipeline_model_s`` (time inside ``member_params`` in that run;
  the rest is setup — decoding the JPEG, tissue mask, stain fit — writing, and preprocessing
  the prefetch thread did not hide), ``pipeline_first_s`` (first run) and
  ``pipeline_last_batch_s`` (its final, partial batch: the CLI passes ``batch_size=len(tiles)``,
  so a new batch shape compiles there on the first slide).
- ``peak_rss_mb_small`` / ``peak_rss_mb_large``: peak RSS (``VmHWM``) of a fresh
  ``stimage predict --slide`` process on generated pyramidal tiled TIFFs of
  ``--small-px``² and ``--large-px``² pixels at 0.5 µm/px (resolution tags), written tile by
  tile from a generator (four H&E-coloured blobs with nuclei and noise on white glass, about
  a quarter of the area; levels 1/4, 1/16, ... down to ≤ 4096 px; JPEG tiles when
  imagecodecs is installed, else zlib: about 1 GB for 40960², deleted at the end unless
  ``--keep``; free disk is checked first). The model is a cheap
  1-member ``tiny`` backbone at 64 px (C2+C3, no stain, ``--rss-tile-um`` µm tiles), since
  this measures streaming, not the backbone. ``large_over_small_rss`` (target ≤ 1.10),
  ``rss_growth_mb``, ``rss_tiles_*`` and ``rss_seconds_*`` (wall time of each process).
- ``backend`` (JAX), ``date`` (UTC), ``seconds`` (whole run: about 4-8 min on 2 cores once
  the models are trained and cached; the first run trains them, 1-2 min more).

Usage: python experiments/benchmarks/preprocess.py [--workdir runs/bench_preprocess]
       [--skip-pipeline] [--skip-rss] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import jax
import numpy as np

from data_pipelines.slides import read_her2st
from data_pipelines.stain_normalisation import apply_stain, fit_source, fit_stain
from data_pipelines.tiles import load_image, lowres_view, sample_image_path, spot_tiles

from _common import timed  # noqa: E402  (this directory is on sys.path)
from stain import staintools_ms  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["C2", "C3"]
SLIDE_MPP = 0.5
TIFF_TILE = 512
GLASS = np.array([243, 242, 246], np.uint8)
EOSIN = np.array([231, 152, 196], np.float32)
HAEMATOXYLIN = np.array([92, 62, 148], np.float32)
NUCLEAR_FRACTION = 0.16  # area fraction of nuclei drawn at level 0 (used for the coarse levels)
# (centre x, centre y, semi-axis x, semi-axis y) in slide fractions, plus boundary wobble phases
BLOBS = [(0.28, 0.30, 0.20, 0.15, 0.3, 1.1), (0.73, 0.31, 0.16, 0.12, 2.0, 0.4),
         (0.30, 0.75, 0.14, 0.11, 4.1, 2.7), (0.72, 0.74, 0.12, 0.09, 1.7, 5.2)]

# Runs the CLI in a fresh interpreter, then reports its own peak RSS (KB) on stderr. VmHWM
# is the high-water mark of this process's own address space (reset at exec); ru_maxrss is
# not used: Linux carries it across fork+exec, so it reports the parent's (this benchmark's,
# ~1 GB with EfficientNet loaded) RSS at fork when that is larger.
_WRAPPER = (
    "import sys\n"
    "from stimage_jax.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = next((l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), '0')\n"
    "print(f'PEAK_RSS_KB {hwm}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- stain normalisation
def stain_speed(adatas: dict, n_tiles: int, reps: int) -> tuple[dict, np.ndarray]:
    template = lowres_view(load_image(sample_image_path(adatas["C2"], "C2")))
    ref = fit_stain("vahadane", template)
    slide = lowres_view(load_image(sample_image_path(adatas["C3"], "C3")))
    t = time.perf_counter()
    src = fit_source("vahadane", slide)
    fit_s = time.perf_counter() - t
    tiles = np.ascontiguousarray(spot_tiles(adatas["C3"], tile_px=299, progress=False)[:n_tiles])
    ms = 1000 * timed(lambda: apply_stain(ref, src, tiles), reps) / len(tiles)
    out = {"stain_ms_per_tile": round(ms, 3), "stain_fit_source_s": round(fit_s, 3), "stain_tiles": len(tiles),
           "staintools_ms_per_tile": None if (st := staintools_ms(template, tiles)) is None else round(st, 3)}
    return out, tiles


# ---------------------------------------------------------------- pipeline vs model
def pipeline_vs_model(shared: Path, adatas: dict, wd: Path, tiles: np.ndarray, batch: int, pipe_reps: int,
                      model_tiles: int) -> dict:
    from export.runtime.prediction import slide_to_files
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.pipeline import train

    t0 = time.perf_counter()
    model = train([adatas[s] for s in TRAIN], wd / "model_effnet", backbone="efficientnet_lite0", members=1,
                  stain="vahadane", config=TrainConfig(max_epochs=3), progress=False, overwrite=True)
    log(f"efficientnet_lite0 model ready ({time.perf_counter() - t0:.0f} s)")
    cfg = model.config
    c4 = read_her2st(shared / "data" / "her2st", "C4", require_image=True)
    slide_path = sample_image_path(c4, "C4")
    mpp = float(c4.uns["stimage"]["mpp"])

    # Model only: pre-made uint8 tiles, compiled at the batch size first. The machine may be
    # shared, so model-only timings are interleaved with the pipeline runs and the best of
    # each is compared (both see the same spread of background load).
    premade = np.ascontiguousarray(np.resize(tiles, (model_tiles, *tiles.shape[1:])))
    model.member_params(premade[:batch], batch_size=batch, progress=False)

    def model_only() -> float:
        t = time.perf_counter()
        model.member_params(premade, batch_size=batch, progress=False)
        return time.perf_counter() - t

    calls: list[float] = []

    class Timed:  # the model itself, its params() timed
        def __getattr__(self, name):
            return getattr(model, name)

        def params(self, t, **kw):
            s = time.perf_counter()
            out = model.params(t, **kw)
            calls.append(time.perf_counter() - s)
            return out

    out = wd / "C4_slide_pred.h5ad"
    model_s, runs = [model_only()], []
    for _ in range(pipe_reps):
        calls.clear()
        t = time.perf_counter()
        pred, _ = slide_to_files(slide_path, Timed(), out, mpp=mpp, batch_size=batch, overwrite=True,
                                 progress=False)
        runs.append({"s": time.perf_counter() - t, "model_s": sum(calls), "last_batch_s": calls[-1]})
        log(f"pipeline: {pred.n_obs} tiles in {runs[-1]['s']:.1f} s (model {runs[-1]['model_s']:.1f} s)")
        model_s.append(model_only())
    n = pred.n_obs
    model_tps = model_tiles / min(model_s)
    best = min(runs, key=lambda r: r["s"])
    pipe_tps = n / best["s"]
    log(f"model only: {[round(model_tiles / m, 1) for m in model_s]} tiles/s")
    return {"pipeline_vs_model": round(pipe_tps / model_tps, 3), "slide": Path(slide_path).name,
            "slide_mpp": round(mpp, 4), "slide_tiles": n, "pipeline_tiles_per_s": round(pipe_tps, 2),
            "model_tiles_per_s": round(model_tps, 2), "pipeline_s": round(best["s"], 1),
            "pipeline_model_s": round(best["model_s"], 1), "pipeline_first_s": round(runs[0]["s"], 1),
            "pipeline_last_batch_s": round(runs[0]["last_batch_s"], 2),
            "pipeline_batch": batch, "tile_px": cfg["tile_px"], "tile_um": cfg["tile_um"],
            "backbone": "efficientnet_lite0", "stain": "vahadane",
            "load_avg_1min": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------- generated slides
def _noise_bank(sigma: float) -> np.ndarray:
    return np.round(np.random.default_rng(7).normal(0, sigma, (2 * TIFF_TILE, 2 * TIFF_TILE, 3))).astype(np.int16)


_NOISE = {}


def _render(ty: int, tx: int, f: int, side: int, white: np.ndarray) -> np.ndarray:
    """Tile (ty, tx) of the pyramid level downsampled ``f`` times from a ``side``² slide."""
    n = TIFF_TILE
    x = (tx * n + np.arange(0, n, 8, dtype=np.float32) + 4) * f / side  # shape on an 8-px grid
    y = (ty * n + np.arange(0, n, 8, dtype=np.float32) + 4) * f / side
    inside = None
    for cx, cy, a, b, p1, p2 in BLOBS:
        if x[0] > cx + 1.3 * a or x[-1] < cx - 1.3 * a or y[0] > cy + 1.3 * b or y[-1] < cy - 1.3 * b:
            continue
        dx, dy = (x[None, :] - cx) / a, (y[:, None] - cy) / b
        th = np.arctan2(dy, dx)
        m = np.hypot(dx, dy) < 1 + 0.15 * np.sin(3 * th + p1) + 0.08 * np.sin(7 * th + p2)
        inside = m if inside is None else inside | m
    if inside is None or not inside.any():
        return white
    rng = np.random.default_rng((f, ty, tx))
    xf = (tx * n + np.arange(n, dtype=np.float32)) * f / side
    yf = (ty * n + np.arange(n, dtype=np.float32)) * f / side
    shade = np.round(14 * np.sin(xf[None, :] * 90) * np.cos(yf[:, None] * 70)).astype(np.int16)[..., None]
    if f == 1:  # level 0: eosin with haematoxylin nuclei and pixel noise
        tissue = np.empty((n, n, 3), np.uint8)
        tissue[:] = EOSIN.astype(np.uint8)
        k = int(NUCLEAR_FRACTION * n * n / (np.pi * 4.5 ** 2))
        colour = tuple(int(c) for c in HAEMATOXYLIN)
        for (px, py), r in zip(rng.integers(0, n, (k, 2)).tolist(), rng.integers(3, 7, k).tolist()):
            cv2.circle(tissue, (px, py), r, colour, -1)
        sigma = 4.0
    else:  # coarser levels: the area average of the same mixture
        tissue = np.empty((n, n, 3), np.uint8)
        tissue[:] = np.round((1 - NUCLEAR_FRACTION) * EOSIN + NUCLEAR_FRACTION * HAEMATOXYLIN).astype(np.uint8)
        sigma = 1.5
    bank = _NOISE.get(sigma)
    if bank is None:
        bank = _NOISE[sigma] = _noise_bank(sigma)
    oy, ox = rng.integers(0, n, 2)
    tissue = np.clip(tissue + shade + bank[oy:oy + n, ox:ox + n], 0, 255).astype(np.uint8)
    if inside.all():
        return tissue
    full = cv2.resize(inside.astype(np.uint8), (n, n), interpolation=cv2.INTER_NEAREST).astype(bool)
    return np.where(full[..., None], tissue, white)


def make_slide(path: Path, side: int) -> dict:
    """Pyramidal tiled TIFF, generated tile by tile (memory-flat), 0.5 µm/px in the tags."""
    import tifffile

    assert side % TIFF_TILE == 0
    levels = [1]
    while side // levels[-1] > 4096:
        levels.append(levels[-1] * 4)
    compression = "jpeg" if importlib.util.find_spec("imagecodecs") else "zlib"
    kw = dict(dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", compression=compression,
              maxworkers=2, metadata=None)
    white = np.broadcast_to(GLASS, (TIFF_TILE, TIFF_TILE, 3)).copy()

    def tiles(f):
        n = side // f // TIFF_TILE if side // f >= TIFF_TILE else 1
        for ty in range(n):
            for tx in range(n):
                yield _render(ty, tx, f, side, white)

    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        tw.write(tiles(1), shape=(side, side, 3), subifds=len(levels) - 1,
                 resolution=(1e4 / SLIDE_MPP, 1e4 / SLIDE_MPP), resolutionunit="CENTIMETER", **kw)
        for f in levels[1:]:
            s = max(side // f, TIFF_TILE)
            tw.write(tiles(f), shape=(s, s, 3), subfiletype=1, **kw)
    os.replace(tmp, path)
    return {"seconds": round(time.perf_counter() - t, 1), "mb": round(path.stat().st_size / 1e6, 1),
            "levels": [side // f for f in levels], "compression": compression}


def slide_info(path: Path) -> dict:
    """Tissue fraction of the thumbnail's mask, and which reader ``open_slide`` picks."""
    from data_pipelines.wsi import open_slide, tissue_mask

    slide = open_slide(path)
    return {"tissue_fraction": round(float(tissue_mask(slide.thumbnail()[0]).mean()), 3),
            "reader": getattr(slide, "backend", "tifffile")}


def predict_rss(model_dir: Path, slide: Path, out: Path, batch: int, gene: str) -> dict:
    """``stimage predict --slide`` in a fresh interpreter: peak RSS, tiles, seconds.

    ``--genes`` (one heatmap PNG) is passed because ``stimage predict --slide`` without it
    fails in ``cli._csv(None)`` (reported, not fixed here).
    """
    cmd = [sys.executable, "-c", _WRAPPER, "predict", "--model", str(model_dir), "--slide", str(slide),
           "--out", str(out), "--batch-size", str(batch), "--genes", gene, "--overwrite", "--quiet"]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath}
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"predict on {slide.name} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
    m = re.search(r"PEAK_RSS_KB (\d+)", p.stderr)
    tiles = re.search(r"for (\d+) tiles", p.stdout)
    return {"rss_mb": int(m.group(1)) / 1024,
            "tiles": int(tiles.group(1)), "seconds": secs}


def rss_runs(adatas: dict, wd: Path, args) -> dict:
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.pipeline import train

    t0 = time.perf_counter()
    model = train([adatas[s] for s in TRAIN], wd / "model_tiny", backbone="tiny", tile_px=64, tile_um=args.rss_tile_um,
          members=1, config=TrainConfig(max_epochs=3), progress=False, overwrite=True)
    log(f"tiny model ready ({time.perf_counter() - t0:.0f} s)")
    res: dict = {}
    made = []
    for name, side in (("small", args.small_px), ("large", args.large_px)):
        path = wd / "slides" / f"{name}_{side}px.tif"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            du = shutil.disk_usage(path.parent)
            log(f"disk free under {path.parent}: {du.free / 1e9:.1f} GB")
            raw_gb = side * side * 3 / 1e9
            if du.free < max(2e9, 0.6 * raw_gb * 1e9):  # zlib of the textured quarter + margin
                raise RuntimeError(f"not enough disk for a {side}² slide ({du.free / 1e9:.1f} GB free)")
            log(f"writing {path.name} ...")
            info = make_slide(path, side)
            log(f"  {info}")
            res[f"rss_slide_{name}"] = {"px": side, **info}
        else:
            res[f"rss_slide_{name}"] = {"px": side, "mb": round(path.stat().st_size / 1e6, 1), "reused": True}
        made.append(path)
        res[f"rss_slide_{name}"].update(slide_info(path))
        log(f"predicting {path.name} in a fresh process ...")
        r = predict_rss(wd / "model_tiny", path, wd / f"{name}_pred.h5ad", args.batch, model.genes[0])
        log(f"  {r}")
        res[f"peak_rss_mb_{name}"] = round(r["rss_mb"], 1)
        res[f"rss_tiles_{name}"] = r["tiles"]
        res[f"rss_seconds_{name}"] = round(r["seconds"], 1)
    res["large_over_small_rss"] = round(res["peak_rss_mb_large"] / res["peak_rss_mb_small"], 3)
    res["rss_growth_mb"] = round(res["peak_rss_mb_large"] - res["peak_rss_mb_small"], 1)
    res["rss_model"] = {"backbone": "tiny", "tile_px": 64, "tile_um": args.rss_tile_um, "batch": args.batch}
    if not args.keep:
        for p in made:
            p.unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/bench_preprocess")
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--stain-tiles", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model-tiles", type=int, default=256, help="pre-made tiles for the model-only timing")
    ap.add_argument("--pipeline-reps", type=int, default=2, help="slide runs (model-only timed between them)")
    ap.add_argument("--small-px", type=int, default=10240)
    ap.add_argument("--large-px", type=int, default=40960)
    ap.add_argument("--rss-tile-um", type=float, default=100.0, help="tile side of the tiny model (µm)")
    ap.add_argument("--skip-pipeline", action="store_true", help="no pipeline_vs_model")
    ap.add_argument("--skip-rss", action="store_true", help="no generated-slide memory runs")
    ap.add_argument("--keep", action="store_true", help="keep the generated slides")
    args = ap.parse_args()
    shared, wd = Path(args.shared), Path(args.workdir)
    if not (shared / "data" / "her2st").is_dir():
        sys.exit(f"HER2ST not found under {shared} (set STIMAGE_SHARED)")
    wd.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    out: dict = {"benchmark": "preprocess", "backend": jax.default_backend(),
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    adatas = {s: read_her2st(shared / "data" / "her2st", s, require_image=True) for s in TRAIN}
    stain, tiles = stain_speed(adatas, args.stain_tiles, args.reps)
    out.update(stain)
    log(f"stain: {stain}")
    if not args.skip_pipeline:
        out.update(pipeline_vs_model(shared, adatas, wd, tiles, args.batch, args.pipeline_reps, args.model_tiles))
    if not args.skip_rss:
        out.update(rss_runs(adatas, wd, args))
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
