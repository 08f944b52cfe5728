"""Nucleus segmenters by name: ``classical`` (colour deconvolution + watershed, always there)
and ``cellpose`` (a cellpose 3 model file, optional extra). One call shape for both:
``segment(rgb (H, W, 3) uint8, mpp) -> (H, W) int32`` instance map, 0 = background.

``add_nuclei_options`` / ``segmenter_from_args`` give every command the same flags
(``--nuclei NAME --cellpose-model PATH [--cellpose-flow-threshold F]``); argparse's
choices come from :data:`SEGMENTERS`. NumPy only here; torch/cellpose load on demand.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["SEGMENTERS", "Segmenter", "make_segmenter", "add_nuclei_options", "segmenter_from_args"]

Segmenter = Callable[[np.ndarray, "float | None"], np.ndarray]


def _classical(cellpose_model=None, flow_threshold=None) -> Segmenter:
    from export.runtime.nuclei import segment_nuclei

    if cellpose_model is not None:
        raise StimageError("--cellpose-model is for --nuclei cellpose (the classical segmenter has no model)")
    return lambda rgb, mpp=None: segment_nuclei(rgb, mpp=mpp)


def _cellpose(cellpose_model=None, flow_threshold=None) -> Segmenter:
    from export.runtime.nuclei_cellpose import CellposeParams, load_cellpose_model, segment_nuclei_cellpose

    if cellpose_model is None:
        raise StimageError("--nuclei cellpose needs --cellpose-model PATH (cellpose's own weights download at run "
                           "time, impossible offline; make one with `stimage cells train-cellpose`)")
    params = CellposeParams() if flow_threshold is None else CellposeParams(flow_threshold=float(flow_threshold))
    model = load_cellpose_model(cellpose_model)
    return lambda rgb, mpp=None: segment_nuclei_cellpose(rgb, mpp=mpp, model=model, params=params)


SEGMENTERS: dict[str, Callable[..., Segmenter]] = {"classical": _classical, "cellpose": _cellpose}


def make_segmenter(name: str = "classical", *, cellpose_model=None, flow_threshold: float | None = None) -> Segmenter:
    """The named segmenter, loaded (a cellpose model file is read and checked once, here)."""
    if name not in SEGMENTERS:
        raise StimageError(f"nucleus segmenter {name!r} unknown (use {', '.join(SEGMENTERS)})")
    return SEGMENTERS[name](cellpose_model=cellpose_model, flow_threshold=flow_threshold)


def add_nuclei_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nuclei", default="classical", choices=list(SEGMENTERS),
                   help="nucleus segmenter (default classical; cellpose needs --cellpose-model)")
    p.add_argument("--cellpose-model", help="cellpose 3 model file (e.g. from `stimage cells train-cellpose`)")
    p.add_argument("--cellpose-flow-threshold", type=float, default=None,
                   help="cellpose's flow check (default 0.4; 0 keeps every mask: for briefly trained models)")


def segmenter_from_args(a) -> Segmenter:
    if a.nuclei != "cellpose" and a.cellpose_flow_threshold is not None:
        raise StimageError("--cellpose-flow-threshold is for --nuclei cellpose")
    if a.cellpose_flow_threshold is not None and not (np.isfinite(a.cellpose_flow_threshold)
                                                     and a.cellpose_flow_threshold >= 0):
        raise StimageError(f"--cellpose-flow-threshold {a.cellpose_flow_threshold} must be a number ≥ 0")
    return make_segmenter(a.nuclei, cellpose_model=a.cellpose_model, flow_threshold=a.cellpose_flow_threshold)
