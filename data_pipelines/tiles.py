"""Spot-centred tiles at a physical size, cached per sample in one array file.

A tile is a square of ``tile_um`` µm centred on the spot, cut from the sample's image in
that image's pixels (side ``crop_px = tile_um / mpp * image_scale``, mpp in µm per
full-resolution px, image_scale = image-file px per full-resolution px) and resized to
``tile_px`` (INTER_AREA when shrinking, INTER_LINEAR when enlarging). Parts outside the
image are padded white (glass) and the padded fraction is recorded in
``obs["tile_border_frac"]``. With ``cache_dir`` the tiles of a sample are stored once as
one ``.npy`` (read back as a memmap); never as thousands of image files. The cache file's
name carries a hash of the image's content (sha256), the crop geometry, the spot
coordinates and the stain reference, so a changed image makes new tiles, never stale ones.

Images are decoded whole up to ``max_image_pixels()`` px (2**30 by default,
``$STIMAGE_MAX_IMAGE_PIXELS``); a TIFF beyond it is read in pieces (strips, tiles or a
memory map, see :mod:`data_pipelines.wsi`), any other format beyond it is refused with one
clear error. Transparent pixels are composited on white (glass) in every path.

Several samples in one AnnData (e.g. ``anndata.concat(..., uns_merge="unique")``): spots
are grouped by ``obs["sample"]``; each group is cut from the image in
``uns["spatial"][sample]["metadata"]["image_path"]`` with that library's own mpp and
image_scale (``metadata["mpp"]``, ``metadata["image_scale"]``, written by the readers).
The top-level ``uns["stimage"]`` values are used only for a single-sample AnnData or for
the sample named by its ``library_id``, because after a concat they describe at most one
of the samples.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import (IMAGE_SCALE, LIBRARY_ID, PIXELS_ENV, TIFF_SUFFIXES, image_header,
                                          max_image_pixels)

MAX_CROP_PX = 32768  # a tile side in image pixels beyond which the geometry is wrong, not the tile

__all__ = ["spot_tiles", "tile_geometry", "crop_tile", "load_image", "lowres_view", "sample_image_path", "stain_tag",
           "composite_on_white", "PAD_VALUE"]

log = logging.getLogger("stimage")
PAD_VALUE = 255  # white, like the glass around tissue
LOWRES_SIDE = 2048  # px, longer side of the view a slide's own stains are estimated from
STAIN_BATCH = 64  # tiles normalised per vectorised step


def _samples(adata) -> list[str]:
    """Sample ids in order of first appearance (one when obs has no sample column)."""
    if keys.SAMPLE in adata.obs:
        return [str(s) for s in pd.unique(adata.obs[keys.SAMPLE].astype(str))]
    lib = adata.uns.get(keys.STIMAGE_UNS, {}).get(LIBRARY_ID)
    if lib is None and len(adata.uns.get(keys.SPATIAL_UNS, {})) == 1:
        lib = next(iter(adata.uns[keys.SPATIAL_UNS]))
    if lib is None:
        raise StimageError(f"data lack obs[{keys.SAMPLE!r}] and uns['stimage']['library_id']; "
                           "cannot tell which image the spots belong to")
    return [str(lib)]


def _library_value(adata, lib: str, key: str, single: bool, default=None):
    """A per-sample value: library metadata first, then uns['stimage'] if it is this sample's."""
    meta = adata.uns.get(keys.SPATIAL_UNS, {}).get(lib, {}).get("metadata", {})
    if key in meta:
        return meta[key]
    top = adata.uns.get(keys.STIMAGE_UNS, {})
    if key in top and (single or str(top.get(LIBRARY_ID)) == lib):
        return top[key]
    if default is not None:
        return default
    raise StimageError(f"sample {lib}: no {key!r} in uns['spatial'][{lib!r}]['metadata'] or "
                       f"uns['stimage'] (µm per pixel and spot size come from the readers, e.g. `stimage read`)")


def _default_tile_um(adata, libs: list[str]) -> float:
    ums = {_positive_number(_library_value(adata, lib, keys.SPOT_DIAMETER_UM, len(libs) == 1),
                            f"sample {lib}: spot_diameter_um") for lib in libs}
    if len(ums) != 1:
        raise StimageError(f"samples have different spot diameters {sorted(ums)} µm; pass tile_um")
    return ums.pop()


