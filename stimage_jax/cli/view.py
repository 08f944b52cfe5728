"""``stimage view --model M (--data X.h5ad | --slide S) [--pred P.h5ad]``: the web viewer.

The viewer is :mod:`export.viewer`, which imports no JAX. With an ``.onnx`` model this CLI
process (which has JAX loaded) replaces itself with ``python -m export.viewer`` (same
options, same pid, so signals reach the server), as ``stimage serve`` does; a training
workdir needs JAX to run, so its model is loaded here and served in-process."""

from __future__ import annotations

import os
import sys

from stimage_jax.cli.common import quiet


def add_parser(sub, parents) -> None:
    from export.viewer.__main__ import add_arguments

    v = sub.add_parser("view", parents=list(parents),
                       help="look at a slide or section, its predicted genes and uncertainty, and explain spots "
                            "in a browser")
    add_arguments(v)
    v.set_defaults(func=run)


def _argv(a) -> list[str]:
    argv = ["--model", str(a.model)]
    for opt in ("data", "slide", "pred", "mpp", "cache"):
        if getattr(a, opt) is not None:
            argv += [f"--{opt}", str(getattr(a, opt))]
    argv += ["--min-coverage", str(a.min_coverage), "--host", a.host, "--port", str(a.port), "--interval",
             str(a.interval), "--batch-size", str(a.batch_size), "--samples", str(a.samples),
             "--max-upload-mb", str(a.max_upload_mb)]
    return argv + (["--quiet"] if quiet(a) else [])


def run(a) -> None:
    from export.viewer.__main__ import check, serve
    from stimage_jax.models import is_onnx, load_model

    check(a)  # bad options fail here, as one stimage: error line
    if is_onnx(a.model):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "export.viewer", *_argv(a)])
    serve(a, load_model(a.model), progress=not quiet(a))
