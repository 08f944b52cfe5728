"""``python -m export.viewer --model M.onnx (--data X.h5ad | --slide S) [--pred P.h5ad]``: the
viewer without JAX (``stimage view`` runs this for an ``.onnx`` model, and serves a
workdir model in-process through :func:`serve`)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from data_pipelines.errors import StimageError
from data_pipelines.tissue import DEFAULT_MIN_COVERAGE
from export.runtime.options import (OneLineParser, open_fraction, positive_float, positive_int, quiet_logs,
                                    run_command, unit_fraction)

__all__ = ["add_arguments", "check", "serve", "main", "default_cache"]


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535 (got {v})")
    return v


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="exported .onnx (no JAX needed), or a training workdir "
                                                   "(stimage view only)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help=".h5ad of one section with its H&E image")
    src.add_argument("--slide", help="H&E-only slide: OpenSlide formats, pyramidal TIFF, or JPEG/PNG with --mpp")
    ap.add_argument("--pred", help="a prediction .h5ad of the same section (else predicted at start, cached)")
    ap.add_argument("--mpp", type=positive_float, help="slide µm per pixel when its metadata lacks it")
    ap.add_argument("--min-coverage", type=unit_fraction, default=DEFAULT_MIN_COVERAGE,
                    help=f"slide tiles need this tissue fraction (default {DEFAULT_MIN_COVERAGE})")
    ap.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=_port, default=8050, help="port (default 8050; 0 = any free port)")
    ap.add_argument("--cache", help="folder for cached predictions and explanations (default: the workdir's "
                                    "cache/view, or ~/.cache/stimage/view for an .onnx)")
    ap.add_argument("--interval", type=open_fraction, default=0.8, help="predictive interval (default 0.8)")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--samples", type=positive_int, default=1000, help="LIME perturbations per explanation")
    ap.add_argument("--max-upload-mb", type=positive_float, default=512.0, help="largest .onnx the page may upload")


def default_cache(model) -> Path:
    """``WORKDIR/cache/view`` for a workdir model, else ``$XDG_CACHE_HOME/stimage/view``."""
    p = Path(model)
    if p.is_dir():
        return p / "cache" / "view"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stimage" / "view"


def check(a) -> None:
    """Options that fail before anything is read: one stimage: error line."""
    try:
        loopback = a.host == "localhost" or ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise StimageError(f"--host {a.host} is not a loopback address: the viewer serves this machine only "
                           "(127.0.0.1 or ::1)")
    for what, p in (("--model", a.model), ("--data", a.data), ("--slide", a.slide), ("--pred", a.pred)):
        if p is not None and not Path(p).exists():
            raise StimageError(f"{what} {p} not found")
    if a.pred and not a.data and not a.slide:
        raise StimageError("--pred needs the --data or --slide it predicts (for the image)")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StimageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    return sock


def build_state(a, model=None, *, progress: bool = True):
    """(ViewerState with its Deep Zoom, model) from the options; ``model``: an already
    loaded predictor (a JAX workdir model from ``stimage view``), else the ``.onnx``."""
    from export.viewer.deepzoom import DeepZoom
    from export.viewer.state import ViewerState, model_digest, open_section

    if model is None:
        if not str(a.model).lower().endswith(".onnx"):
            raise StimageError(f"{a.model}: python -m export.viewer reads an exported .onnx; "
                               "for a training workdir use stimage view")
        from export.runtime.onnx_model import OnnxEnsemble

        model = OnnxEnsemble(a.model)
    if model.tile_um is None:
        raise StimageError("this model reads precomputed embeddings, not tiles: the viewer needs one that reads tiles")
    from export.runtime.predictor import REGRESS

    if model.task != REGRESS:
        raise StimageError("the viewer shows regression models (mean and uncertainty); this one classifies")
    section = open_section(data=a.data, slide=a.slide, mpp=a.mpp, min_coverage=a.min_coverage)
    cache = Path(a.cache) if a.cache else default_cache(a.model)
    state = ViewerState(section, model, Path(a.model).name, model_digest(a.model), cache, pred_path=a.pred,
                        interval=a.interval, batch_size=a.batch_size, samples=a.samples, progress=progress)
    state.deepzoom = DeepZoom(section.slide)
    return state


def serve(a, model=None, *, progress: bool = True) -> None:
    """Open the section, start predicting in the background, serve until Ctrl-C / SIGTERM."""
    import uvicorn

    from export.viewer.app import build_app

    _Server = _uvicorn_server()
    check(a)
    state = build_state(a, model, progress=progress)
    sock = _bind(a.host, a.port)
    host, port = sock.getsockname()[:2]
    state.start()
    app = build_app(state, max_upload_mb=a.max_upload_mb)
    shown = f"[{host}]" if ":" in host else host
    print(f"viewing {state.section.name} with {state.current.name} on http://{shown}:{port}/ (Ctrl-C to stop)",
          flush=True)
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.run(sockets=[sock])


def _uvicorn_server():
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM/SIGINT after its graceful shutdown; a viewer
        stopped on purpose exits 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()
    return Server


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m export.viewer", description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    quiet_logs(a.quiet)
    return run_command(lambda args: serve(args, progress=not args.quiet), a, quiet=a.quiet)


if __name__ == "__main__":
    sys.exit(main())