def _positive_number(value, what: str) -> float:
    """``value`` as a float; a string, None or another non-number is one clear error."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise StimageError(f"{what} is {value!r} ({type(value).__name__}); a number is required")
    try:
        return float(np.asarray(value).item()) if np.ndim(value) == 0 else float("nan")
    except (TypeError, ValueError):
        raise StimageError(f"{what} is {value!r}; a number is required") from None


def _sample_geometry(adata, lib: str, tile_um: float, tile_px: int, single: bool) -> dict:
    mpp = _positive_number(_library_value(adata, lib, keys.MPP, single), f"sample {lib}: mpp")
    scale = _positive_number(_library_value(adata, lib, IMAGE_SCALE, single, default=1.0),
                             f"sample {lib}: image_scale")
    if not (np.isfinite(mpp) and mpp > 0 and np.isfinite(scale) and scale > 0):
        raise StimageError(f"sample {lib}: mpp ({mpp}) and image_scale ({scale}) must be positive")
    crop_px = tile_um / mpp * scale
    if not 1.0 <= crop_px <= MAX_CROP_PX:  # e.g. mpp 1e-9: a tile would be 10^11 px wide
        raise StimageError(f"sample {lib}: a {tile_um:g} µm tile at {mpp:g} µm/px (image scale {scale:g}) is "
                           f"{crop_px:.3g} px wide; check the sample's mpp (tiles must be 1 to {MAX_CROP_PX} px)")
    return {"mpp": mpp, "image_scale": scale, "crop_px": crop_px}


def tile_geometry(adata, tile_um: float | None = None, tile_px: int = 299) -> dict:
    """The tiling geometry, for provenance.

    Returns ``tile_um`` (µm, default the spot diameter), ``tile_px`` (output side, px),
    ``mpp`` (µm per full-res px), ``image_scale`` and ``crop_px`` (crop side in image-file
    px) — these three are None when samples differ — and ``samples``:
    {sample: {mpp, image_scale, crop_px}}.
    """
    libs = _samples(adata)
    tile_um = (_positive_number(tile_um, "tile_um") if tile_um is not None
               else _default_tile_um(adata, libs))
    if not (np.isfinite(tile_um) and tile_um > 0) or int(tile_px) <= 0:
        raise StimageError(f"tile size must be positive (tile_um={tile_um}, tile_px={tile_px})")
    per = {lib: _sample_geometry(adata, lib, tile_um, int(tile_px), len(libs) == 1) for lib in libs}
    out = {"tile_um": tile_um, "tile_px": int(tile_px)}
    for k in ("mpp", "image_scale", "crop_px"):
        vals = {g[k] for g in per.values()}
        out[k] = vals.pop() if len(vals) == 1 else None
    out["samples"] = per
    return out


def composite_on_white(rgba: np.ndarray, *, premultiplied: bool = False) -> np.ndarray:
    """RGBA uint8 (..., 4) composited onto white (glass) → RGB uint8 (..., 3).

    Transparent means "no tissue here" (OpenSlide's no-data, a PNG with its background cut
    away), so it must read as glass, never as the black its RGB often holds. Straight
    alpha: ``(c·a + 255·(255 − a)) / 255``, rounded; premultiplied (TIFF associated alpha):
    ``c + 255 − a``. Done in row blocks so a large image needs no 16-bit copy of itself.
    """
    rgba = np.asarray(rgba)
    rgb, a = rgba[..., :3], rgba[..., 3:4]
    if (a == 255).all():
        return np.ascontiguousarray(rgb)
    out = np.empty(rgb.shape, np.uint8)
    row = int(np.prod(rgb.shape[1:])) if rgb.ndim > 1 else 1
    step = max(1, (1 << 22) // max(row, 1))
    for s in range(0, len(out), step):
        c, al = rgb[s:s + step].astype(np.uint16), a[s:s + step].astype(np.uint16)
        if premultiplied:
            out[s:s + step] = np.minimum(c + (255 - al), 255)
        else:
            out[s:s + step] = (c * al + PAD_VALUE * (255 - al) + 127) // 255
    return out


def _to_rgb(img: np.ndarray, path, premultiplied: bool = False) -> np.ndarray:
    """OpenCV's IMREAD_UNCHANGED result (grey, grey+alpha, BGR, BGRA; 8 or 16 bit) → RGB uint8."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)  # what IMREAD_COLOR does with 16-bit files
    elif img.dtype != np.uint8:
        raise StimageError(f"image {path} has {img.dtype} pixels; 8- or 16-bit RGB(A) is required")
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 2:  # grey + alpha
        img = np.dstack([img[..., 0], img[..., 0], img[..., 0], img[..., 1]])
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    else:
        return cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    return composite_on_white(img, premultiplied=premultiplied)


