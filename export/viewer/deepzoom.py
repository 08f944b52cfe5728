"""Deep Zoom tiles of a slide for OpenSeadragon, read level by level, never whole.

Tiles come from OpenSlide's :class:`openslide.deepzoom.DeepZoomGenerator`. For slides
OpenSlide opens (``data_pipelines.wsi`` backend ``"openslide"``) it wraps the OpenSlide
handle itself; for pyramidal TIFFs read through tifffile it wraps :class:`LevelSlide`,
which offers OpenSlide's reading interface over the pyramid levels ``data_pipelines.wsi``
already opened (so a Deep Zoom tile at any zoom reads only the pixels of the nearest
level at or above its resolution); for a decoded JPEG/PNG (HER2ST's images) a pyramid of
halvings is built once in memory. Encoded tiles are kept in a small LRU cache.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import cv2
import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["LevelSlide", "DeepZoom", "TILE_SIZE", "OVERLAP"]

TILE_SIZE = 254  # + 2 px overlap = 256: OpenSeadragon's and OpenSlide's recommended size
OVERLAP = 1
_MIN_LEVEL_SIDE = 512  # an in-memory pyramid stops halving below this


class LevelSlide:
    """The part of OpenSlide's slide interface :class:`DeepZoomGenerator` reads, over a list
    of pyramid levels, each ``(width, height, read(x, y, w, h) -> RGB uint8 (h, w, 3))`` in
    that level's own pixels, level 0 first."""

    def __init__(self, levels):
        self._levels = list(levels)
        w0, h0 = self._levels[0][:2]
        self.level_dimensions = tuple((int(w), int(h)) for w, h, _ in self._levels)
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.level_count = len(self._levels)
        self.properties: dict[str, str] = {}
        self._lock = threading.Lock()  # zarr stores over one file handle: one reader at a time

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level still at least as detailed as ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.0001:
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """PIL RGBA (w, h) at ``level``; ``location`` in level-0 px; outside = transparent."""
        from PIL import Image

        w, h = (int(v) for v in size)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x, y = int(location[0] / ds), int(location[1] / ds)
        out = np.zeros((h, w, 4), np.uint8)
        xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if xb > xa and yb > ya:
            with self._lock:
                px = self._levels[level][2](xa, ya, xb - xa, yb - ya)
            out[ya - y:yb - y, xa - x:xb - x, :3] = px
            out[ya - y:yb - y, xa - x:xb - x, 3] = 255
        return Image.fromarray(out, "RGBA")


def _array_levels(img: np.ndarray):
    """An in-memory pyramid of halvings of a decoded image (INTER_AREA), down to ~512 px."""
    levels = [img]
    while max(levels[-1].shape[:2]) > _MIN_LEVEL_SIDE:
        a = levels[-1]
        levels.append(cv2.resize(a, (max(1, a.shape[1] // 2), max(1, a.shape[0] // 2)), interpolation=cv2.INTER_AREA))
    return [(a.shape[1], a.shape[0], (lambda x, y, w, h, a=a: a[y:y + h, x:x + w, :3])) for a in levels]


def osr_of(slide):
    """An OpenSlide-like object for a :class:`data_pipelines.wsi.Slide`: its own OpenSlide
    handle, or a :class:`LevelSlide` over its tifffile levels or its decoded array."""
    reader = slide._reader  # the Slide's reader is the only handle on its levels
    if slide.backend == "openslide":
        return reader.osr
    if hasattr(reader, "levels"):
        return LevelSlide([(lev.width, lev.height, lev.read) for lev in reader.levels])
    if hasattr(reader, "img"):
        return LevelSlide(_array_levels(reader.img))
    raise StimageError(f"slide {slide.path}: no pyramid reader for backend {slide.backend!r}")


class DeepZoom:
    """Deep Zoom (``.dzi`` + JPEG tiles) of a :class:`data_pipelines.wsi.Slide`."""

    def __init__(self, slide, *, quality: int = 85, cache_tiles: int = 512):
        from openslide.deepzoom import DeepZoomGenerator

        self.slide = slide
        self.gen = DeepZoomGenerator(osr_of(slide), tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
        self.quality = quality
        self._cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._cap = cache_tiles
        self._lock = threading.Lock()

    def dzi(self) -> str:
        """The Deep Zoom descriptor (XML) OpenSeadragon opens."""
        return self.gen.get_dzi("jpeg")

    def tile(self, level: int, col: int, row: int) -> bytes:
        """One JPEG tile; ValueError for a level or address outside the pyramid."""
        key = (level, col, row)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        img = self.gen.get_tile(level, (col, row))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=self.quality)
        data = buf.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._cap:
                self._cache.popitem(last=False)
        return data
