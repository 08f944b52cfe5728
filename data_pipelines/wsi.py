"""H&E-only slides (no spatial transcriptomics): open, find tissue, grid-tile, stream.

Two lazy readers, so only the tiles a batch needs are decoded and memory stays flat as
slides grow:

* OpenSlide (``pip install 'stimage-jax[wsi]'``): NDPI, MRXS, SCN, VMS/VMU, BIF, and
  SVS/TIFF it recognises (it decodes the JPEG/JPEG 2000 tiles of real SVS files);
* tifffile + zarr: pyramidal/tiled TIFF incl. SVS, also when OpenSlide is not installed,
  and TIFFs whose pyramid sits in SubIFDs (OpenSlide's generic-tiff driver ignores those);
  also flat (single-level) TIFFs, read strip by strip or tile by tile, or memory-mapped
  when uncompressed, so a flat TIFF is never decoded whole either. Its thumbnail is shrunk
  band by band. Planar (S, Y, X) TIFFs are transposed; alpha is composited on white.

Plain JPEG/PNG images are decoded whole, up to ``max_image_pixels()`` px
(``$STIMAGE_MAX_IMAGE_PIXELS``, default 2**30); beyond it, or for a TIFF whose single
strip/tile is larger than that (nothing can be read without decoding it all), one clear
error. µm per pixel comes from the slide (OpenSlide ``openslide.mpp-x/y``; SVS ``MPP =``
or TIFF resolution tags for tifffile) or ``mpp=``. Outside the slide, and where a slide is
transparent, regions are white.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import PIXELS_ENV, max_image_pixels
from data_pipelines.tiles import PAD_VALUE, composite_on_white, load_image

__all__ = ["Slide", "open_slide", "tissue_mask", "slide_grid", "iter_grid_tiles", "grid_adata", "BACKENDS"]

_TIFF = (".tif", ".tiff", ".svs")
_OPENSLIDE_ONLY = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")
_PLAIN = (".jpg", ".jpeg", ".png")  # decoded whole by OpenCV, whatever the backend
BACKENDS = ("auto", "openslide", "tifffile")
_WSI_EXTRA = "pip install 'stimage-jax[wsi]'"
_THUMB_STRIP_PX = 4096 * 4096  # larger thumbnail levels are read and shrunk in strips
# A TIFF strip/tile above this many px is decoded once and kept (reading it per tile would
# decode it again for every tile); above max_image_pixels() the slide is refused.
_MAX_CHUNK_PX = 4096 * 4096
_BAND_CACHE_BYTES = 64 << 20  # decoded TIFF strips kept per level (at least two)


@dataclasses.dataclass
class Slide:
    """A slide at full resolution: size (px), µm per px, and region/thumbnail readers."""

    path: Path
    width: int
    height: int
    mpp: float
    _reader: object = dataclasses.field(repr=False)  # _TiffReader | _OpenSlideReader | _ArrayReader

    @property
    def backend(self) -> str:
        """Which reader decodes the pixels: "openslide", "tifffile" or "image"."""
        return self._reader.name

    def region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at full resolution; outside the slide is white."""
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, self.width), min(y0 + h, self.height)
        if xb > xa and yb > ya:
            out[ya - y0:yb - y0, xa - x0:xb - x0] = self._reader.read(xa, ya, xb - xa, yb - ya)
        return out

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """(RGB image, scale = thumbnail px per full-resolution px)."""
        src = self._reader.thumbnail_source(max_side)
        scale = min(1.0, max_side / max(src.shape[:2]))
        if scale < 1.0:
            src = cv2.resize(src, (max(1, round(src.shape[1] * scale)), max(1, round(src.shape[0] * scale))),
                             interpolation=cv2.INTER_AREA)
        return src, src.shape[1] / self.width


