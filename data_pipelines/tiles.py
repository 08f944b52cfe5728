"""Spot-centred tiles at a physical size, cached per sample in one array file.

A tile is a square of ``tile_um`` µm centred on the spot, cut from the sample's image
(in that image's pixels: ``tile_um / mpp * image_scale``), resized to ``tile_px``.
Parts outside the image are padded white (glass) and the padded fraction recorded in
``obs["tile_border_frac"]``. With ``cache_dir`` the tiles of a sample are stored once as
one ``.npy`` (read back as a memmap); never as thousands of image files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data_pipelines import keys
from data_pipelines.errors import StimageError

__all__ = ["spot_tiles", "tile_geometry", "crop_tile", "load_image"]

log = logging.getLogger("stimage")
PAD_VALUE = 255  # white, like the glass around tissue


def _stimage_uns(adata) -> dict:
    u = adata.uns.get(keys.STIMAGE_UNS)
    if not u or keys.MPP not in u:
        raise StimageError("data lack uns['stimage']['mpp'] (µm per pixel); read them with `stimage read`")
    return u


def tile_geometry(adata, tile_um: float | None = None, tile_px: int = 299) -> dict:
    """tile_um, tile_px, mpp (µm/px, full resolution), image_scale, crop_px (image px)."""
    u = _stimage_uns(adata)
    tile_um = float(tile_um if tile_um is not None else u[keys.SPOT_DIAMETER_UM])
    if tile_um <= 0 or tile_px <= 0:
        raise StimageError(f"tile size must be positive (tile_um={tile_um}, tile_px={tile_px})")
    mpp = float(u[keys.MPP])
    scale = float(u.get("image_scale", 1.0))
    return {"tile_um": tile_um, "tile_px": int(tile_px), "mpp": mpp, "image_scale": scale,
            "crop_px": tile_um / mpp * scale}


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3) image; one clear error when missing or unreadable."""
    if not path or not Path(path).is_file():
        raise StimageError(f"image {path or '(none recorded)'} not found; tiles need the H&E image")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise StimageError(f"image {path} is unreadable or truncated")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def crop_tile(img: np.ndarray, cx: float, cy: float, crop_px: float, tile_px: int) -> tuple[np.ndarray, float]:
    """One (tile_px, tile_px, 3) tile centred at (cx, cy) image px, and its padded fraction."""
    side = max(int(round(crop_px)), 1)
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    h, w = img.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    out = np.full((side, side, 3), PAD_VALUE, np.uint8)
    inside = 0
    if xb > xa and yb > ya:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = img[ya:yb, xa:xb]
        inside = (xb - xa) * (yb - ya)
    frac = 1.0 - inside / float(side * side)
    if side != tile_px:
        interp = cv2.INTER_AREA if side > tile_px else cv2.INTER_LINEAR
        out = cv2.resize(out, (tile_px, tile_px), interpolation=interp)
    return out, frac


def _image_path(adata, lib: str) -> str:
    try:
        return adata.uns[keys.SPATIAL_UNS][lib]["metadata"][keys.IMAGE_PATH]
    except KeyError:
        raise StimageError(f"sample {lib}: no image path in uns['spatial'][{lib!r}]['metadata']") from None


def _cache_name(lib: str, geo: dict, xy: np.ndarray, image_path: str) -> str:
    h = hashlib.sha1(np.ascontiguousarray(xy, np.float64).tobytes())
    h.update(f"{geo['crop_px']:.6f}|{Path(image_path).name}".encode())
    return f"{lib}__{geo['tile_um']:g}um_{geo['tile_px']}px__{h.hexdigest()[:10]}.npy"


def _sample_tiles(adata, lib: str, geo: dict, cache_dir, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(adata.obsm[keys.SPATIAL], np.float64)
    if not np.isfinite(xy).all():
        raise StimageError(f"sample {lib}: spot coordinates contain NaN")
    path = _image_path(adata, lib)
    n, px = len(xy), geo["tile_px"]
    cache = Path(cache_dir) / _cache_name(lib, geo, xy, path) if cache_dir is not None else None
    if cache is not None and cache.exists():
        tiles = np.load(cache, mmap_mode="r")
        frac_file = cache.with_suffix(".border.npy")
        if tiles.shape == (n, px, px, 3) and frac_file.exists():
            return tiles, np.load(frac_file)
    img = load_image(path)
    centres = xy * geo["image_scale"]
    h, w = img.shape[:2]
    off = ~((centres[:, 0] >= 0) & (centres[:, 0] < w) & (centres[:, 1] >= 0) & (centres[:, 1] < h))
    if off.any():
        raise StimageError(f"sample {lib}: {int(off.sum())} spot(s) lie outside the {w}x{h} image "
                           f"(e.g. {adata.obs_names[np.flatnonzero(off)[0]]}); wrong image or scale?")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npy")
        tiles = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, px, px, 3))
    else:
        tiles = np.empty((n, px, px, 3), np.uint8)
    frac = np.zeros(n, np.float32)
    for i in tqdm(range(n), desc=f"tiles {lib}", disable=not progress, leave=False):
        tiles[i], frac[i] = crop_tile(img, centres[i, 0], centres[i, 1], geo["crop_px"], px)
    if cache is not None:
        tiles.flush()
        del tiles
        np.save(cache.with_suffix(".border.npy"), frac)
        os.replace(tmp, cache)
        tiles = np.load(cache, mmap_mode="r")
    return tiles, frac


def spot_tiles(adata, *, tile_um: float | None = None, tile_px: int = 299,
               cache_dir: str | os.PathLike | None = None, progress: bool = True) -> np.ndarray:
    """(n_spots, tile_px, tile_px, 3) uint8 RGB tiles in ``adata``'s spot order.

    Several samples in one AnnData are tiled from their own images
    (``uns["spatial"][sample]``). Sets ``obs["tile_border_frac"]`` and logs how many tiles
    needed padding. Returns a read-only memmap when cached and one sample is given.
    """
    if keys.SPATIAL not in adata.obsm:
        raise StimageError("data lack obsm['spatial'] spot coordinates")
    geo = tile_geometry(adata, tile_um, tile_px)
    samples = adata.obs[keys.SAMPLE].astype(str).to_numpy() if keys.SAMPLE in adata.obs else None
    libs = list(pd.unique(samples)) if samples is not None else [str(_stimage_uns(adata).get("library_id"))]
    if len(libs) == 1:
        tiles, frac = _sample_tiles(adata, libs[0], geo, cache_dir, progress)
    else:
        tiles = np.empty((adata.n_obs, geo["tile_px"], geo["tile_px"], 3), np.uint8)
        frac = np.zeros(adata.n_obs, np.float32)
        for lib in libs:
            m = samples == lib
            tiles[m], frac[m] = _sample_tiles(adata[m], lib, geo, cache_dir, progress)
    padded = int((frac > 0).sum())
    if padded:
        log.info("%d of %d tiles reach past the image edge and were padded white", padded, adata.n_obs)
    if not adata.is_view:
        adata.obs[keys.TILE_BORDER_FRAC] = frac
    return tiles
