"""Spot-centred tiles at a physical size, cached per sample in one array file.

A tile is a square of ``tile_um`` µm centred on the spot, cut from the sample's image in
that image's pixels (side ``crop_px = tile_um / mpp * image_scale``, mpp in µm per
full-resolution px, image_scale = image-file px per full-resolution px) and resized to
``tile_px`` (INTER_AREA when shrinking, INTER_LINEAR when enlarging). Parts outside the
image are padded white (glass) and the padded fraction is recorded in
``obs["tile_border_frac"]``. With ``cache_dir`` the tiles of a sample are stored once as
one ``.npy`` (read back as a memmap); never as thousands of image files.

Several samples in one AnnData (e.g. ``anndata.concat(..., uns_merge="unique")``): spots
are grouped by ``obs["sample"]``; each group is cut from the image in
``uns["spatial"][sample]["metadata"]["image_path"]`` with that library's own mpp and
image_scale (``metadata["mpp"]``, ``metadata["image_scale"]``, written by the readers).
The top-level ``uns["stimage"]`` values are used only for a single-sample AnnData or for
the sample named by its ``library_id``, because after a concat they describe at most one
of the samples.
"""

from __future__ import annotations

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
from data_pipelines.slides.common import IMAGE_SCALE, LIBRARY_ID

__all__ = ["spot_tiles", "tile_geometry", "crop_tile", "load_image", "lowres_view", "sample_image_path", "stain_tag",
           "PAD_VALUE"]

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
    ums = {float(_library_value(adata, lib, keys.SPOT_DIAMETER_UM, len(libs) == 1)) for lib in libs}
    if len(ums) != 1:
        raise StimageError(f"samples have different spot diameters {sorted(ums)} µm; pass tile_um")
    return ums.pop()


def _sample_geometry(adata, lib: str, tile_um: float, tile_px: int, single: bool) -> dict:
    mpp = float(_library_value(adata, lib, keys.MPP, single))
    scale = float(_library_value(adata, lib, IMAGE_SCALE, single, default=1.0))
    if not (np.isfinite(mpp) and mpp > 0 and np.isfinite(scale) and scale > 0):
        raise StimageError(f"sample {lib}: mpp ({mpp}) and image_scale ({scale}) must be positive")
    return {"mpp": mpp, "image_scale": scale, "crop_px": tile_um / mpp * scale}


def tile_geometry(adata, tile_um: float | None = None, tile_px: int = 299) -> dict:
    """The tiling geometry, for provenance.

    Returns ``tile_um`` (µm, default the spot diameter), ``tile_px`` (output side, px),
    ``mpp`` (µm per full-res px), ``image_scale`` and ``crop_px`` (crop side in image-file
    px) — these three are None when samples differ — and ``samples``:
    {sample: {mpp, image_scale, crop_px}}.
    """
    libs = _samples(adata)
    tile_um = float(tile_um) if tile_um is not None else _default_tile_um(adata, libs)
    if not (np.isfinite(tile_um) and tile_um > 0) or int(tile_px) <= 0:
        raise StimageError(f"tile size must be positive (tile_um={tile_um}, tile_px={tile_px})")
    per = {lib: _sample_geometry(adata, lib, tile_um, int(tile_px), len(libs) == 1) for lib in libs}
    out = {"tile_um": tile_um, "tile_px": int(tile_px)}
    for k in ("mpp", "image_scale", "crop_px"):
        vals = {g[k] for g in per.values()}
        out[k] = vals.pop() if len(vals) == 1 else None
    out["samples"] = per
    return out


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3) image; one clear error when missing or unreadable."""
    if not path or not Path(path).is_file():
        raise StimageError(f"image {path or '(none recorded)'} not found; tiles need the H&E image")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise StimageError(f"image {path} is unreadable or truncated (or larger than OpenCV's "
                           "OPENCV_IO_MAX_IMAGE_PIXELS limit)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def crop_tile(img: np.ndarray, cx: float, cy: float, crop_px: float, tile_px: int) -> tuple[np.ndarray, float]:
    """One (tile_px, tile_px, 3) tile centred at (cx, cy) image px, and its padded fraction.

    The crop is ``round(crop_px)`` px square starting at ``round(c - side/2)``; the padded
    fraction is that of the crop (before resizing), so it is exact.
    """
    side = max(int(round(crop_px)), 1)
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    h, w = img.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    inside = (xb - xa) * (yb - ya) if xb > xa and yb > ya else 0
    if inside == side * side:
        out = img[y0:y0 + side, x0:x0 + side]  # no copy needed: resize or the caller copies
    else:
        out = np.full((side, side, 3), PAD_VALUE, np.uint8)
        if inside:
            out[ya - y0:yb - y0, xa - x0:xb - x0] = img[ya:yb, xa:xb]
    frac = 1.0 - inside / float(side * side)
    if side != tile_px:
        interp = cv2.INTER_AREA if side > tile_px else cv2.INTER_LINEAR
        out = cv2.resize(np.ascontiguousarray(out), (tile_px, tile_px), interpolation=interp)
    return out, frac


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


def _cache_name(lib: str, tile_um: float, tile_px: int, geo: dict, xy: np.ndarray, image_path: str,
                stain=None) -> str:
    """``<sample>__<tile_um>um_<tile_px>px[__<stain>]__<hash>.npy``; the hash covers the spot
    coordinates, crop size (so mpp/image_scale) and image file name, so any change makes a
    new file; stain-normalised tiles carry the reference's tag."""
    h = hashlib.sha1(np.ascontiguousarray(xy, np.float64).tobytes())
    h.update(f"{geo['crop_px']:.6f}|{Path(image_path).name}".encode())
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", lib)
    tag = "" if stain is None else f"__{stain_tag(stain)}"
    return f"{safe}__{tile_um:g}um_{tile_px}px{tag}__{h.hexdigest()[:10]}.npy"


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
    xy = np.asarray(adata.obsm[keys.SPATIAL], np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise StimageError(f"sample {lib}: obsm['spatial'] must be finite (n_spots, 2) pixel x, y "
                           f"(got shape {xy.shape})")
    path = sample_image_path(adata, lib)
    n = len(xy)
    cache = (Path(cache_dir) / _cache_name(lib, tile_um, tile_px, geo, xy, path, stain)
             if cache_dir is not None else None)
    if cache is not None:
        hit = _load_cache(cache, n, tile_px)
        if hit is not None:
            return hit
    img = load_image(path)
    centres = xy * geo["image_scale"]
    h, w = img.shape[:2]
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
        for i in tqdm(range(n), desc=f"tiles {lib}", disable=not progress, leave=False):
            tiles[i], frac[i] = crop_tile(img, centres[i, 0], centres[i, 1], geo["crop_px"], tile_px)
        if stain is not None:
            from data_pipelines.stain_normalisation import apply_stain, fit_source

            # The slide's own stains, once, from a low-resolution view; then batches of tiles.
            source = fit_source(stain.method, lowres_view(img))
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
