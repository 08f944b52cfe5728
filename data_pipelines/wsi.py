"""H&E-only slides (no spatial transcriptomics): open, find tissue, grid-tile, stream.

Pyramidal/tiled TIFF (incl. Aperio SVS, which is TIFF) is read lazily through tifffile's
zarr store, so only the tiles a batch needs are decoded and memory stays flat as slides
grow. Plain JPEG/PNG images are decoded whole (they fit in memory by construction).
µm per pixel comes from the slide (SVS ``MPP =``, or TIFF resolution tags) or ``mpp=``.
OpenSlide-only formats (NDPI, MRXS) are issue 3's OpenSlide backend.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.tiles import PAD_VALUE, load_image

__all__ = ["Slide", "open_slide", "tissue_mask", "slide_grid", "iter_grid_tiles", "grid_adata"]

_TIFF = (".tif", ".tiff", ".svs")


@dataclasses.dataclass
class Slide:
    """A slide at full resolution: size (px), µm per px, and region/thumbnail readers."""

    path: Path
    width: int
    height: int
    mpp: float
    _level0: object            # array-like (H, W, C) with lazy slicing
    _thumb_source: object      # smallest pyramid level (or the image itself)

    def region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at full resolution; outside the slide is white."""
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, self.width), min(y0 + h, self.height)
        if xb > xa and yb > ya:
            out[ya - y0:yb - y0, xa - x0:xb - x0] = np.asarray(self._level0[ya:yb, xa:xb])[..., :3]
        return out

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """(RGB image, scale = thumbnail px per full-resolution px)."""
        src = np.asarray(self._thumb_source)[..., :3]
        scale = min(1.0, max_side / max(src.shape[:2]))
        if scale < 1.0:
            src = cv2.resize(src, (max(1, round(src.shape[1] * scale)), max(1, round(src.shape[0] * scale))),
                             interpolation=cv2.INTER_AREA)
        return src, src.shape[1] / self.width


def _tiff_mpp(page) -> float | None:
    desc = page.description or ""
    m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)  # Aperio SVS
    if m:
        return float(m.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        px_per_unit = num / den if den else 0.0
        um = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
        if um and px_per_unit > 1.0:  # 1 px/inch is the "no resolution" default
            return um / px_per_unit
    return None


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a pyramidal TIFF/SVS lazily, or a JPEG/PNG fully; one clear error if unusable."""
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"slide {path} not found")
    if path.suffix.lower() in _TIFF:
        import tifffile
        import zarr

        try:
            tf = tifffile.TiffFile(path)
            series = tf.series[0]
            level0 = zarr.open(series.aszarr(level=0), mode="r")
            smallest = series.levels[-1]
            thumb = smallest.asarray() if len(series.levels) > 1 else level0
            found = _tiff_mpp(tf.pages[0])
        except Exception as e:
            raise StimageError(f"slide {path} is unreadable or truncated ({type(e).__name__})") from None
        if level0.ndim != 3 or level0.shape[2] < 3:
            raise StimageError(f"slide {path} is not an RGB image (shape {tuple(level0.shape)})")
        h, w = level0.shape[:2]
    else:
        img = load_image(path)
        level0 = thumb = img
        h, w = img.shape[:2]
        found = None
    mpp = mpp if mpp is not None else found
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise StimageError(f"slide {path} has no µm-per-pixel metadata; pass --mpp")
    return Slide(path, int(w), int(h), float(mpp), level0, thumb)


def tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: Otsu on HSV saturation, then morphology.

    Glass is bright and grey (low saturation); stained tissue is saturated. Opening removes
    specks, closing fills gaps between nuclei.
    """
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1]
    sat = cv2.GaussianBlur(sat, (5, 5), 0)
    thr, mask = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if thr < 15:  # no bimodality: an all-glass (or all-tissue) image would split on noise
        mask = (sat > 25).astype(np.uint8) * 255
    k = np.ones((5, 5), np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k)
    return mask > 0


