"""HoVer-Net post-processing: NP + HV maps → nucleus instances; TC → per-nucleus types.

NumPy/SciPy/scikit-image/OpenCV only (no JAX), so it runs after the ONNX runtime too.

``instances_from_np_hv`` is HoVer-Net's ``__proc_np_hv`` (``models/hovernet/post_proc.py``):

1. foreground = NP ≥ 0.5, components smaller than ``min_size`` px removed;
2. each HV channel min-max scaled to [0, 1], then a large Sobel (``ksize`` 21) along its
   own axis (x for the horizontal map, y for the vertical one); 1 − min-max of each is an
   edge map that is high where the HV map jumps (between touching nuclei);
3. edges = max of the two, zero outside the foreground; markers = foreground − (edges ≥
   ``edge_thresh``), holes filled, opened with a 5×5 ellipse, labelled, small ones removed;
4. marker-controlled watershed of −blur((1 − edges)·foreground) within the foreground.

``nucleus_types`` gives each instance the majority class of the TC argmax over its
pixels — background (0) only when no other class is present, as HoVer-Net's ``process``
does — with the fraction of its pixels voting for that class and the mean of each class
probability over the instance. ``type_entropy`` is the per-pixel Shannon entropy (nats)
of the class probabilities. All per-instance statistics are single ``np.bincount`` calls.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from data_pipelines.errors import StimageError

__all__ = ["PostprocessParams", "instances_from_np_hv", "nucleus_types", "type_entropy", "NucleusTypes"]


@dataclasses.dataclass(frozen=True)
class PostprocessParams:
    """HoVer-Net's constants (``__proc_np_hv``) at 40× (~0.25 µm/px)."""

    np_thresh: float = 0.5      # nucleus probability for foreground
    min_size: int = 10          # px: smaller foreground components and markers are dropped
    ksize: int = 21             # Sobel aperture on the HV maps (odd, ≤ 31 in OpenCV)
    edge_thresh: float = 0.4    # edge-map level that separates markers
    open_size: int = 5          # elliptical opening of the markers (px)


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero the components of ``labels`` (int, 0 = background) with fewer than ``min_size`` px."""
    if min_size <= 0 or not labels.any():
        return labels
    area = np.bincount(labels.ravel())
    small = area < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def _minmax(x: np.ndarray) -> np.ndarray:
    """cv2.normalize(NORM_MINMAX, 0..1) in float32; a constant map becomes 0 (as OpenCV)."""
    x = x.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def instances_from_np_hv(np_prob: np.ndarray, hv: np.ndarray,
                         params: PostprocessParams = PostprocessParams()) -> np.ndarray:
    """(H, W) nucleus probability and (H, W, 2) HV maps (x, y) → (H, W) int32 instances 1..N.

    Ids are consecutive in raster order of the markers; 0 is background.
    """
    np_prob = np.asarray(np_prob, np.float32)
    hv = np.asarray(hv, np.float32)
    if np_prob.ndim != 2 or hv.shape != (*np_prob.shape, 2):
        raise StimageError(f"post-processing needs NP (H, W) and HV (H, W, 2), got {np_prob.shape} and {hv.shape}")
    if not (np.all(np.isfinite(np_prob)) and np.all(np.isfinite(hv))):
        raise StimageError("post-processing: NP or HV maps hold NaN or infinite values")
    if params.ksize % 2 != 1 or not 1 <= params.ksize <= 31:
        raise StimageError(f"PostprocessParams.ksize must be odd and in 1..31 (OpenCV), got {params.ksize}")

    blb = ndi.label(np_prob >= params.np_thresh)[0]
    blb = (_remove_small(blb, params.min_size) > 0).astype(np.float32)
    if not blb.any():
        return np.zeros(np_prob.shape, np.int32)

    h_dir, v_dir = _minmax(hv[..., 0]), _minmax(hv[..., 1])
    sobel_h = cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=params.ksize)
    sobel_v = cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=params.ksize)
    # Inside a nucleus the scaled HV map rises steadily (large positive Sobel); between two
    # touching nuclei it drops from +1 to −1, so 1 − normalised gradient is high there.
    sobel_h = 1.0 - _minmax(sobel_h)
    sobel_v = 1.0 - _minmax(sobel_v)
    overall = np.maximum(sobel_h, sobel_v) - (1.0 - blb)
    overall[overall < 0] = 0

    dist = (1.0 - overall) * blb
    dist = -cv2.GaussianBlur(dist, (3, 3), 0)  # nuclei are mountains: negate to get basins

    marker = blb - (overall >= params.edge_thresh).astype(np.float32)
    marker = ndi.binary_fill_holes(marker > 0).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.open_size, params.open_size))
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = _remove_small(ndi.label(marker)[0], params.min_size)

    out = watershed(dist, markers=marker, mask=blb > 0)
    # Relabel 1..N (removed markers leave gaps); raster order of first appearance in the markers.
    ids = np.unique(out)
    ids = ids[ids > 0]
    lut = np.zeros(int(out.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[out]


@dataclasses.dataclass(frozen=True)
class NucleusTypes:
    """Per-instance type calls, row i = instance id ``ids[i]``."""

    ids: np.ndarray          # (N,) int instance ids, ascending
    types: np.ndarray        # (N,) int majority class (0 only when no other class voted)
    type_prob: np.ndarray    # (N,) fraction of the instance's pixels voting for that class
    mean_probs: np.ndarray   # (N, K) mean class probability over the instance
    area: np.ndarray         # (N,) px


def nucleus_types(instances: np.ndarray, tc_prob: np.ndarray) -> NucleusTypes:
    """Majority TC class and mean class probabilities of each instance.

    instances (H, W) int (0 = background); tc_prob (H, W, K) class probabilities (class 0
    = background). HoVer-Net's rule: the most frequent argmax class of the instance's
    pixels; if that is background and another class occurs, the most frequent other class.
    """
    inst = np.asarray(instances)
    prob = np.asarray(tc_prob, np.float64)
    if inst.ndim != 2 or prob.ndim != 3 or prob.shape[:2] != inst.shape:
        raise StimageError(f"nucleus_types needs instances (H, W) and probabilities (H, W, K), got "
                           f"{inst.shape} and {prob.shape}")
    if inst.size and inst.min() < 0:
        raise StimageError("instance map has negative ids")
    k = prob.shape[2]
    lab = inst.ravel().astype(np.int64)
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return NucleusTypes(ids, np.zeros(0, np.int64), np.zeros(0), np.zeros((0, k)), np.zeros(0, np.int64))
    # Compact ids 0..N-1 so the tables are (N, K), whatever the original ids are.
    comp = np.searchsorted(ids, lab)
    fg = lab > 0
    comp, flat = comp[fg], prob.reshape(-1, k)[fg]
    n = len(ids)
    area = np.bincount(comp, minlength=n)
    votes = np.bincount(comp * k + flat.argmax(1), minlength=n * k).reshape(n, k)
    best = votes.argmax(1)
    others = votes.copy()
    others[:, 0] = -1
    alt = others.argmax(1)
    use_alt = (best == 0) & (votes[np.arange(n), alt] > 0)
    types = np.where(use_alt, alt, best)
    means = np.stack([np.bincount(comp, weights=flat[:, c], minlength=n) for c in range(k)], axis=1) / area[:, None]
    return NucleusTypes(ids=ids, types=types.astype(np.int64), type_prob=votes[np.arange(n), types] / area,
                        mean_probs=means, area=area)


def type_entropy(tc_prob: np.ndarray) -> np.ndarray:
    """(H, W, K) class probabilities → (H, W) float32 entropy −Σ p log p (nats, 0 log 0 = 0)."""
    p = np.asarray(tc_prob, np.float64)
    if p.ndim != 3:
        raise StimageError(f"type_entropy needs (H, W, K) probabilities, got shape {p.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        e = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
    return e.astype(np.float32)
