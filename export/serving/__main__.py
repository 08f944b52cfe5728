"""``python -m export.serving --repo REPO``: the server without the ``stimage`` CLI (no JAX)."""

from __future__ import annotations

import argparse
import os
import sys

from data_pipelines.errors import StimageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", required=True, help="Triton-layout model repository (stimage export-onnx --triton-repo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve gRPC (Triton's GRPCInferenceService) on this port (0 picks one; needs "
                        "tritonclient[grpc]); off by default")
    p.add_argument("--token", default=os.environ.get("STIMAGE_SERVE_TOKEN"),
                   help="bearer token every request but the health probes must carry (default $STIMAGE_SERVE_TOKEN)")
    p.add_argument("--max-body-mb", type=float, default=64, help="request body cap in MiB (default 64; over it: 413)")
    p.add_argument("--max-batch-size", type=int, default=None, help="tiles per batch (default: each config.pbtxt's)")
    p.add_argument("--max-delay-us", type=int, default=None,
                   help="longest wait for a batch to fill, µs (default: each config.pbtxt's)")
    p.add_argument("--no-batching", action="store_true", help="run every request alone (for comparison)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: all cores)")


def check(a) -> None:
    """Option errors, before anything loads."""
    from pathlib import Path

    from export.serving.server import is_loopback

    if not 0 <= a.port <= 65535:
        raise StimageError(f"--port must be in 0..65535, got {a.port}")
    if a.grpc_port is not None:
        if not 0 <= a.grpc_port <= 65535:
            raise StimageError(f"--grpc-port must be in 0..65535, got {a.grpc_port}")
        try:
            import grpc  # noqa: F401
            import tritonclient.grpc.service_pb2_grpc  # noqa: F401
        except ImportError:
            raise StimageError("--grpc-port needs grpcio and tritonclient[grpc] (pip install 'stimage-jax[serve]')") \
                from None
    if not Path(a.repo).is_dir():
        raise StimageError(f"model repository {a.repo} is not a folder")
    if not is_loopback(a.host) and not a.token:
        raise StimageError(f"--host {a.host} is not a loopback address: pass --token (or STIMAGE_SERVE_TOKEN) "
                           "so that only bearers of it can call the server")
    if a.max_body_mb <= 0:
        raise StimageError(f"--max-body-mb must be positive, got {a.max_body_mb}")
    if a.max_batch_size is not None and not 1 <= a.max_batch_size <= 4096:
        raise StimageError(f"--max-batch-size must be in 1..4096, got {a.max_batch_size}")
    if a.max_delay_us is not None and a.max_delay_us < 0:
        raise StimageError(f"--max-delay-us must be >= 0, got {a.max_delay_us}")


def run(a) -> None:
    from export.serving.server import serve

    check(a)
    serve(a.repo, host=a.host, port=a.port, token=a.token, max_body_mb=a.max_body_mb,
          max_batch_size=a.max_batch_size, max_delay_us=a.max_delay_us, batching=not a.no_batching,
          threads=a.threads, grpc_port=a.grpc_port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.serving", description=__doc__)
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        run(a)
    except StimageError as e:
        print(f"stimage: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
