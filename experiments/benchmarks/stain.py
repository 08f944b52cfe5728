"""Stain normalisation speed (issue 3): one JSON line.

A template is fitted on a low-resolution view (INTER_AREA, 1/8) of HER2ST section C2; each
method's slide statistics are fitted once on the same view of section C3, then ``apply_stain``
is timed on a batch of ``--tiles`` real 299² tiles cut at C3's spots (warm-up call first;
best of ``--reps`` timings). Fields: ``stain_ms_per_tile`` (Vahadane, the default),
``macenko_ms_per_tile``, ``reinhard_ms_per_tile``, ``fit_slide_s`` (Vahadane ``fit_source``
on the low-res view), ``staintools_ms_per_tile`` (staintools' Vahadane transform per tile,
which refits the source per tile, or null when staintools is not installed).

Usage: python experiments/benchmarks/stain.py [--tiles 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from data_pipelines.stain_normalisation import METHODS, apply_stain, fit_source, fit_stain
from data_pipelines.tiles import load_image

from _common import timed  # noqa: E402  (this directory is on sys.path)

TILE = 299


def section(shared: Path, name: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Full-resolution RGB image and spot table of a HER2ST patient-C section."""
    img_path = next((shared / "data" / "her2st" / "data" / "ST-imgs" / "C" / name).glob("*.jpg"))
    spots = pd.read_csv(shared / "data" / "her2st" / "data" / "ST-spotfiles" / f"{name}_selection.tsv", sep="\t")
    return load_image(img_path), spots


def lowres(img: np.ndarray, factor: int = 8) -> np.ndarray:
    return cv2.resize(img, (img.shape[1] // factor, img.shape[0] // factor), interpolation=cv2.INTER_AREA)


def spot_tiles(img: np.ndarray, spots: pd.DataFrame, n: int) -> np.ndarray:
    """``n`` (TILE, TILE, 3) crops centred on spots lying wholly inside the image."""
    h, w = img.shape[:2]
    out = []
    for x, y in spots[["pixel_x", "pixel_y"]].to_numpy():
        x0, y0 = int(round(x)) - TILE // 2, int(round(y)) - TILE // 2
        if 0 <= x0 and 0 <= y0 and x0 + TILE <= w and y0 + TILE <= h:
            out.append(img[y0:y0 + TILE, x0:x0 + TILE])
        if len(out) == n:
            break
    return np.stack(out)


def staintools_ms(template: np.ndarray, tiles: np.ndarray) -> float | None:
    try:
        import staintools
    except ImportError:
        return None
    norm = staintools.StainNormalizer(method="vahadane")
    norm.fit(staintools.LuminosityStandardizer.standardize(template))
    few = tiles[:8]  # per-tile dictionary learning: slow, so time a few
    f = lambda: [norm.transform(staintools.LuminosityStandardizer.standardize(t)) for t in few]  # noqa: E731
    return 1000 * timed(f, 1) / len(few)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED", str(Path(__file__).resolve().parents[3] / "shared")))
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    shared = Path(args.shared)
    template_img, _ = section(shared, "C2")
    template = lowres(template_img)
    del template_img
    img, spots = section(shared, "C3")
    slide = lowres(img)
    tiles = spot_tiles(img, spots, args.tiles)
    del img

    res: dict[str, float | None] = {}
    for method in METHODS:
        ref = fit_stain(method, template)
        t = time.perf_counter()
        src = fit_source(method, slide)
        fit_s = time.perf_counter() - t
        ms = 1000 * timed(lambda: apply_stain(ref, src, tiles), args.reps) / len(tiles)
        key = "stain_ms_per_tile" if method == "vahadane" else f"{method}_ms_per_tile"
        res[key] = round(ms, 3)
        if method == "vahadane":
            res["fit_slide_s"] = round(fit_s, 3)
    st = staintools_ms(template, tiles)
    res["staintools_ms_per_tile"] = None if st is None else round(st, 3)
    res["tiles"] = len(tiles)
    res["tile_px"] = TILE
    print(json.dumps(res))


if __name__ == "__main__":
    main()
