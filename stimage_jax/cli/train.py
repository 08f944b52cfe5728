"""``stimage train --data ... --workdir W [options | --config FILE.py]``."""

from __future__ import annotations

from pathlib import Path

from stimage_jax.cli.common import (add_distributed_options, add_overwrite, add_run_options, distributed_from_args,
                                    nonnegative_int, quiet, run_config_from_args)

STREAM_FLAGS = ("checkpoint_steps", "read_threads", "input_workers")


def add_parser(sub, parents) -> None:
    t = sub.add_parser("train", parents=list(parents), help="train an NB regression ensemble (or a classifier)")
    t.add_argument("--data", nargs="+", help=".h5ad files (one or more samples each); or --dataset DIR")
    t.add_argument("--workdir", required=True)
    add_run_options(t)
    add_overwrite(t, "replace a different run in --workdir")
    add_distributed_options(t)
    g = t.add_argument_group("streaming from --dataset (how it reads, not what it trains: a resume may change them)")
    g.add_argument("--checkpoint-steps", type=nonnegative_int, default=None,
                   help="optimiser steps between mid-epoch checkpoints (default 200; 0 = epoch ends only)")
    g.add_argument("--read-threads", type=nonnegative_int, default=None,
                   help="grain prefetch threads per member (default 1)")
    g.add_argument("--input-workers", type=nonnegative_int, default=None,
                   help="grain worker processes per member (default 0; each starts its own Python)")
    t.set_defaults(func=run)


def run(a) -> None:
    from stimage_jax.distributed import initialize

    initialize(distributed_from_args(a))  # before any JAX computation; no-op for one process
    from stimage_jax.pipeline import train

    cfg = run_config_from_args(a)
    if (a.data is None) == (cfg.dataset is None):
        from data_pipelines.errors import StimageError

        raise StimageError("give the training data as --data FILE.h5ad ... or as --dataset DIR (one of them)")
    given = {k: getattr(a, k) for k in STREAM_FLAGS if getattr(a, k) is not None}
    stream = None
    if given:
        if cfg.dataset is None:
            from data_pipelines.errors import StimageError

            raise StimageError(f"{', '.join('--' + k.replace('_', '-') for k in given)} go with --dataset DIR")
        from stimage_jax.ensemble.dataset_train import StreamOptions

        stream = StreamOptions(checkpoint_steps=given.get("checkpoint_steps", 200),
                               read_threads=given.get("read_threads"), worker_count=given.get("input_workers", 0))
    model = train(a.data or [], a.workdir, cfg, progress=not quiet(a), overwrite=a.overwrite, stream_options=stream)
    c = model.config
    if getattr(model, "task", "") == "classify":
        print(f"trained high/low classifiers for {len(model.genes)} genes on {', '.join(c['training_samples'])} "
              f"(features {c['backbone']}) -> {Path(a.workdir) / 'model'}")
    else:
        print(f"trained {c['members']} member(s) on {', '.join(c['training_samples'])} ({len(model.genes)} genes, "
              f"features {c['backbone']}, {c['strategy']} strategy) -> {Path(a.workdir) / 'model'}")
