"""``stimage view`` at slide scale: Deep Zoom tile latency, the first overlay, memory while panning.

    python experiments/benchmarks/viewer.py --model M.onnx [--side 40000] [--workdir runs/bench_viewer]

1. Writes a ``side``² px pyramidal tiled TIFF (JPEG tiles of 256², levels down to ~1,000 px,
   0.25 µm/px) with tifffile, tile by tile from a procedural H&E-like texture, so memory
   stays small; tissue is an ellipse covering ~half the slide (with 100 µm tiles at
   0.25 µm/px on a 40k² slide: ~5,000 grid tiles on tissue).
2. Starts ``python -m export.viewer --slide`` on it (a subprocess, as a user would), waits for
   the start-up prediction of every tissue tile (reported: tiles and seconds), then times
   the first overlay (``/api/spots`` + ``/api/overlay.png``, uncached) for those tiles.
3. Pans: every tile of the levels up to 1/8 resolution, then ``--random-tiles`` random
   full-resolution tiles, one keep-alive client, sampling the server's RSS every 100
   requests. Tile latency p50/p99 is over the full-resolution tiles (never cached: each is
   read, resized and JPEG-encoded), with the OpenSlide reader (what ``auto`` picks for this
   TIFF) and again with the tifffile reader (``--backend tifffile`` pyramid in SubIFDs).

Prints one JSON line; the CPU flags that matter for speed are included.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import cpu_flags  # noqa: E402  (this directory is on sys.path)

ROOT = Path(__file__).resolve().parents[2]
TILE = 256




def _texture(h: int, w: int, rng) -> np.ndarray:
    """H&E-like RGB tissue (h, w, 3): pink stroma with purple nucleus-like blobs and noise."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ys += rng.uniform(0, 1000)
    xs += rng.uniform(0, 1000)
    nuc = (np.sin(xs / 9.0) * np.sin(ys / 11.0) + np.sin((xs + ys) / 37.0)) > 1.1
    noise = rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    tissue = np.where(nuc[..., None], np.float32([95, 60, 150]), np.float32([222, 150, 190])) + noise
    return np.clip(tissue, 0, 255).astype(np.uint8)


GLASS = (236, 236, 240)


def write_slide(path: Path, side: int, *, subifds: bool, mpp: float = 0.25) -> None:
    """A pyramidal tiled JPEG TIFF, written tile by tile (memory: a few tiles). Tissue is an
    ellipse; tiles wholly inside it are drawn from 8 precomputed texture variants and only
    tiles on its edge are composed pixel by pixel (writing stays cheap on 2 shared cores)."""
    import tifffile

    rng = np.random.default_rng(0)
    variants = [_texture(TILE, TILE, rng) for _ in range(8)]
    glass = np.empty((TILE, TILE, 3), np.uint8)
    glass[...] = GLASS
    sizes = [side]
    while sizes[-1] > 2000:
        sizes.append(sizes[-1] // 2)

    def inside(xs, ys):
        c = side / 2
        return ((xs - c) / (0.42 * side)) ** 2 + ((ys - c) / (0.38 * side)) ** 2 <= 1.0

    def tiles(n: int):
        scale = side / n
        k = 0
        for ty in range(0, n, TILE):
            for tx in range(0, n, TILE):
                k += 1
                corners = inside(np.array([tx, tx + TILE, tx, tx + TILE]) * scale,
                                 np.array([ty, ty, ty + TILE, ty + TILE]) * scale)
                tex = variants[k % len(variants)]
                if corners.all():
                    yield tex
                    continue
                ys, xs = np.mgrid[ty:ty + TILE, tx:tx + TILE].astype(np.float32) * scale
                m = inside(xs, ys)
                yield tex if m.all() else (glass if not m.any() else np.where(m[..., None], tex, glass))

    res = (1e4 / mpp, 1e4 / mpp)
    opts = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(sizes[0]), shape=(side, side, 3), subifds=len(sizes) - 1 if subifds else None,
                 resolution=res, resolutionunit="CENTIMETER", **opts)
        for n in sizes[1:]:
            tw.write(tiles(n), shape=(n, n, 3), subfiletype=1, **opts)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Client:
    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=600)

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.status, r.read()


