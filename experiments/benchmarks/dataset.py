"""Input pipeline: fine-tuning batches from an exported TFDS/ArrayRecord dataset through grain
vs from in-RAM arrays (tiles/s, ratio), fine-tuning time from each (ratio), and the reader's
peak RSS on a 10x larger dataset.

    python experiments/benchmarks/dataset.py [--spots 1000] [--tile-px 64] [--scale 10]

Synthetic samples (an image with one coloured disc per spot) are exported with
:func:`data_pipelines.tfds_dataset.export_dataset`; one epoch of shuffled batches of
(tile, counts) is read (a) by fancy-indexing the in-RAM tile array, (b) through
:func:`data_pipelines.grain_source.spot_loader` (worker_count 0 and 2). Peak RSS is each
reader's ``ru_maxrss`` in a fresh subprocess, for the dataset and one ``--scale`` times larger.
Prints one JSON line (with the CPU's avx512/vnni/amx flags).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_flags  # noqa: E402  (this directory is on sys.path)




def make_samples(folder: Path, n_spots: int, n_samples: int):
    import anndata as ad
    import cv2
    import pandas as pd
    import scipy.sparse as sp

    from data_pipelines import keys

    out = []
    per = n_spots // n_samples
    grid = int(np.ceil(np.sqrt(per)))
    pitch = 40
    for k in range(n_samples):
        rng = np.random.default_rng(k)
        size = grid * pitch + pitch
        img = np.full((size, size, 3), 235, np.uint8)
        xy = []
        for i in range(per):
            x, y = pitch * (i % grid + 1), pitch * (i // grid + 1)
            cv2.circle(img, (x, y), pitch // 3, tuple(int(c) for c in rng.integers(60, 230, 3)), -1)
            xy.append((x, y))
        path = folder / f"b{k}.png"
        cv2.imwrite(str(path), img)
        name = f"b{k}"
        obs = pd.DataFrame({keys.SAMPLE: name}, index=[f"{name}_{i}" for i in range(per)])
        a = ad.AnnData(sp.csr_matrix(rng.poisson(3, (per, 3)).astype(np.float32)), obs=obs,
                       var=pd.DataFrame(index=["A", "B", "C"]))
        a.obsm[keys.SPATIAL] = np.asarray(xy, np.float64)
        a.uns[keys.SPATIAL_UNS] = {name: {"scalefactors": {keys.SPOT_DIAMETER_FULLRES: 2 * (pitch // 3),
                                                           "tissue_hires_scalef": 1.0},
                                          "metadata": {keys.IMAGE_PATH: str(path)}}}
        a.uns[keys.STIMAGE_UNS] = {keys.MPP: 1.0, keys.SPOT_DIAMETER_UM: float(2 * (pitch // 3)),
                                   "platform": "synthetic", "library_id": name, "image_scale": 1.0}
        out.append(a)
    return out


def read_epoch(directory: str, batch: int, workers: int) -> int:
    from data_pipelines.grain_source import spot_loader

    n = 0
    for b in spot_loader(directory, batch_size=batch, seed=0, shard_index=0, shard_count=1, worker_count=workers):
        n += len(b["tile"])
    return n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spots", type=int, default=1000)
    p.add_argument("--tile-px", type=int, default=64)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)  # DIR BATCH WORKERS
    a = p.parse_args()
    if a.rss_child:
        n = read_epoch(a.rss_child[0], int(a.rss_child[1]), int(a.rss_child[2]))
        print(json.dumps({"n": n, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    from data_pipelines.tfds_dataset import export_dataset, open_source

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        small = export_dataset(make_samples(tmp, a.spots, 2), ["A", "B", "C"], tmp / "small", tile_um=None,
                               tile_px=a.tile_px, progress=False, cache_dir=tmp / "cache")
        export_s = time.perf_counter() - t
        big = export_dataset(make_samples(tmp, a.spots * a.scale, 2 * a.scale), ["A", "B", "C"], tmp / "big",
                             tile_um=None, tile_px=a.tile_px, progress=False, cache_dir=tmp / "cache")
        src = open_source(small)
        tiles = np.stack([src[i]["tile"] for i in range(len(src))])
        counts = np.stack([src[i]["counts"] for i in range(len(src))])
        n = len(tiles)

        def ram_epoch():
            order = np.random.default_rng(0).permutation(n)
            m = 0
            for i in range(0, n, a.batch):
                idx = order[i:i + a.batch]
                m += len(np.ascontiguousarray(tiles[idx])) + 0 * counts[idx].sum()
            return m

        def best(f, reps=3):
            f()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        ram = n / best(ram_epoch)
        grain0 = n / best(lambda: read_epoch(str(small), a.batch, 0))
        grain2 = n / best(lambda: read_epoch(str(small), a.batch, 2), reps=2)
        # fine-tuning (tiny backbone, 1 member, 2 epochs): the same spots from h5ad (tiles in RAM)
        # and streamed from the dataset; the two runs train the same model
        from stimage_jax.pipeline import train

        paths = []
        for i, ad_ in enumerate(make_samples(tmp, a.spots, 2)):
            paths.append(tmp / f"ft{i}.h5ad")
            ad_.write_h5ad(paths[-1])
        ft = dict(backbone="tiny", members=1, max_epochs=2, fine_tune=True, batch_size=a.batch, progress=False)
        # a warm-up run of each first (compilation; the h5ad path's tile and feature caches), then
        # the timed runs in fresh workdirs: the h5ad side reads cached tiles/features, the dataset
        # side recomputes the head-init features from the stream
        ram_kw = dict(genes="A,B,C", tile_px=a.tile_px, min_coverage=0.0, cache_dir=tmp / "ftcache", **ft)
        train(paths, tmp / "warm_ram", **ram_kw)
        train([], tmp / "warm_ds", dataset=str(small), **ft)
        t0 = time.perf_counter()
        train(paths, tmp / "wd_ram", **ram_kw)
        t_ram = time.perf_counter() - t0
        t0 = time.perf_counter()
        train([], tmp / "wd_ds", dataset=str(small), **ft)
        t_ds = time.perf_counter() - t0
        rss = {}
        for name, d in (("small", small), ("big", big)):
            out = subprocess.run([sys.executable, __file__, "--rss-child", str(d), str(a.batch), "0"],
                                 capture_output=True, text=True, check=True)
            rss[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"benchmark": "dataset", **cpu_flags(), "spots": n, "tile_px": a.tile_px,
                          "batch": a.batch, "export_tiles_per_s": round(n / export_s, 1),
                          "ram_tiles_per_s": round(ram, 1), "grain_tiles_per_s": round(grain0, 1),
                          "grain_2workers_tiles_per_s": round(grain2, 1),
                          "ratio_grain_to_ram": round(grain0 / ram, 4),
                          "ratio_grain2_to_ram": round(grain2 / ram, 4),
                          "finetune_s_ram": round(t_ram, 2), "finetune_s_dataset": round(t_ds, 2),
                          "ratio_finetune_dataset_to_ram": round(t_ram / t_ds, 4),
                          "rss_mb": {k: round(v["maxrss_mb"], 1) for k, v in rss.items()},
                          "rss_spots": {k: v["n"] for k, v in rss.items()},
                          "rss_ratio_big_to_small": round(rss["big"]["maxrss_mb"] / rss["small"]["maxrss_mb"], 3)}))


if __name__ == "__main__":
    main()
