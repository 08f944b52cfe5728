"""``stimage serve --repo REPO``: serve a Triton-layout model repository over the Open
Inference Protocol. The server is :mod:`export.serving`, which imports no JAX; since this
CLI process has JAX loaded, it replaces itself with ``python -m export.serving`` (same
options, same pid, so signals reach the server) and serves JAX-free."""

from __future__ import annotations

import os
import sys


def add_parser(sub, parents) -> None:
    from export.serving.__main__ import add_arguments

    x = sub.add_parser("serve", parents=list(parents),
                       help="serve exported models over the Open Inference Protocol (KServe v2 / Triton HTTP)")
    add_arguments(x)
    x.set_defaults(func=run)


def run(a) -> None:
    from export.serving.__main__ import check

    check(a)  # bad options fail here, as one stimage: error line
    argv = ["--repo", str(a.repo), "--host", a.host, "--port", str(a.port), "--max-body-mb", str(a.max_body_mb),
            "--threads", str(a.threads)]
    if a.max_batch_size is not None:
        argv += ["--max-batch-size", str(a.max_batch_size)]
    if a.max_delay_us is not None:
        argv += ["--max-delay-us", str(a.max_delay_us)]
    if a.grpc_port is not None:
        argv += ["--grpc-port", str(a.grpc_port)]
    if a.no_batching:
        argv.append("--no-batching")
    env = dict(os.environ)
    if a.token:
        env["STIMAGE_SERVE_TOKEN"] = a.token  # not on the command line, where ps shows it
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "export.serving", *argv], env)
