"""Argument types and the prediction options shared by ``stimage predict`` and
``python -m export.predict`` (argparse only, no JAX).

Values are checked where they are parsed, so a bad number is one argparse error
(``stimage: error: argument --batch-size: ...``, exit 2) before anything is read.
"""

from __future__ import annotations

import argparse
import math

from data_pipelines.tissue import DEFAULT_MIN_COVERAGE

__all__ = ["positive_int", "positive_float", "open_fraction", "unit_fraction", "nonnegative_int",
           "add_prediction_options"]


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
    """--data | --slide, --mpp, --min-coverage, --genes, --out, --batch-size, --interval, --overwrite."""
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
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