def _pixel_cap_error(path, w: int, h: int, cap: int) -> StimageError:
    hint = ("it is read in pieces only by the slide reader" if Path(path).suffix.lower() in TIFF_SUFFIXES
            else "save it as a tiled TIFF, which is read in pieces")
    return StimageError(f"image {path} is {w}x{h} = {w * h:,} px, over the {cap:,} px limit for decoding an "
                        f"image whole; {hint}, or raise {PIXELS_ENV} if memory allows")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a whole image file; one clear error when missing, unreadable or too big.

    The header is read first (no pixels) and an image over ``max_image_pixels()`` px is
    refused before anything is allocated. Transparent pixels (RGBA/LA/palette PNG, TIFF
    alpha) are composited on white; grey images become RGB; 16-bit images are reduced to
    8 bits as OpenCV does; planar TIFFs are read by OpenCV's libtiff. Files with alpha are
    decoded with IMREAD_UNCHANGED, which ignores an EXIF orientation tag.
    """
    if not path or not Path(path).is_file():
        raise StimageError(f"image {path or '(none recorded)'} not found; tiles need the H&E image "
                           "(if the files moved, pass --image-root DIR or set STIMAGE_IMAGE_ROOT)")
    w, h, alpha = image_header(path)
    cap = max_image_pixels()
    if w * h > cap:
        raise _pixel_cap_error(path, w, h, cap)
    if alpha and Path(path).suffix.lower() in TIFF_SUFFIXES:
        # OpenCV decodes TIFF alpha through libtiff's RGBA interface, which premultiplies
        # unassociated alpha; tifffile reads the samples as stored and says which alpha it is.
        from data_pipelines.wsi import open_slide

        try:
            slide = open_slide(path, mpp=1.0, backend="tifffile")
        except StimageError:
            slide = None  # e.g. a codec tifffile lacks: OpenCV below, its colours premultiplied
        if slide is not None:
            return slide.region(0, 0, slide.width, slide.height)
    from data_pipelines.io import quiet_stderr

    try:
        with quiet_stderr():
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED if alpha else cv2.IMREAD_COLOR)
    except cv2.error as e:  # OpenCV >= 5 raises instead of returning None on its own size limit
        msg = str(e).strip().splitlines()[-1][:120] if str(e).strip() else ""
        raise StimageError(f"image {path} could not be decoded by OpenCV ({msg})") from None
    if img is None:
        raise StimageError(f"image {path} is unreadable or truncated (or larger than OpenCV's "
                           "OPENCV_IO_MAX_IMAGE_PIXELS limit)")
    if alpha:
        return _to_rgb(img, path, premultiplied=Path(path).suffix.lower() in TIFF_SUFFIXES)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _open_image(path: str):
    """The decoded image (H, W, 3), or a lazy :class:`~data_pipelines.wsi.Slide` for a TIFF
    too big to decode whole (its pixels are then read crop by crop)."""
    if path and Path(path).is_file() and Path(path).suffix.lower() in TIFF_SUFFIXES:
        w, h, _ = image_header(path)
        if w * h > max_image_pixels():
            from data_pipelines.wsi import open_slide

            return open_slide(path, mpp=1.0)  # mpp unused: the spots' geometry comes from the data
    return load_image(path)


def _image_hw(src) -> tuple[int, int]:
    return src.shape[:2] if isinstance(src, np.ndarray) else (src.height, src.width)


def _lowres(src) -> np.ndarray:
    """:func:`lowres_view` of a decoded image, or a lazy slide's thumbnail of the same size."""
    return lowres_view(src) if isinstance(src, np.ndarray) else src.thumbnail(LOWRES_SIDE)[0]


