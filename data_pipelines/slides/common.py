"""Shared pieces of the readers: counts validation, unique gene names, image size, pixel cap."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.keys import DROPPED, IMAGE_SCALE, LIBRARY_ID, PLATFORM  # re-exported for the readers

__all__ = ["as_count_matrix", "describe_cell", "unique_names", "image_size", "image_header", "library_metadata",
           "max_image_pixels", "MAX_IMAGE_PIXELS", "PIXELS_ENV", "TIFF_SUFFIXES",
           "IMAGE_SCALE", "LIBRARY_ID", "PLATFORM", "DROPPED"]

# Largest image decoded whole (px). 2**30 px is 3 GiB as RGB and is also OpenCV's own
# default limit (OPENCV_IO_MAX_IMAGE_PIXELS), so nothing OpenCV decoded before is refused;
# whole-slide H&E beyond it must be a TIFF, which is read in pieces instead.
MAX_IMAGE_PIXELS = 2**30
PIXELS_ENV = "STIMAGE_MAX_IMAGE_PIXELS"
TIFF_SUFFIXES = (".tif", ".tiff", ".svs")


def library_metadata(image_path: str, mpp: float, spot_diameter_um: float, image_scale: float,
                     source: str) -> dict:
    """``uns["spatial"][library_id]["metadata"]``: the per-sample facts tiling needs.

    mpp / spot size / image scale are repeated here (not only in ``uns["stimage"]``) because
    ``anndata.concat(..., uns_merge="unique")`` keeps each library's entry but drops the
    top-level values that differ between samples; tiling then still has them per sample.
    """
    return {keys.IMAGE_PATH: image_path, keys.MPP: float(mpp), keys.SPOT_DIAMETER_UM: float(spot_diameter_um),
            IMAGE_SCALE: float(image_scale), "source": source}


def as_count_matrix(x, where: str, obs_names=None, var_names=None) -> sp.csr_matrix:
    """Validate raw counts (finite, >= 0, integer) and return int32 CSR.

    The error names the first offending spot and gene, so a user can find it. Counts
    stored as text (bytes/str/object) are refused before SciPy sees them.
    """
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    if dtype.kind not in "biuf":
        raise StimageError(f"{where}: counts are stored as {dtype} (text?), not numbers; "
                           "raw integer counts are required")
    try:
        m = sp.csr_matrix(x)
    except (ValueError, TypeError) as e:
        raise StimageError(f"{where}: counts are not a valid matrix ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    data = m.data
    bad = ~np.isfinite(data) | (data < 0) | (data != np.round(data))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(m.indptr, i, side="right") - 1)
        col = int(m.indices[i])
        spot = obs_names[row] if obs_names is not None else row
        gene = var_names[col] if var_names is not None else col
        kind = "NaN/inf" if not np.isfinite(data[i]) else ("negative" if data[i] < 0 else "non-integer")
        raise StimageError(f"{where}: {kind} count {float(data[i])} at spot {spot}, gene {gene} "
                           f"({int(bad.sum())} bad value(s)); raw integer counts are required")
    if m.nnz and data.max() > np.iinfo(np.int32).max:
        raise StimageError(f"{where}: counts exceed int32")
    return m.astype(np.int32)


def describe_cell(value, integer: bool = False) -> str:
    """How a bad table cell reads in an error: empty, text, or a non-finite / fractional number."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return "empty"
    if isinstance(value, (int, float, np.number)):
        return f"{float(value)}, not {'an integer' if integer else 'finite'}"
    return f"'{value}', not {'an integer' if integer else 'a number'}"


def unique_names(names, where: str) -> list[str]:
    """Make gene symbols unique the scanpy way (``GENE``, ``GENE-1``, ...) and say so."""
    names = [str(n) for n in names]
    seen: dict[str, int] = {}
    out = []
    dup = 0
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
            dup += 1
        else:
            seen[n] = 0
            out.append(n)
    if dup:
        warnings.warn(f"{where}: {dup} duplicated gene symbol(s) made unique with -1, -2 suffixes",
                      stacklevel=3)
    return out


def max_image_pixels() -> int:
    """The cap (px) on images decoded whole: ``$STIMAGE_MAX_IMAGE_PIXELS`` or 2**30."""
    raw = os.environ.get(PIXELS_ENV)
    if raw is None or raw.strip() == "":
        return int(MAX_IMAGE_PIXELS)
    try:
        cap = float(raw)
    except ValueError:
        cap = float("nan")
    if not (np.isfinite(cap) and cap >= 1):
        raise StimageError(f"{PIXELS_ENV}={raw!r} is not a positive number of pixels")
    return int(cap)


def _tiff_header(path: Path) -> tuple[int, int, bool]:
    """(width, height, has_alpha) of a TIFF's first series, from tifffile (no pixels decoded).

    tifffile, not PIL, because a planar (S, Y, X) TIFF and one larger than PIL's guard are
    both ordinary here.
    """
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        axes, shape = series.axes, series.shape
        page = series.keyframe
        w, h = int(shape[axes.index("X")]), int(shape[axes.index("Y")])
        spp = int(page.samplesperpixel)
        alpha = spp in (2, 4) or (spp > 4 and bool(page.extrasamples))
    return w, h, alpha


def _pil_header(path: Path) -> tuple[int, int, bool]:
    """(width, height, has_alpha) through PIL, with its decompression-bomb guard on.

    The guard is set to this project's explicit bound (not disabled): a header claiming
    more than twice ``max_image_pixels()`` px is refused by PIL itself; between one and
    two times the bound PIL only warns, and the callers that decode apply the cap.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_image_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
                return int(im.size[0]), int(im.size[1]), alpha
        except Image.DecompressionBombError:
            raise StimageError(f"image {path} claims more than {2 * max_image_pixels():,} px (PIL's "
                               f"decompression-bomb guard); if it is genuine, raise {PIXELS_ENV}") from None


def image_header(path: str | Path) -> tuple[int, int, bool]:
    """(width, height, has_alpha) of an image file without decoding its pixels."""
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"image {path} not found")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return _tiff_header(path)
        return _pil_header(path)
    except StimageError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        raise StimageError(f"image {path} is unreadable ({type(e).__name__}: {msg})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file without decoding its pixels."""
    w, h, _ = image_header(path)
    return w, h
