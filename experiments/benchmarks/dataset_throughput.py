"""Fine-tuning input throughput from an exported TFDS/ArrayRecord dataset (grain) vs in-RAM
arrays, where the reader's time goes, and the reader's peak RSS at 1x and 10x dataset size.

    python experiments/benchmarks/dataset_throughput.py [--spots 1000] [--tile-px 64] [--batch 64]
        [--scale 10] [--epochs 2] [--backbones tiny,efficientnet_lite0]

Synthetic samples (one coloured disc per spot, :func:`dataset.make_samples`) are exported
with :func:`data_pipelines.tfds_dataset.export_dataset`. Then, in this process (warm: every
step compiled by a first untimed run):

- fine-tuning: the same stacked members trained for ``--epochs`` epochs (loop strategy, 1
  member, no validation, no checkpoints) by ``fit_ensemble`` on in-RAM uint8 tiles and by
  ``fit_streamed`` from the dataset through grain (reader threads 0/1/2 and 1 worker
  process), in ``--rounds`` interleaved rounds; tiles trained per second (best round) and the
  ratio dataset/RAM (median over rounds of the ratio within a round), per backbone;
- input only: one shuffled epoch of batches from RAM (fancy indexing, as ``padded_batches``)
  vs through ``epoch_loader``; and the reader's cost per tile split into the raw ArrayRecord
  read, the protobuf parse (+ ``np.frombuffer``), grain's per-record pipeline overhead and
  batch collation, next to TFDS's own decoder (``open_source(DIR)[i]``);
- peak RSS (``ru_maxrss``) of a fresh process reading one epoch of the dataset and of one
  ``--scale`` times larger.

Prints one JSON line with the CPU's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_flags, timed
from dataset import make_samples


def read_epoch(directory: str, batch: int, threads: int | None, workers: int, per_record: bool = False) -> int:
    from data_pipelines.grain_source import SpotRecords, epoch_loader

    n = SpotRecords(directory).num_records
    m = 0
    for b in epoch_loader(directory, np.arange(n), batch_size=batch, num_epochs=1, seed=0, read_threads=threads,
                          worker_count=workers, per_record=per_record):
        m += int(b["weight"].sum())
    return m


def best_of(f, reps: int = 3) -> float:
    """Best of ``reps`` wall times, no warm-up (the first read is part of what is measured)."""
    return timed(f, reps, warmup=False)


def fine_tune_rates(directory: Path, tiles: np.ndarray, counts: np.ndarray, backbone: str, batch: int,
                    epochs: int, readers: dict, rounds: int = 3) -> dict:
    """Tiles trained per second: in-RAM fit_ensemble vs fit_streamed under each reader setting."""
    import jax
    from flax import nnx

    from stimage_jax.config import RunConfig
    from stimage_jax.ensemble.dataset_train import StreamOptions, fit_streamed
    from stimage_jax.ensemble.model import build_member
    from stimage_jax.ensemble.stacked import fit_ensemble, stack_members
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.features.registry import create_backbone

    n = len(tiles)
    bb0 = create_backbone(backbone, rngs=nnx.Rngs(0))
    mcfg = {"genes": ["A", "B", "C"], "fine_tune": True, "head": dataclasses.asdict(RunConfig().head)}
    src = {"backbone": backbone, "num_features": int(bb0.num_features)}
    keys = jax.random.split(jax.random.key(0), 1)

    def members():
        return stack_members([build_member(mcfg, rngs=nnx.Rngs(1), source=src,
                                           backbone=create_backbone(backbone, rngs=nnx.Rngs(0)))])

    def mode(net):
        net.train(), net.backbone.eval()

    def ram(e):
        fit_ensemble(members(), tiles, counts, keys=keys, config=TrainConfig(batch_size=batch, max_epochs=e, lr=1e-4),
                     strategy="loop", progress=False, mesh=None, set_train_mode=mode)

    def stream(e, opt):
        fit_streamed(members(), directory, np.arange(n), keys=keys,
                     config=TrainConfig(batch_size=batch, max_epochs=e, lr=1e-4), strategy="loop", progress=False,
                     set_train_mode=mode, options=opt)

    ram(1)  # compile
    opts = {name: StreamOptions(checkpoint_steps=0, read_threads=t, worker_count=w) for name, (t, w) in readers.items()}
    for name, opt in opts.items():
        if not opt.worker_count:
            stream(1, opt)
    # interleaved rounds (the machine is shared: a slow spell hits neighbouring runs alike); per
    # setting the best time, and the median over rounds of (RAM time / dataset time) in that round
    times = {k: [] for k in ["ram", *opts]}
    for r in range(rounds):
        for name, ts in times.items():
            opt = opts.get(name)
            if opt is not None and opt.worker_count and r:
                continue  # worker processes start (and import JAX) per loader: slow, measured once
            t = time.perf_counter()
            ram(epochs) if opt is None else stream(epochs, opt)
            ts.append(time.perf_counter() - t)
    out = {"ram_tiles_per_s": round(epochs * n / min(times["ram"]), 1), "rounds": rounds}
    for name in opts:
        out[f"dataset_{name}_tiles_per_s"] = round(epochs * n / min(times[name]), 1)
        out[f"ratio_{name}"] = round(float(np.median([a / b for a, b in zip(times["ram"], times[name])])), 3)
    return out


def breakdown(directory: Path, tiles: np.ndarray, batch: int) -> dict:
    """Microseconds per tile of each stage of the reader (one process, no threads)."""
    from data_pipelines.grain_source import ParseSpots, SpotRecords
    from data_pipelines.tfds_dataset import open_source

    recs = SpotRecords(directory)
    n = recs.num_records
    order = np.random.default_rng(0).permutation(n)
    parse = ParseSpots(directory, ("tile", "counts"), n)
    raw = [recs[int(k)] for k in order]
    parse.map(raw[0])
    t_read = best_of(lambda: [recs[int(k)] for k in order])
    t_parse = best_of(lambda: [parse.map(r) for r in raw])
    items = [parse.map(r) for r in raw[:batch]]
    t_collate = best_of(lambda: [np.stack([x["tile"] for x in items]) for _ in range(max(1, n // batch))])
    t_loader = best_of(lambda: read_epoch(str(directory), batch, 0, 0, per_record=True))
    t_batched = best_of(lambda: read_epoch(str(directory), batch, 0, 0))
    src = open_source(directory)
    t_tfds = best_of(lambda: [src[int(k)] for k in order[:300]], 2) * n / 300

    def ram_epoch():
        for s in range(0, n, batch):
            np.ascontiguousarray(tiles[np.sort(order[s:s + batch])])

    t_ram = best_of(ram_epoch)
    us = lambda t: round(1e6 * t / n, 2)
    return {"us_per_tile": {"arrayrecord_read": us(t_read), "protobuf_parse": us(t_parse),
                            "batch_collate": us(t_collate),
                            "grain_overhead": us(max(t_loader - t_read - t_parse - t_collate, 0.0)),
                            "loader_per_record_no_threads": us(t_loader),
                            "loader_batched_no_threads": us(t_batched), "tfds_decode_per_record": us(t_tfds),
                            "ram_fancy_index": us(t_ram)},
            "input_only_tiles_per_s": {"ram": round(n / t_ram, 1), "grain_per_record": round(n / t_loader, 1),
                                       "grain_batched": round(n / t_batched, 1)}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spots", type=int, default=1000)
    p.add_argument("--tile-px", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--backbones", default="tiny,efficientnet_lite0")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of each)")
    p.add_argument("--no-rss", action="store_true", help="skip the 1x/10x peak-RSS part")
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)  # DIR BATCH
    a = p.parse_args()
    if a.rss_child:
        n = read_epoch(a.rss_child[0], int(a.rss_child[1]), None, 0)
        print(json.dumps({"n": n, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    from data_pipelines.grain_source import ParseSpots, SpotRecords
    from data_pipelines.tfds_dataset import export_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = export_dataset(make_samples(tmp, a.spots, 2), ["A", "B", "C"], tmp / "small", tile_um=None,
                               tile_px=a.tile_px, progress=False, cache_dir=tmp / "cache")
        recs = SpotRecords(small)
        parse = ParseSpots(small, ("tile", "counts"), recs.num_records)
        rows = [parse.map(recs[i]) for i in range(recs.num_records)]
        tiles, counts = np.stack([r["tile"] for r in rows]), np.stack([r["counts"] for r in rows])
        del rows
        out = {"benchmark": "dataset_throughput", **cpu_flags(), "spots": len(tiles), "tile_px": a.tile_px,
               "batch": a.batch, "epochs": a.epochs}
        out.update(breakdown(small, tiles, a.batch))
        readers = {"threads0": (0, 0), "threads1": (1, 0), "threads2": (2, 0), "workers1": (0, 1)}
        out["fine_tune"] = {}
        for bb in a.backbones.split(","):
            out["fine_tune"][bb] = fine_tune_rates(small, tiles, counts, bb, a.batch, a.epochs,
                                                   readers if bb == "tiny" else {"threads0": (0, 0), "threads1": (1, 0)},
                                                   rounds=a.rounds)
        if a.no_rss:
            print(json.dumps(out))
            return
        big = export_dataset(make_samples(tmp, a.spots * a.scale, 2 * a.scale), ["A", "B", "C"], tmp / "big",
                             tile_um=None, tile_px=a.tile_px, progress=False, cache_dir=tmp / "cache")
        rss = {}
        for name, d in (("1x", small), (f"{a.scale}x", big)):
            res = subprocess.run([sys.executable, __file__, "--rss-child", str(d), str(a.batch)],
                                 capture_output=True, text=True, check=True)
            rss[name] = json.loads(res.stdout.strip().splitlines()[-1])
        out["rss_mb"] = {k: round(v["maxrss_mb"], 1) for k, v in rss.items()}
        out["rss_spots"] = {k: v["n"] for k, v in rss.items()}
        out["rss_ratio"] = round(rss[f"{a.scale}x"]["maxrss_mb"] / rss["1x"]["maxrss_mb"], 3)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