def _crop_box(cx: float, cy: float, crop_px: float) -> tuple[int, int, int]:
    """(side, x0, y0): the ``round(crop_px)`` px square starting at ``round(c - side/2)``."""
    side = max(int(round(crop_px)), 1)
    return side, int(round(cx - side / 2)), int(round(cy - side / 2))


def _inside_px(x0: int, y0: int, side: int, w: int, h: int) -> int:
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    return (xb - xa) * (yb - ya) if xb > xa and yb > ya else 0


def _resize_tile(out: np.ndarray, side: int, tile_px: int) -> np.ndarray:
    if side == tile_px:
        return out
    interp = cv2.INTER_AREA if side > tile_px else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(out), (tile_px, tile_px), interpolation=interp)


def crop_tile(img: np.ndarray, cx: float, cy: float, crop_px: float, tile_px: int) -> tuple[np.ndarray, float]:
    """One (tile_px, tile_px, 3) tile centred at (cx, cy) image px, and its padded fraction.

    The crop is ``round(crop_px)`` px square starting at ``round(c - side/2)``; the padded
    fraction is that of the crop (before resizing), so it is exact.
    """
    side, x0, y0 = _crop_box(cx, cy, crop_px)
    h, w = img.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    inside = _inside_px(x0, y0, side, w, h)
    if inside == side * side:
        out = img[y0:y0 + side, x0:x0 + side]  # no copy needed: resize or the caller copies
    else:
        out = np.full((side, side, 3), PAD_VALUE, np.uint8)
        if inside:
            out[ya - y0:yb - y0, xa - x0:xb - x0] = img[ya:yb, xa:xb]
    frac = 1.0 - inside / float(side * side)
    return _resize_tile(out, side, tile_px), frac


def _crop_slide(slide, cx: float, cy: float, crop_px: float, tile_px: int) -> tuple[np.ndarray, float]:
    """:func:`crop_tile` from a lazy slide: the same square, padding and resizing."""
    side, x0, y0 = _crop_box(cx, cy, crop_px)
    inside = _inside_px(x0, y0, side, slide.width, slide.height)
    out = slide.region(x0, y0, side, side)  # white outside the slide, as crop_tile pads
    return _resize_tile(out, side, tile_px), 1.0 - inside / float(side * side)


def sample_image_path(adata, lib: str) -> str:
    """The H&E image file of sample ``lib`` (``uns["spatial"][lib]["metadata"]["image_path"]``)."""
    try:
        return str(adata.uns[keys.SPATIAL_UNS][lib]["metadata"][keys.IMAGE_PATH])
    except (KeyError, TypeError):
        raise StimageError(f"sample {lib}: no image path in uns['spatial'][{lib!r}]['metadata']") from None


def stain_tag(stain) -> str:
    """A short name for a stain reference (method + hash of its statistics), or "raw"."""
    if stain is None:
        return "raw"
    h = hashlib.sha1(json.dumps(stain.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{stain.method}-{h}"


def lowres_view(img: np.ndarray, max_side: int = LOWRES_SIDE) -> np.ndarray:
    """The image downscaled (area averaging) so its longer side is at most ``max_side`` px."""
    h, w = img.shape[:2]
    f = max_side / max(h, w)
    if f >= 1:
        return img
    return cv2.resize(img, (max(int(round(w * f)), 1), max(int(round(h * f)), 1)), interpolation=cv2.INTER_AREA)


def _cache_key(tile_um: float, tile_px: int, geo: dict, xy: np.ndarray) -> str:
    """Hash of everything but the image: spot coordinates, crop size (so mpp/image_scale)."""
    h = hashlib.sha1(np.ascontiguousarray(xy, np.float64).tobytes())
    h.update(f"{geo['crop_px']:.6f}|{tile_um:g}|{tile_px}".encode())
    return h.hexdigest()[:10]


def _cache_name(lib: str, tile_um: float, tile_px: int, geo: dict, xy: np.ndarray, image_path: str,
                stain=None) -> str:
    """``<sample>__<tile_um>um_<tile_px>px[__<stain>]__<hash>__<image sha256[:12]>.npy``.

    The first hash covers the spot coordinates and crop size (so mpp/image_scale), the
    second is the image file's content digest (:func:`data_pipelines.fingerprint.file_digest`),
    so a changed image, even under the same name, makes a new file; stain-normalised tiles
    carry the reference's tag.
    """
    from data_pipelines.fingerprint import file_digest

    try:
        image = file_digest(image_path)[:12]
    except OSError as e:
        raise StimageError(f"image {image_path} cannot be read ({type(e).__name__}: {e.strerror or e})") from None
    return f"{_cache_stem(lib, tile_um, tile_px, stain)}__{_cache_key(tile_um, tile_px, geo, xy)}__{image}.npy"


def _cache_stem(lib: str, tile_um: float, tile_px: int, stain=None) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", lib)
    tag = "" if stain is None else f"__{stain_tag(stain)}"
    return f"{safe}__{tile_um:g}um_{tile_px}px{tag}"


def _orphan_cache(cache_dir: Path, lib: str, tile_um: float, tile_px: int, geo: dict, xy: np.ndarray,
                  stain=None) -> Path | None:
    """The one cache of these spots and geometry when the image itself is gone, else None.

    Without the image its content cannot be checked, but the tiles cut from it are all
    there is; they are reused only when exactly one image version left a cache.
    """
    prefix = f"{_cache_stem(lib, tile_um, tile_px, stain)}__{_cache_key(tile_um, tile_px, geo, xy)}__"
    hits = [p for p in Path(cache_dir).glob(glob.escape(prefix) + "*.npy") if not p.name.endswith(".border.npy")]
    return hits[0] if len(hits) == 1 else None


def _load_cache(cache: Path, n: int, tile_px: int):
    """(tiles memmap, border fractions) from a complete cache, else None."""
    border = cache.with_suffix(".border.npy")
    if not (cache.is_file() and border.is_file()):
        return None
    try:
        tiles = np.load(cache, mmap_mode="r")
        frac = np.load(border)
    except (ValueError, OSError) as e:
        warnings.warn(f"tile cache {cache} is unreadable ({e}); rebuilding it", stacklevel=4)
        return None
    if tiles.shape != (n, tile_px, tile_px, 3) or tiles.dtype != np.uint8 or frac.shape != (n,):
        warnings.warn(f"tile cache {cache} has shape {tiles.shape}, expected {(n, tile_px, tile_px, 3)}; "
                      "rebuilding it", stacklevel=4)
        return None
    return tiles, frac


def _sample_tiles(adata, lib: str, tile_um: float, tile_px: int, geo: dict, cache_dir,
                  progress: bool, stain=None) -> tuple[np.ndarray, np.ndarray]:
    try:
        xy = np.asarray(adata.obsm[keys.SPATIAL], np.float64)
    except (TypeError, ValueError):
        raise StimageError(f"sample {lib}: obsm['spatial'] holds non-numeric spot coordinates") from None
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise StimageError(f"sample {lib}: obsm['spatial'] must be finite (n_spots, 2) pixel x, y "
                           f"(got shape {xy.shape})")
    path = sample_image_path(adata, lib)
    n = len(xy)
    cache = None
    if cache_dir is not None:
        if path and Path(path).is_file():
            cache = Path(cache_dir) / _cache_name(lib, tile_um, tile_px, geo, xy, path, stain)
        else:
            orphan = _orphan_cache(Path(cache_dir), lib, tile_um, tile_px, geo, xy, stain)
            if orphan is not None and (hit := _load_cache(orphan, n, tile_px)) is not None:
                log.info("%s: image %s is gone; reusing its cached tiles %s", lib, path or "(none)", orphan.name)
                return hit
    if cache is not None:
        hit = _load_cache(cache, n, tile_px)
        if hit is not None:
            return hit
    img = _open_image(path)
    centres = xy * geo["image_scale"]
    h, w = _image_hw(img)
    off = ~((centres[:, 0] >= 0) & (centres[:, 0] < w) & (centres[:, 1] >= 0) & (centres[:, 1] < h))
    if off.any():
        raise StimageError(f"sample {lib}: {int(off.sum())} spot(s) lie outside the {w}x{h} image "
                           f"(e.g. {adata.obs_names[np.flatnonzero(off)[0]]}); wrong image or scale?")
    tmp = border_tmp = None
    try:
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tag = f"{os.getpid()}.tmp.npy"
            tmp, border_tmp = cache.with_name(f".{cache.name}.{tag}"), cache.with_name(f".{cache.stem}.border.{tag}")
            tiles = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, tile_px, tile_px, 3))
        else:
            tiles = np.empty((n, tile_px, tile_px, 3), np.uint8)
        frac = np.zeros(n, np.float32)
        crop = crop_tile if isinstance(img, np.ndarray) else _crop_slide
        for i in tqdm(range(n), desc=f"tiles {lib}", disable=not progress, leave=False):
            tiles[i], frac[i] = crop(img, centres[i, 0], centres[i, 1], geo["crop_px"], tile_px)
        if stain is not None:
            from data_pipelines.stain_normalisation import apply_stain, fit_source

            # The slide's own stains, once, from a low-resolution view; then batches of tiles.
            source = fit_source(stain.method, _lowres(img))
            for s0 in range(0, n, STAIN_BATCH):
                tiles[s0:s0 + STAIN_BATCH] = apply_stain(stain, source, np.asarray(tiles[s0:s0 + STAIN_BATCH]))
        if cache is not None:
            tiles.flush()
            del tiles
            np.save(border_tmp, frac)
            # border first, tiles last: a tiles file under its final name means both are complete
            os.replace(border_tmp, cache.with_suffix(".border.npy"))
            os.replace(tmp, cache)
            tiles = np.load(cache, mmap_mode="r")
    finally:
        for t in (tmp, border_tmp):
            if t is not None and t.exists():
                t.unlink()
    padded = int((frac > 0).sum())
    if padded:
        log.info("%s: %d of %d tiles reach past the image edge and were padded white", lib, padded, n)
    return tiles, frac


def spot_tiles(adata, *, tile_um: float | None = None, tile_px: int = 299,
               cache_dir: str | os.PathLike | None = None, progress: bool = True, stain=None) -> np.ndarray:
    """(n_spots, tile_px, tile_px, 3) uint8 RGB tiles in ``adata``'s spot order.

    stain: a :class:`~data_pipelines.stain_normalisation.Reference` to normalise towards
    (each sample's own stains are estimated once from a low-resolution view of its image),
    or None for the raw tiles.
    tile_um: tile side in µm (default the spot diameter, ``uns["stimage"]["spot_diameter_um"]``);
    tile_px: output side in px. Each sample's image is read once (not at all when its cache
    is valid). Sets ``obs["tile_border_frac"]`` (fraction of each crop padded white) unless
    ``adata`` is a view. Returns a read-only memmap when cached and one sample is given.
    """
    if keys.SPATIAL not in adata.obsm:
        raise StimageError("data lack obsm['spatial'] spot coordinates")
    geo = tile_geometry(adata, tile_um, tile_px)
    tile_um, tile_px = geo["tile_um"], geo["tile_px"]
    libs = list(geo["samples"])
    if len(libs) == 1:
        tiles, frac = _sample_tiles(adata, libs[0], tile_um, tile_px, geo["samples"][libs[0]], cache_dir, progress,
                                    stain)
    else:
        samples = adata.obs[keys.SAMPLE].astype(str).to_numpy()
        tiles = np.empty((adata.n_obs, tile_px, tile_px, 3), np.uint8)
        frac = np.zeros(adata.n_obs, np.float32)
        for lib in libs:
            m = samples == lib
            tiles[m], frac[m] = _sample_tiles(adata[m], lib, tile_um, tile_px, geo["samples"][lib],
                                              cache_dir, progress, stain)
    if not adata.is_view:
        adata.obs[keys.TILE_BORDER_FRAC] = frac
    return tiles