def slide_grid(slide: Slide, *, tile_um: float = 55.0, min_coverage: float = 0.7) -> tuple[np.ndarray, np.ndarray, float]:
    """Non-overlapping grid of tiles on tissue → (centres (N, 2) full-res px x y, coverage (N,), crop_px)."""
    crop_px = tile_um / slide.mpp
    if crop_px < 4:
        raise StimageError(f"tiles of {tile_um} µm are {crop_px:.1f} px at {slide.mpp} µm/px: too small")
    thumb, scale = slide.thumbnail()
    mask = tissue_mask(thumb)
    if not mask.any():
        raise StimageError(f"no tissue found in {slide.path}")
    nx, ny = int(slide.width // crop_px), int(slide.height // crop_px)
    if nx == 0 or ny == 0:
        raise StimageError(f"slide {slide.path} ({slide.width}x{slide.height} px) is smaller than one {tile_um} µm tile")
    # coverage = mean of the mask over each cell (integral image: every cell in O(1))
    integ = cv2.integral(mask.astype(np.uint8))
    x0 = np.clip(np.round(np.arange(nx) * crop_px * scale).astype(int), 0, mask.shape[1])
    x1 = np.clip(np.round((np.arange(nx) + 1) * crop_px * scale).astype(int), 0, mask.shape[1])
    y0 = np.clip(np.round(np.arange(ny) * crop_px * scale).astype(int), 0, mask.shape[0])
    y1 = np.clip(np.round((np.arange(ny) + 1) * crop_px * scale).astype(int), 0, mask.shape[0])
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    area = np.maximum((Y1 - Y0) * (X1 - X0), 1)
    cov = (integ[Y1, X1] - integ[Y0, X1] - integ[Y1, X0] + integ[Y0, X0]) / area
    keep = cov >= min_coverage
    if not keep.any():
        raise StimageError(f"no {tile_um} µm tile of {slide.path} has >= {min_coverage:.0%} tissue")
    rows, cols = np.nonzero(keep)
    centres = np.c_[(cols + 0.5) * crop_px, (rows + 0.5) * crop_px]
    return centres, cov[keep].astype(np.float32), crop_px


def iter_grid_tiles(slide: Slide, centres: np.ndarray, crop_px: float, tile_px: int,
                    batch_size: int = 32) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (index slice, uint8 tiles (b, tile_px, tile_px, 3)): one batch in memory at a time."""
    side = max(int(round(crop_px)), 1)
    interp = cv2.INTER_AREA if side > tile_px else cv2.INTER_LINEAR
    for s in range(0, len(centres), batch_size):
        c = centres[s:s + batch_size]
        out = np.empty((len(c), tile_px, tile_px, 3), np.uint8)
        for i, (cx, cy) in enumerate(c):
            reg = slide.region(int(round(cx - side / 2)), int(round(cy - side / 2)), side, side)
            out[i] = reg if side == tile_px else cv2.resize(reg, (tile_px, tile_px), interpolation=interp)
        yield slice(s, s + len(c)), out


def grid_adata(slide: Slide, centres: np.ndarray, coverage: np.ndarray, crop_px: float, tile_um: float):
    """An AnnData skeleton, one obs per grid tile, in stimage's conventions (no counts)."""
    import anndata as ad
    import pandas as pd

    lib = slide.path.stem
    col = np.floor(centres[:, 0] / crop_px).astype(int)
    row = np.floor(centres[:, 1] / crop_px).astype(int)
    obs = pd.DataFrame({keys.SAMPLE: pd.Categorical([lib] * len(centres)), keys.ARRAY_ROW: row,
                        keys.ARRAY_COL: col, keys.TISSUE_COVERAGE: coverage},
                       index=[f"{lib}_{r}x{c}" for r, c in zip(row, col)])
    a = ad.AnnData(obs=obs)
    a.obsm[keys.SPATIAL] = centres.astype(np.float64)
    a.uns[keys.SPATIAL_UNS] = {lib: {"scalefactors": {keys.SPOT_DIAMETER_FULLRES: crop_px},
                                     "metadata": {keys.IMAGE_PATH: str(slide.path.resolve())}}}
    a.uns[keys.STIMAGE_UNS] = {keys.MPP: slide.mpp, keys.SPOT_DIAMETER_UM: tile_um, keys.PLATFORM: "wsi",
                               keys.LIBRARY_ID: lib, keys.IMAGE_SCALE: 1.0}
    return a