class _ArrayReader:
    """A whole decoded image (JPEG/PNG, or a TIFF that is one huge strip)."""

    def __init__(self, img: np.ndarray, name: str = "image"):
        self.img, self.name = img, name

    def read(self, x, y, w, h):
        return self.img[y:y + h, x:x + w, :3]

    def thumbnail_source(self, max_side):
        return self.img[..., :3]


def _shrink_in_strips(read_rows, lw: int, lh: int, max_side: int, align: int = 1) -> np.ndarray:
    """A (≈ lh·s, ≈ lw·s, 3) thumbnail, s = max_side / max(lw, lh), of an image read in bands.

    ``read_rows(r0, r1)`` returns rows [r0, r1) as RGB uint8 (r1 − r0, lw, 3); bands hold
    about ``_THUMB_STRIP_PX`` px and start on multiples of ``align`` (the strip/tile
    height), so each stored strip is decoded once. Memory: one band, whatever the size.
    """
    scale = max_side / max(lw, lh)
    tw, th = max(1, round(lw * scale)), max(1, round(lh * scale))
    step = max(1, _THUMB_STRIP_PX // lw)
    if align > 1:
        step = max(align, step // align * align)
    strips = []
    for r0 in range(0, lh, step):
        r1 = min(r0 + step, lh)
        o0, o1 = round(r0 * scale), round(r1 * scale)
        if o1 > o0:
            strips.append(cv2.resize(read_rows(r0, r1), (tw, o1 - o0), interpolation=cv2.INTER_AREA))
    return np.concatenate(strips)[:th]


class _TiffLevel:
    """One pyramid level of a TIFF as RGB uint8: a zarr array over its strips/tiles, or a
    memory map of uncompressed data. Planar (S, Y, X) data are transposed to (Y, X, S);
    an alpha sample is composited on white (premultiplied when the TIFF says associated).

    Strips (chunks spanning the full width) are decoded through a small cache of whole
    bands (``_BAND_CACHE_BYTES``): neighbouring tiles share strips, and zarr alone would
    decode a strip again for every tile that touches it.
    """

    def __init__(self, arr, planar: bool, alpha: int, path: Path):
        self.arr, self.planar, self.alpha, self.path = arr, planar, alpha, path  # alpha: 0, 1 associated, 2 straight
        self.height, self.width = (arr.shape[1:3] if planar else arr.shape[:2])
        chunks = getattr(arr, "chunks", None)  # zarr: (rows, cols[, S]) or (1, rows, cols); memmap: none
        yx = (chunks[1:3] if planar else chunks[:2]) if chunks is not None else (1, self.width)
        self.chunk_rows, self.chunk_px = int(yx[0]), int(yx[0]) * int(yx[1])
        self.strips = chunks is not None and int(yx[1]) >= self.width
        self._bands: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # prefetch threads share the slide

    def _slice(self, rows: slice, cols: slice) -> np.ndarray:
        """Stored samples (h, w, S) of a window, transposed when planar."""
        if self.planar:
            return np.moveaxis(np.asarray(self.arr[:, rows, cols]), 0, -1)
        return np.asarray(self.arr[rows, cols])

    def _band(self, k: int) -> np.ndarray:
        with self._lock:
            band = self._bands.pop(k, None)
        if band is None:
            band = self._slice(slice(k * self.chunk_rows, (k + 1) * self.chunk_rows), slice(None))
        with self._lock:
            self._bands[k] = band  # most recent last
            while len(self._bands) > 2 and sum(b.nbytes for b in self._bands.values()) > _BAND_CACHE_BYTES:
                self._bands.pop(next(iter(self._bands)))
        return band

    def read(self, x: int, y: int, w: int, h: int, cache: bool = True) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a window inside the level; ``cache=False`` for a one-pass
        scan (the thumbnail), which must not fill the band cache with the whole image."""
        try:
            if self.strips and cache:
                cr = self.chunk_rows
                parts = [self._band(k)[max(y, k * cr) - k * cr:min(y + h, (k + 1) * cr) - k * cr, x:x + w]
                         for k in range(y // cr, (y + h - 1) // cr + 1)]
                a = parts[0] if len(parts) == 1 else np.concatenate(parts)
            else:
                a = self._slice(slice(y, y + h), slice(x, x + w))
        except StimageError:
            raise
        except Exception as e:  # a strip/tile that is truncated or in a codec tifffile lacks
            raise StimageError(f"slide {self.path} is unreadable or truncated ({type(e).__name__})") from None
        if self.alpha:
            return composite_on_white(a[..., :4], premultiplied=self.alpha == 1)
        return np.ascontiguousarray(a[..., :3])


class _TiffReader:
    """Level 0 read in pieces; the thumbnail comes from the smallest pyramid level (the only
    level of a flat TIFF), shrunk band by band when it is large."""

    name = "tifffile"

    def __init__(self, levels: list[_TiffLevel]):
        self.levels = levels

    def read(self, x, y, w, h):
        return self.levels[0].read(x, y, w, h)

    def thumbnail_source(self, max_side):
        lev = self.levels[-1]
        lw, lh = lev.width, lev.height
        if lw * lh <= _THUMB_STRIP_PX or max(lw, lh) <= max_side:
            return lev.read(0, 0, lw, lh)
        return _shrink_in_strips(lambda r0, r1: lev.read(0, r0, lw, r1 - r0, cache=False), lw, lh, max_side,
                                 lev.chunk_rows)


_rgba_on_white = composite_on_white  # OpenSlide: transparent = no data → white


class _OpenSlideReader:
    """An ``openslide.OpenSlide`` handle (thread-safe, so prefetch threads may share it)."""

    name = "openslide"

    def __init__(self, osr, path: Path, error: type):
        self.osr, self.path, self.error = osr, path, error

    def _read(self, loc, level, size):
        try:
            return _rgba_on_white(np.asarray(self.osr.read_region(loc, level, size)))
        except self.error as e:
            raise StimageError(f"slide {self.path} is unreadable or truncated ({type(e).__name__})") from None

    def read(self, x, y, w, h):
        return self._read((x, y), 0, (w, h))

    def thumbnail_source(self, max_side):
        """The level nearest above the thumbnail's size (huge ones shrunk strip by strip)."""
        osr = self.osr
        level = osr.get_best_level_for_downsample(max(1.0, max(osr.dimensions) / max_side))
        lw, lh = osr.level_dimensions[level]
        ds = osr.level_downsamples[level]
        if lw * lh <= _THUMB_STRIP_PX:
            return self._read((0, 0), level, (lw, lh))
        # read_region takes level-0 coordinates for the location
        return _shrink_in_strips(lambda r0, r1: self._read((0, int(r0 * ds)), level, (lw, r1 - r0)),
                                 lw, lh, max_side)


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


def _import_openslide(required: bool):
    """The ``openslide`` module, or None (auto) / a StimageError naming the extra (required)."""
    try:
        import openslide

        openslide.__library_version__  # noqa: B018  (the C library, from openslide-bin, loaded)
        return openslide
    except (ImportError, OSError, AttributeError) as e:
        if required:
            raise StimageError(f"backend 'openslide' needs OpenSlide ({type(e).__name__}: {e}); "
                               f"{_WSI_EXTRA}".replace("\n", " ")) from None
        return None


def _tiff_layout(series, path: Path) -> tuple[bool, int]:
    """(planar, alpha) of an 8-bit RGB(A) series; one clear error for anything else."""
    axes, shape = series.axes, tuple(series.shape)
    page = series.keyframe
    if axes in ("YXS",):
        planar, spp = False, shape[2]
    elif axes in ("SYX", "CYX"):
        planar, spp = True, shape[0]
    else:
        raise StimageError(f"slide {path} is not an RGB image (axes {axes}, shape {shape})")
    if spp < 3:
        raise StimageError(f"slide {path} is not an RGB image (axes {axes}, shape {shape})")
    if np.dtype(series.dtype) != np.uint8:
        raise StimageError(f"slide {path} has {np.dtype(series.dtype)} pixels; 8-bit RGB is required")
    extra = tuple(int(e) for e in (page.extrasamples or ()))
    # ExtraSamples: 1 associated (premultiplied) alpha, 2 unassociated; 0 "unspecified",
    # which on a 4-sample RGB is alpha in practice (as OpenCV and PIL read it)
    alpha = extra[0] if extra and extra[0] in (1, 2) else (2 if spp == 4 else 0)
    return planar, alpha


def _level_array(path: Path, series, i: int, size: int):
    """A memory map of uncompressed contiguous level ``i``, else tifffile's zarr store of it."""
    import zarr

    level = series.levels[i]
    page = level.keyframe
    if len(level.pages) == 1 and page.is_memmappable and page.is_final:
        offset, nbytes = int(page.dataoffsets[0]), int(np.prod(level.shape)) * np.dtype(level.dtype).itemsize
        if offset + nbytes > size:  # a header claiming more pixels than the file holds
            raise StimageError(f"slide {path} is truncated: its header claims {level.shape} px "
                               f"({nbytes:,} bytes) but the file has {size:,} bytes")
        return np.memmap(path, dtype=np.dtype(level.dtype), mode="r", offset=offset, shape=tuple(level.shape))
    return zarr.open(series.aszarr(level=i), mode="r")


def _open_tifffile(path: Path):
    """(reader, width, height, mpp or None) through tifffile + zarr (or a memory map)."""
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
        series = tf.series[0]
        planar, alpha = _tiff_layout(series, path)
        size = path.stat().st_size
        levels = [_TiffLevel(_level_array(path, series, i, size), planar, alpha, path)
                  for i in range(len(series.levels))]
        found = _tiff_mpp(tf.pages[0])
    except StimageError:
        raise
    except Exception as e:
        raise StimageError(f"slide {path} is unreadable or truncated ({type(e).__name__})") from None
    lev0 = levels[0]
    w, h = lev0.width, lev0.height
    if lev0.chunk_px > _MAX_CHUNK_PX:
        # One strip/tile this big is decoded whole by any read, so decode it once and keep
        # it, if the image fits under the cap; otherwise nothing can be read in pieces.
        cap = max_image_pixels()
        if w * h > cap:
            raise StimageError(f"slide {path} is {w}x{h} px in strips/tiles of {lev0.chunk_px:,} px each: "
                               f"too big to read in pieces or whole (limit {cap:,} px); save it as a tiled "
                               f"TIFF, or raise {PIXELS_ENV}")
        try:
            img = lev0.read(0, 0, w, h)
        except Exception as e:
            raise StimageError(f"slide {path} is unreadable or truncated ({type(e).__name__})") from None
        return _ArrayReader(img, "tifffile"), w, h, found
    return _TiffReader(levels), w, h, found


def _openslide_mpp(osr, path: Path) -> float | None:
    vals = [float(v) for k in ("openslide.mpp-x", "openslide.mpp-y")
            if (v := osr.properties.get(k)) not in (None, "")]
    if len(vals) == 2 and abs(vals[0] - vals[1]) > 0.01 * max(vals):
        raise StimageError(f"slide {path} has non-square pixels (mpp-x {vals[0]}, mpp-y {vals[1]} µm); "
                           "pass --mpp")
    return vals[0] if vals else None


def _open_openslide(openslide, path: Path, *, explicit_mpp: bool, fallback_levels: int | None = None):
    """(reader, width, height, mpp or None) through OpenSlide; None when ``fallback_levels``
    is given and tifffile sees more pyramid levels than OpenSlide's generic-tiff driver."""
    try:
        osr = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as e:
        raise StimageError(f"slide {path} is unreadable or truncated ({type(e).__name__})") from None
    if (fallback_levels is not None and osr.properties.get("openslide.vendor") == "generic-tiff"
            and osr.level_count < fallback_levels):
        osr.close()
        return None
    w, h = osr.dimensions
    found = None if explicit_mpp else _openslide_mpp(osr, path)
    return _OpenSlideReader(osr, path, openslide.OpenSlideError), w, h, found


def _tiff_levels(path: Path) -> int | None:
    """Pyramid levels tifffile sees in the first series (None if it cannot parse the file)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            return len(tf.series[0].levels)
    except Exception:
        return None


def open_slide(path: str | Path, *, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image lazily (OpenSlide or tifffile), or a JPEG/PNG fully.

    backend: "auto" = OpenSlide for the formats only it reads (NDPI, MRXS, SCN, VMS/VMU, BIF)
    and for SVS/TIFF it recognises, tifffile for other TIFFs (or when OpenSlide is not
    installed); "openslide"/"tifffile" force one. JPEG/PNG are decoded whole regardless.
    ``mpp`` overrides the slide's metadata.
    One clear StimageError if the slide is unusable.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise StimageError(f"unknown slide backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if not path.is_file():
        raise StimageError(f"slide {path} not found")
    suffix = path.suffix.lower()
    opened = None  # (reader, width, height, mpp found in the slide or None)
    if suffix in _PLAIN:  # JPEG/PNG: decoded whole below, whatever the backend
        opened = None
    elif backend == "openslide" or (backend == "auto" and suffix in _OPENSLIDE_ONLY):
        if backend == "auto" and _import_openslide(False) is None:
            raise StimageError(f"slide {path}: {suffix} files are read through OpenSlide; {_WSI_EXTRA}")
        opened = _open_openslide(_import_openslide(True), path, explicit_mpp=mpp is not None)
    elif backend == "auto" and suffix in _TIFF and (osl := _import_openslide(False)) is not None:
        try:
            fmt = osl.OpenSlide.detect_format(str(path))
        except (osl.OpenSlideError, OSError):
            fmt = None
        if fmt is not None:  # a SubIFD pyramid is invisible to generic-tiff: count tifffile's levels
            levels = _tiff_levels(path) if fmt == "generic-tiff" else None
            opened = _open_openslide(osl, path, explicit_mpp=mpp is not None, fallback_levels=levels)
    if opened is None and suffix not in _PLAIN and (backend == "tifffile" or suffix in _TIFF):
        opened = _open_tifffile(path)
    if opened is None:
        img = load_image(path)
        opened = _ArrayReader(img), img.shape[1], img.shape[0], None
    reader, w, h, found = opened
    mpp = mpp if mpp is not None else found
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise StimageError(f"slide {path} has no µm-per-pixel metadata; pass --mpp")
    return Slide(path, int(w), int(h), float(mpp), reader)


def tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail (≤ 2048 px): :func:`data_pipelines.tissue.tissue_mask`."""
    from data_pipelines.tissue import tissue_mask as qc_mask

    return qc_mask(thumb, what="the slide thumbnail")[0]


def slide_grid(slide: Slide, *, tile_um: float = 55.0, min_coverage: float = 0.7) -> tuple[np.ndarray, np.ndarray, float]:
    """Non-overlapping grid of tiles on tissue → (centres (N, 2) full-res px x y, coverage (N,), crop_px)."""
    crop_px = tile_um / slide.mpp
    if crop_px < 4:
        raise StimageError(f"tiles of {tile_um} µm are {crop_px:.1f} px at {slide.mpp} µm/px: too small")
    from data_pipelines.tissue import tissue_mask as qc_mask

    thumb, _ = slide.thumbnail()
    # The same mask as training's tile QC (data_pipelines.tissue), so a slide's tiles pass
    # the same test as the spots the model learned from.
    mask, _ = qc_mask(thumb, what=str(slide.path))
    scale = mask.shape[1] / slide.width  # mask px per slide px
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
