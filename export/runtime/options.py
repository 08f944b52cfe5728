"""Argument types, the prediction options and the error boundary shared by ``stimage`` and
``python -m export.predict`` (argparse only, no JAX).

Values are checked where they are parsed, so a bad number is one argparse error
(``stimage: error: argument --batch-size: ...``, exit 2) before anything is read.
"""

from __future__ import annotations

import argparse
import math

from data_pipelines.tissue import DEFAULT_MIN_COVERAGE

__all__ = ["positive_int", "positive_float", "open_fraction", "unit_fraction", "nonnegative_int",
           "add_prediction_options", "OneLineParser", "one_line", "run_command", "quiet_logs"]


def _number(text: str, kind):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def positive_int(text: str) -> int:
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {v})")
    return v


def nonnegative_int(text: str) -> int:
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {v})")
    return v


def positive_float(text: str) -> float:
    v = _number(text, float)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {v:g})")
    return v


def open_fraction(text: str) -> float:
    """A level strictly between 0 and 1 (an interval's coverage)."""
    v = _number(text, float)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (got {v:g})")
    return v


def unit_fraction(text: str) -> float:
    """A fraction in [0, 1] (tissue coverage, dropout)."""
    v = _number(text, float)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1 (got {v:g})")
    return v


def add_prediction_options(ap: argparse.ArgumentParser) -> None:
    """--data | --slide, --mpp, --min-coverage, --genes, --out, --batch-size, --interval, --smooth, --overwrite."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help=".h5ad of spots (with their image)")
    src.add_argument("--slide", help="H&E-only slide: OpenSlide formats, pyramidal TIFF, or JPEG/PNG with --mpp")
    ap.add_argument("--mpp", type=positive_float, help="slide µm per pixel when its metadata lacks it")
    ap.add_argument("--min-coverage", type=unit_fraction, default=DEFAULT_MIN_COVERAGE,
                    help=f"slide tiles need this tissue fraction (default {DEFAULT_MIN_COVERAGE})")
    ap.add_argument("--genes", help="slide: a heatmap PNG per gene (comma separated), OUT_<gene>.png")
    ap.add_argument("--out", required=True, help="the prediction .h5ad to write")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--interval", type=open_fraction, default=0.8,
                    help="central predictive interval stored as q_lo/q_hi (default 0.8)")
    ap.add_argument("--smooth", type=unit_fraction, default=None, metavar="ALPHA",
                    help="average each member's predicted mean with its nearest spots' (tiles') with this weight "
                         "(0 = off; default: the model's own setting, recorded in the prediction)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line ``stimage: error: ...``, exit 2
    (instead of a usage block)."""

    def error(self, message: str):
        self.exit(2, f"stimage: error: {one_line(message)}\n")


def one_line(message) -> str:
    """Any message as one line (a gene name with a newline in it must not split it)."""
    return " ".join(str(message).split()) or "bad input"


def run_command(func, args, *, quiet: bool = False) -> int:
    """The error boundary of a command: bad input (StimageError) and file-system refusals
    (OSError on a path the user gave: missing folder, not a directory, no permission, disk
    full) become one ``stimage: error:`` line and exit 2. Python warnings raised while the
    command runs are held back and printed after it succeeds (``stimage: warning: ...``),
    so a failing command prints its one error line and nothing else."""
    import sys
    import warnings

    from data_pipelines.errors import StimageError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = func(args)  # a command returns a non-zero code only when it printed why
        except StimageError as e:
            print(f"stimage: error: {one_line(e)}", file=sys.stderr)
            return 2
        except OSError as e:
            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            print(f"stimage: error: cannot use{where}: {one_line(e.strerror or e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("stimage: interrupted (rerun the same command to resume)", file=sys.stderr)
            return 130
    if not quiet:
        for w in caught:
            print(f"stimage: warning: {one_line(w.message)}", file=sys.stderr)
    return code or 0


def quiet_logs(quiet: bool) -> None:
    """Logging for a command: INFO (or WARNING with --quiet) from stimage; libraries that
    log their own internals (tifffile's per-tag complaints, absl, jax, orbax) only on
    ERROR of their own and never before our one error line."""
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # we report the file's failure ourselves
    try:
        from cv2.utils import logging as cv_logging

        # OpenCV's own "[ERROR:0@..]" lines: the failure is reported by us, in one line
        cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass
