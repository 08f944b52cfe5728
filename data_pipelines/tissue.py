"""Tissue mask per slide and tile QC: coverage of each spot's tile square, and filtering.

The mask is computed once per image at low resolution (longer side ≤ ``max_side`` px):
stained tissue is saturated (HSV S) and darker than glass (grey), so Otsu thresholds on
both are combined, then cleaned by morphology, small-hole filling and small-object
removal. ``method="grabcut"`` refines that mask with OpenCV GrabCut (colour GMMs), as the
STimage reference does through ``st_tissue_recognition``; GrabCut is initialised from the
Otsu mask, so no user annotation is needed.

Coverage is the tissue fraction of the same square that :func:`data_pipelines.tiles.crop_tile`
cuts (side ``round(crop_px)`` image px starting at ``round(c - side/2)``), measured in
the low-resolution mask with an integral image: O(1) per spot. The square is mapped to
fractional mask coordinates and the integral image interpolated bilinearly, which is the
exact area integral of the (piecewise-constant) mask, so no rounding to the coarse mask
grid. Parts of the square outside the image count as non-tissue (they are padded glass in
the tile).

Conventions (as elsewhere in ``data_pipelines``): annotating functions write ``obs`` in
place and return the object (``validate_counts``, ``spot_tiles``); filtering returns a
new AnnData and leaves its input untouched (the readers' ``adata[keep].copy()``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pandas as pd

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.io import quiet_stderr
from data_pipelines.tiles import load_image, sample_image_path, tile_geometry

__all__ = ["TISSUE_COVERAGE", "DEFAULT_MIN_COVERAGE", "tissue_mask", "square_coverage",
           "spot_tissue_coverage", "add_tissue_coverage", "filter_by_coverage"]

TISSUE_COVERAGE = keys.TISSUE_COVERAGE  # obs: fraction (0..1) of a spot's tile square that is tissue
DEFAULT_MIN_COVERAGE = 0.7

Method = Literal["otsu", "grabcut"]

# Otsu always returns a threshold, even on pure noise (an all-glass image). A channel is
# used only when its two Otsu classes differ in mean by at least this much (0..255), i.e.
# when the histogram really is bimodal; tissue vs glass differs by 61-74 (S) and 92-107
# (grey) on HER2ST C2-C6, noise on blank glass by < 10.
_MIN_SAT_SEPARATION = 20.0
_MIN_GREY_SEPARATION = 25.0
_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    """One INTER_AREA resize (pixel-area averaging: no aliasing of nuclei) to longer side ≤ max_side."""
    h, w = image.shape[:2]
    s = max_side / max(h, w)
    if s >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _otsu(channel: np.ndarray) -> tuple[float, float]:
    """(Otsu threshold, difference of the two class means) of a uint8 image."""
    thr, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    hist = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
    v = np.arange(256, dtype=np.float64)
    lo, hi = hist[:int(thr) + 1], hist[int(thr) + 1:]
    if lo.sum() == 0 or hi.sum() == 0:
        return thr, 0.0
    return thr, float((v[int(thr) + 1:] @ hi) / hi.sum() - (v[:int(thr) + 1] @ lo) / lo.sum())


def _clean(mask: np.ndarray, min_hole_frac: float, min_object_frac: float) -> np.ndarray:
    """Close (joins nuclei across pale stroma), open (drops specks), fill small holes,
    remove small components; uint8 0/1 in and out."""
    m = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _KERNEL)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _KERNEL)
    area = m.size
    # holes: background components (4-connected, the dual of 8-connected tissue) that are small
    _, lab, stats, _ = cv2.connectedComponentsWithStats(1 - m, connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < min_hole_frac * area
    small[0] = False  # label 0 is the tissue itself (the zeros of 1 - m)
    m[small[lab]] = 1  # a lookup table: one pass whatever the number of holes
    _, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    tiny = stats[:, cv2.CC_STAT_AREA] < min_object_frac * area
    tiny[0] = False  # label 0 is the glass
    m[tiny[lab]] = 0
    return m


def _otsu_mask(small: np.ndarray) -> np.ndarray:
    """Raw uint8 0/1 mask: saturated OR dark, each only where its histogram is bimodal."""
    sat = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1], (5, 5), 0)
    grey = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    mask = np.zeros(small.shape[:2], np.uint8)
    t, sep = _otsu(sat)
    if sep >= _MIN_SAT_SEPARATION:
        mask |= (sat > t).astype(np.uint8)        # eosin/haematoxylin are saturated, glass is grey
    t, sep = _otsu(grey)
    if sep >= _MIN_GREY_SEPARATION:
        mask |= (grey <= t).astype(np.uint8)      # dense nuclei are dark even where desaturated
    return mask


def _grabcut(small: np.ndarray, init: np.ndarray, iterations: int) -> np.ndarray:
    """GrabCut seeded by the Otsu mask: eroded core = sure tissue, mask = probable tissue,
    a dilated ring = probable glass, the rest = sure glass."""
    if init.all() or not init.any():
        return init  # GrabCut needs both classes to fit its two colour models
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    gc = np.full(init.shape, cv2.GC_BGD, np.uint8)
    gc[cv2.dilate(init, k) > 0] = cv2.GC_PR_BGD
    gc[init > 0] = cv2.GC_PR_FGD
    gc[cv2.erode(init, k) > 0] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(np.ascontiguousarray(small), gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.uint8)


def tissue_mask(image_rgb_uint8: np.ndarray, *, method: Method = "otsu", max_side: int = 2048,
                min_hole_frac: float = 1e-3, min_object_frac: float = 1e-4, grabcut_iterations: int = 3,
                what: str = "image") -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB uint8 image (H, W, 3) at low resolution.

    Returns ``(mask, scale)``: ``mask`` bool (h, w) with ``max(h, w) ≤ max_side`` and
    ``scale`` = mask px per image px along x (``w / W``; along y it is ``h / H``, equal up
    to the rounding of the resized size). Holes smaller than ``min_hole_frac`` and tissue
    components smaller than ``min_object_frac`` of the mask area are filled / removed (so
    adipose or pale stroma inside tissue stays tissue, dust on glass does not). ``method``
    "grabcut" refines the Otsu mask (slower: a few seconds at 2048 px). ``what`` names the
    image in the error raised when no tissue is found.
    """
    img = np.asarray(image_rgb_uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] < 3 or min(img.shape[:2]) < 1:
        raise StimageError(f"{what}: tissue mask needs an RGB uint8 (H, W, 3) image "
                           f"(got {img.dtype} {img.shape})")
    if method not in ("otsu", "grabcut"):
        raise StimageError(f"unknown tissue mask method {method!r}; use 'otsu' or 'grabcut'")
    if int(max_side) < 8:
        raise StimageError(f"max_side must be at least 8 px (got {max_side})")
    small = _downscale(np.ascontiguousarray(img[..., :3]), int(max_side))
    mask = _clean(_otsu_mask(small), min_hole_frac, min_object_frac)
    if method == "grabcut":
        mask = _clean(_grabcut(small, mask, grabcut_iterations), min_hole_frac, min_object_frac)
    if not mask.any():
        raise StimageError(f"no tissue found in {what}")
    return mask.astype(bool), small.shape[1] / img.shape[1]


