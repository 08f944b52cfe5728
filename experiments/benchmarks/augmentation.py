"""Augmentation speed (issue 3): one JSON line.

Times ``augment`` (one jitted call per batch) on a batch of ``--batch`` random uint8
299² tiles after a warm-up call that compiles it; best of ``--reps`` timings, divided by the
batch size. Fields: ``augment_ms_per_tile`` (the default ``AugmentConfig``: dihedral,
affine with p 0.5, one of blur/noise/HSV/greyscale with p 0.125 each), ``batch``,
``tile_px``, ``backend``; and ``all_ops_ms_per_tile``: every op on every tile (stain
jitter, affine, blur, noise, HSV, greyscale, ``photometric="independent"``, all p = 1),
the worst case. Random tiles, not real ones: the graph has no data-dependent branches, so
its cost does not depend on the pixels.

Usage: python experiments/benchmarks/augmentation.py [--batch 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from data_pipelines.augmentation import AugmentConfig, augment

TILE = 299


def ms_per_tile(tiles: jax.Array, config: AugmentConfig, reps: int) -> float:
    key = jax.random.key(0)
    augment(key, tiles, config).block_until_ready()  # compile
    best = float("inf")
    for i in range(reps):
        k = jax.random.fold_in(key, i + 1)
        t = time.perf_counter()
        augment(k, tiles, config).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 1000.0 * best / tiles.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    tiles = jax.device_put(np.random.default_rng(0).integers(0, 256, (args.batch, TILE, TILE, 3), dtype=np.uint8))
    default = ms_per_tile(tiles, AugmentConfig(), args.reps)
    print(f"default config: {default:.2f} ms/tile", file=sys.stderr)
    everything = AugmentConfig(affine_p=1.0, photometric="independent", blur_p=1.0, noise_p=1.0, hsv_p=1.0,
                               grey_p=1.0, value_scale=0.1, stain_p=1.0)
    worst = ms_per_tile(tiles, everything, args.reps)
    print(json.dumps({"augment_ms_per_tile": round(default, 3), "batch": args.batch, "tile_px": TILE,
                      "backend": jax.default_backend(), "all_ops_ms_per_tile": round(worst, 3)}))


if __name__ == "__main__":
    main()