def run_viewer(args, slide: Path, backend_note: str, pred: Path | None = None) -> dict:
    cache = Path(args.workdir) / f"cache_{backend_note}"
    cmd = [sys.executable, "-m", "export.viewer", "--quiet", "--model", str(args.model), "--slide", str(slide),
           "--mpp", "0.25", "--port", "0", "--cache", str(cache), "--batch-size", "64"]
    if pred is not None:  # the same pixels in another layout: reuse the first run's prediction
        cmd += ["--pred", str(pred)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("viewing "):
            raise SystemExit(f"viewer did not start: {line}{proc.stderr.read()[-2000:]}")
        url = line.split(" on ")[1].split()[0]
        c = Client(url)
        while True:
            st = json.loads(c.get("/api/status")[1])
            if st["state"] in ("ready", "error"):
                break
            time.sleep(0.5)
        if st["state"] != "ready":
            raise SystemExit(st["message"])
        ready_s = time.perf_counter() - t0
        genes = json.loads(c.get("/api/genes")[1])["genes"]
        t = time.perf_counter()
        spots = json.loads(c.get(f"/api/spots?gene={genes[0]}&layer=mean")[1])
        code, png = c.get(f"/api/overlay.png?gene={genes[0]}&layer=mean")
        first_overlay = time.perf_counter() - t
        assert code == 200
        # pan: every tile of the coarse levels, then random full-resolution tiles
        dzi = c.get("/slide.dzi")[1].decode()
        w = int(dzi.split('Width="')[1].split('"')[0])
        h = int(dzi.split('Height="')[1].split('"')[0])
        top = int(np.ceil(np.log2(max(w, h))))
        rss, lat = [rss_mib(proc.pid)], []
        n = 0
        for level in range(top - 3 + 1):
            lw, lh = -(-w // 2 ** (top - level)), -(-h // 2 ** (top - level))
            for row in range(-(-lh // 254)):
                for col in range(-(-lw // 254)):
                    assert c.get(f"/slide_files/{level}/{col}_{row}.jpeg")[0] == 200
                    n += 1
                    if n % 100 == 0:
                        rss.append(rss_mib(proc.pid))
        rng = np.random.default_rng(1)
        cols, rows = -(-w // 254), -(-h // 254)
        for i in range(args.random_tiles):
            col, row = int(rng.integers(cols)), int(rng.integers(rows))
            t = time.perf_counter()
            code, body = c.get(f"/slide_files/{top}/{col}_{row}.jpeg")
            lat.append(time.perf_counter() - t)
            assert code == 200 and body[:2] == b"\xff\xd8"
            n += 1
            if n % 100 == 0:
                rss.append(rss_mib(proc.pid))
        rss.append(rss_mib(proc.pid))
        lat_ms = np.asarray(lat) * 1e3
        return {"backend": backend_note, "tissue_tiles": len(spots["ids"]), "ready_s": round(ready_s, 1),
                "source": st.get("source"), "first_overlay_s": round(first_overlay, 3),
                "overlay_png_kb": round(len(png) / 1024, 1),
                "tile_ms_p50": round(float(np.percentile(lat_ms, 50)), 1),
                "tile_ms_p99": round(float(np.percentile(lat_ms, 99)), 1),
                "tiles_requested": n, "rss_mib_start": round(rss[0], 1), "rss_mib_end": round(rss[-1], 1),
                "rss_mib_max": round(max(rss), 1), "rss_samples": len(rss)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="exported .onnx")
    ap.add_argument("--side", type=int, default=40_000)
    ap.add_argument("--workdir", default="runs/bench_viewer")
    ap.add_argument("--random-tiles", type=int, default=1000)
    ap.add_argument("--backends", default="openslide,tifffile", help="slide readers to measure, in order")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "viewer", "side_px": a.side, "model": Path(a.model).name, "cpu": cpu_flags(),
           "cores": len(os.sched_getaffinity(0))}
    for note in a.backends.split(","):
        subifds = note == "tifffile"  # OpenSlide's generic-tiff driver ignores SubIFD pyramids
        slide = wd / f"slide_{a.side}_{note}.tif"
        if not slide.exists():
            t = time.perf_counter()
            write_slide(slide.with_suffix(".tmp.tif"), a.side, subifds=subifds)
            slide.with_suffix(".tmp.tif").rename(slide)
            out[f"write_{note}_s"] = round(time.perf_counter() - t, 1)
        out[f"slide_{note}_mb"] = round(slide.stat().st_size / 2**20, 1)
        from data_pipelines.wsi import open_slide

        assert open_slide(slide, mpp=0.25).backend == note, note
        pred = None
        if note == "tifffile":
            pred = next(iter(sorted((wd / "cache_openslide").glob("pred-*.h5ad"))), None)
        out[note] = run_viewer(a, slide, note, pred)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