def _interp_integral(integ: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∫∫ mask over [0, x] × [0, y] (mask px, x ∈ [0, w], y ∈ [0, h]).

    Inside a mask pixel this area integral is bilinear in (x, y), with the integral image
    at the pixel's corners as its values, so bilinear interpolation is exact.
    """
    h, w = integ.shape[0] - 1, integ.shape[1] - 1
    i = np.clip(np.floor(x).astype(np.int64), 0, w - 1)
    j = np.clip(np.floor(y).astype(np.int64), 0, h - 1)
    fx, fy = x - i, y - j
    return (integ[j, i] * (1 - fx) * (1 - fy) + integ[j, i + 1] * fx * (1 - fy)
            + integ[j + 1, i] * (1 - fx) * fy + integ[j + 1, i + 1] * fx * fy)


def square_coverage(mask: np.ndarray, image_shape: tuple[int, ...], centres: np.ndarray,
                    crop_px: float, *, mask_scale: tuple[float, float] | None = None) -> np.ndarray:
    """Tissue fraction (N,) float64 in [0, 1] of tile squares, vectorised, O(1) per square.

    mask: bool (h, w) low-res mask of an image of ``image_shape`` (H, W[, C]) px;
    centres: (N, 2) square centres (x, y) in that image's px; crop_px: square side in image
    px. The square is the one ``crop_tile`` cuts: side ``s = max(round(crop_px), 1)``
    starting at ``round(c - s/2)``. ``mask_scale`` (mask px per image px along x, y)
    defaults to ``(w / W, h / H)``. Outside the image counts as non-tissue.
    """
    mask = np.asarray(mask)
    c = np.asarray(centres, np.float64).reshape(-1, 2)
    if not np.isfinite(c).all():
        raise StimageError("tile centres must be finite pixel (x, y)")
    H, W = int(image_shape[0]), int(image_shape[1])
    sx, sy = mask_scale if mask_scale is not None else (mask.shape[1] / W, mask.shape[0] / H)
    side = max(int(round(float(crop_px))), 1)
    x0 = np.round(c[:, 0] - side / 2)  # np.round and round() both round half to even
    y0 = np.round(c[:, 1] - side / 2)
    integ = cv2.integral(mask.astype(np.uint8)).astype(np.float64)  # (h+1, w+1)
    h, w = mask.shape
    # the square in fractional mask coordinates, cut to the image (outside adds nothing)
    X0, X1 = np.clip(x0 * sx, 0, w), np.clip((x0 + side) * sx, 0, w)
    Y0, Y1 = np.clip(y0 * sy, 0, h), np.clip((y0 + side) * sy, 0, h)
    tissue = (_interp_integral(integ, X1, Y1) - _interp_integral(integ, X0, Y1)
              - _interp_integral(integ, X1, Y0) + _interp_integral(integ, X0, Y0))
    return np.clip(tissue / ((side * sx) * (side * sy)), 0.0, 1.0)


_JPEG = (".jpg", ".jpeg")
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _load_lowres(path: str, max_side: int) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """(RGB image, its px per full-image px (x, y), full (H, W)).

    A JPEG is decoded directly at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling) when that is
    still ≥ max_side: ~8× faster and ~16× less memory than decoding a 10k px H&E whole.
    Reduced pixel k then covers full pixels [r·k, r·k + r) exactly (libjpeg rounds the size
    up), so the scale is exactly 1/r. A TIFF too big to decode whole
    (``max_image_pixels()``) gives the slide reader's thumbnail, built strip by strip.
    Other images are decoded whole (:func:`~data_pipelines.tiles.load_image`: capped,
    transparency on white).
    """
    from data_pipelines.slides.common import TIFF_SUFFIXES, image_size, max_image_pixels

    if not path or not Path(path).is_file():
        raise StimageError(f"image {path or '(none recorded)'} not found; the tissue mask needs the H&E image")
    suffix = Path(path).suffix.lower()
    if suffix in _JPEG:
        W, H = image_size(path)
        r = max((f for f in _REDUCED if max(W, H) / f >= max_side), default=1)
        if r > 1:
            try:
                with quiet_stderr():
                    bgr = cv2.imread(str(path), _REDUCED[r])
            except cv2.error:  # OpenCV's own size limit: load_image below says it clearly
                bgr = None
            if bgr is not None and bgr.shape[:2] == (-(-H // r), -(-W // r)):
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (1.0 / r, 1.0 / r), (H, W)
    elif suffix in TIFF_SUFFIXES:
        W, H = image_size(path)
        if W * H > max_image_pixels():
            from data_pipelines.wsi import open_slide

            thumb, _ = open_slide(path, mpp=1.0).thumbnail(max_side)
            return thumb, (thumb.shape[1] / W, thumb.shape[0] / H), (H, W)
    img = load_image(path)
    return img, (1.0, 1.0), img.shape[:2]


def _sample_rows(adata, libs: list[str]) -> dict[str, np.ndarray]:
    """Row indices of each sample, as ``spot_tiles`` groups them (all rows for one sample)."""
    if len(libs) == 1:
        return {libs[0]: np.arange(adata.n_obs)}
    samples = adata.obs[keys.SAMPLE].astype(str).to_numpy()
    return {lib: np.flatnonzero(samples == lib) for lib in libs}


def spot_tissue_coverage(adata, *, tile_um: float | None = None, tile_px: int = 299, method: Method = "otsu",
                         max_side: int = 2048) -> np.ndarray:
    """Tissue fraction (n_spots,) float32 of each spot's tile square, in ``adata``'s order.

    The square is the tile crop of :func:`data_pipelines.tiles.spot_tiles` with the same
    ``tile_um`` (default the spot diameter) — centre ``obsm["spatial"] · image_scale``, side
    ``crop_px`` from :func:`~data_pipelines.tiles.tile_geometry`, per sample (each sample's
    own image, mpp and image_scale). One mask per image (see :func:`tissue_mask`);
    ``tile_px`` only matters for validation, coverage does not depend on it.
    """
    if keys.SPATIAL not in adata.obsm:
        raise StimageError("data lack obsm['spatial'] spot coordinates")
    xy = np.asarray(adata.obsm[keys.SPATIAL], np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise StimageError(f"obsm['spatial'] must be finite (n_spots, 2) pixel x, y (got shape {xy.shape})")
    geo = tile_geometry(adata, tile_um, tile_px)
    out = np.zeros(adata.n_obs, np.float32)
    masks: dict[str, tuple] = {}  # samples cut from one image share its mask
    for lib, rows in _sample_rows(adata, list(geo["samples"])).items():
        g = geo["samples"][lib]
        path = sample_image_path(adata, lib)
        if path not in masks:
            img, (rx, ry), full = _load_lowres(path, max_side)
            mask, _ = tissue_mask(img, method=method, max_side=max_side, what=f"sample {lib} image {path}")
            # mask px per full-image px: (mask / loaded) · (loaded / full), per axis
            masks[path] = (mask, full, (mask.shape[1] / img.shape[1] * rx, mask.shape[0] / img.shape[0] * ry))
            del img
        mask, full, scale = masks[path]
        out[rows] = square_coverage(mask, full, xy[rows] * g["image_scale"], g["crop_px"], mask_scale=scale)
    return out


def add_tissue_coverage(adata, **kw):
    """Write ``obs["tissue_coverage"]`` (n_spots,) float32 and return ``adata``.

    ``kw`` are :func:`spot_tissue_coverage`'s keywords (tile_um, tile_px, method, max_side).

    Like ``spot_tiles`` and ``validate_counts`` this annotates ``adata`` in place; a view
    cannot hold new obs columns, so a view is copied first and the copy returned (the view
    and its parent are then left unchanged).
    """
    cov = spot_tissue_coverage(adata, **kw)
    if adata.is_view:
        adata = adata.copy()
    adata.obs[TISSUE_COVERAGE] = cov
    return adata


def filter_by_coverage(adata, min_coverage: float = DEFAULT_MIN_COVERAGE, **kw):
    """A new AnnData without spots whose tile is less than ``min_coverage`` tissue.

    Uses ``obs["tissue_coverage"]`` when present, else computes it (``kw`` as for
    :func:`spot_tissue_coverage`) and stores it in the result. The count is added to
    ``uns["stimage"]["dropped"]["tissue_coverage<{min_coverage:g}"]`` (merged with the
    readers' reasons) and reported per sample in a warning. ``adata`` is not modified.
    """
    min_coverage = float(min_coverage)
    if not (0.0 <= min_coverage <= 1.0):
        raise StimageError(f"min_coverage must be in [0, 1] (got {min_coverage})")
    if TISSUE_COVERAGE in adata.obs:
        cov = adata.obs[TISSUE_COVERAGE].to_numpy(np.float64, na_value=np.nan)
        if not np.isfinite(cov).all():
            i = int(np.flatnonzero(~np.isfinite(cov))[0])
            raise StimageError(f"obs[{TISSUE_COVERAGE!r}] is not finite at spot {adata.obs_names[i]}")
    else:
        cov = spot_tissue_coverage(adata, **kw).astype(np.float64)
    keep = cov >= min_coverage
    n_drop = int((~keep).sum())
    if not keep.any():
        raise StimageError(f"all {adata.n_obs} spots have < {min_coverage:g} tissue coverage "
                           f"(max {cov.max():.2f}); wrong image, or lower --min-coverage")
    out = adata[keep].copy()
    if TISSUE_COVERAGE not in out.obs:
        out.obs[TISSUE_COVERAGE] = cov[keep].astype(np.float32)
    stimage = dict(out.uns.get(keys.STIMAGE_UNS, {}))
    dropped = dict(stimage.get(keys.DROPPED, {}))
    reason = f"{TISSUE_COVERAGE}<{min_coverage:g}"
    dropped[reason] = int(dropped.get(reason, 0)) + n_drop
    stimage[keys.DROPPED] = dropped
    out.uns[keys.STIMAGE_UNS] = stimage
    if n_drop:
        if keys.SAMPLE in adata.obs:
            per = pd.Series(~keep).groupby(adata.obs[keys.SAMPLE].astype(str).to_numpy()).sum()
            where = ", ".join(f"{s}: {int(n)}" for s, n in per.items() if n)
        else:
            where = "all"
        # A log line, not a warning: dropping glass tiles is the expected, reported outcome.
        logging.getLogger("stimage").info("%d of %d spot(s) with < %g tissue in their tile dropped (%s)",
                                          n_drop, adata.n_obs, min_coverage, where)
    return out
