"""AnnData that scanpy and squidpy plot as they are, with image references that survive a move.

Space Ranger-derived AnnData (``scanpy.read_visium``, ``squidpy.read.visium``) carries, per
library, ``uns["spatial"][lib]["images"]`` = ``{"hires": ≤ 2,000 px, "lowres": ≤ 600 px}`` RGB
arrays and ``uns["spatial"][lib]["scalefactors"]`` = ``tissue_hires_scalef``,
``tissue_lowres_scalef`` (image px per full-resolution px) and ``spot_diameter_fullres``;
``sc.pl.spatial`` and ``squidpy.pl.spatial_scatter`` need exactly these. :func:`add_images`
builds them from the H&E each library references, and every ``.h5ad`` the project writes
gets them through :func:`scverse_ready` (called by :func:`data_pipelines.io.write_h5ad`).

Image references: ``uns["spatial"][lib]["metadata"]["image_path"]`` is stored *relative to
the .h5ad* when the image lies beside or below it (:func:`portable_paths`) and made absolute
again when the file is read (:func:`resolve_image_paths`), against ``$STIMAGE_IMAGE_ROOT``
(``--image-root``) when set, else the .h5ad's folder. Moving a folder that holds both the
.h5ad and its images therefore keeps it usable. NumPy/OpenCV only (JAX-free).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from data_pipelines import keys
from data_pipelines.errors import StimageError

__all__ = ["HIRES_MAX_PX", "LOWRES_MAX_PX", "IMAGE_ROOT_ENV", "add_images", "portable_paths",
           "resolve_image_paths", "scverse_ready", "set_image_root", "image_root", "library_images", "shrunk_image"]

HIRES_MAX_PX = 2000  # Space Ranger's tissue_hires_image.png: longer side 2,000 px
LOWRES_MAX_PX = 600  # Space Ranger's tissue_lowres_image.png: longer side 600 px
IMAGE_ROOT_ENV = "STIMAGE_IMAGE_ROOT"
HIRES_SCALEF = keys.HIRES_SCALEF
LOWRES_SCALEF = keys.LOWRES_SCALEF
IMAGE_BASE = keys.IMAGE_BASE         # metadata: what a relative image_path is relative to
IMAGE_BASE_FILE, IMAGE_BASE_ROOT = "file", "image_root"


def image_root() -> Path | None:
    """``$STIMAGE_IMAGE_ROOT`` as a folder, or None when unset/empty."""
    raw = os.environ.get(IMAGE_ROOT_ENV, "").strip()
    return Path(raw) if raw else None


@contextlib.contextmanager
def set_image_root(path: str | os.PathLike | None) -> Iterator[None]:
    """``with set_image_root(DIR):`` (``--image-root DIR``) re-points relative (and moved
    absolute) image references to ``DIR`` for the command and the processes it starts (through
    ``$STIMAGE_IMAGE_ROOT``); the variable is restored afterwards. None: no change."""
    if path is None:
        yield
        return
    p = Path(path)
    if not p.is_dir():
        raise StimageError(f"--image-root {p} is not a folder")
    old = os.environ.get(IMAGE_ROOT_ENV)
    os.environ[IMAGE_ROOT_ENV] = str(p.resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(IMAGE_ROOT_ENV, None)
        else:
            os.environ[IMAGE_ROOT_ENV] = old


def _libraries(adata) -> dict:
    sp = adata.uns.get(keys.SPATIAL_UNS)
    return sp if isinstance(sp, dict) else {}


def _meta(entry) -> dict:
    meta = entry.get("metadata") if isinstance(entry, dict) else None
    return meta if isinstance(meta, dict) else {}


def _shrink(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """(image with longer side ≤ max_side, its px per input px); area averaging as Space Ranger."""
    import cv2

    h, w = img.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f >= 1.0:
        return np.ascontiguousarray(img), 1.0
    tw, th = max(1, round(w * f)), max(1, round(h * f))
    out = cv2.resize(np.ascontiguousarray(img), (tw, th), interpolation=cv2.INTER_AREA)
    return out, tw / w


def shrunk_image(slide, max_side: int = HIRES_MAX_PX) -> tuple[np.ndarray, float]:
    """(RGB uint8 with longer side min(max_side, the slide's), its px per slide px).

    ``Slide.thumbnail`` starts from a TIFF pyramid's *smallest* level (right for a tissue
    mask, too coarse here), so for a tifffile pyramid the smallest level at least
    ``max_side`` px long is used, shrunk band by band; OpenSlide and decoded images already start from the
    level nearest above."""
    from data_pipelines.wsi import _shrink_in_strips

    levels = getattr(getattr(slide, "_reader", None), "levels", None)
    target = min(max_side, max(slide.width, slide.height))
    if levels and max(levels[-1].width, levels[-1].height) < target:
        lev = next(lv for lv in reversed(levels) if max(lv.width, lv.height) >= target) \
            if any(max(lv.width, lv.height) >= target for lv in levels) else levels[0]
        img = _shrink_in_strips(lambda r0, r1: lev.read(0, r0, lev.width, r1 - r0, cache=False),
                                lev.width, lev.height, target, lev.chunk_rows)
        return np.ascontiguousarray(img[..., :3], dtype=np.uint8), img.shape[1] / slide.width
    img, f = slide.thumbnail(max_side)
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8), float(f)


def library_images(image_path: str | os.PathLike, image_scale: float = 1.0) -> tuple[dict, dict]:
    """``({"hires", "lowres"}, {tissue_hires_scalef, tissue_lowres_scalef})`` of one H&E.

    ``image_scale`` is image-file px per full-resolution px (Visium's hires PNG used as the
    image has ``tissue_hires_scalef``), so the scale factors map ``obsm["spatial"]``
    (full-resolution px) onto the arrays, as Space Ranger's do. A whole-slide TIFF/SVS is
    read level by level (never decoded whole) by :func:`data_pipelines.wsi.open_slide`.
    hires/lowres: (h, w, 3) uint8.
    """
    from data_pipelines.wsi import open_slide

    slide = open_slide(image_path, mpp=1.0)  # mpp unused here: only pixels are read
    hires, f_hi = shrunk_image(slide, HIRES_MAX_PX)
    lowres, f_lo = _shrink(hires, LOWRES_MAX_PX)
    return ({"hires": hires, "lowres": lowres},
            {HIRES_SCALEF: float(f_hi * image_scale), LOWRES_SCALEF: float(f_hi * f_lo * image_scale)})


def add_images(adata, *, force: bool = False):
    """Give every library of ``adata`` whose H&E exists the scverse images and scale factors
    (in place; returns ``adata``). Libraries that already have both images are left alone
    unless ``force``; libraries without an image file are skipped (nothing to draw).

    ``spot_diameter_fullres`` (full-resolution px) is kept when present, else computed from
    the library's (or ``uns["stimage"]``'s) spot diameter in µm and mpp.
    """
    top = adata.uns.get(keys.STIMAGE_UNS, {}) if isinstance(adata.uns.get(keys.STIMAGE_UNS), dict) else {}
    for lib, entry in _libraries(adata).items():
        if not isinstance(entry, dict):
            continue
        images = entry.get(keys.IMAGES)
        if not force and isinstance(images, dict) and "hires" in images and "lowres" in images:
            continue
        meta = _meta(entry)
        path = meta.get(keys.IMAGE_PATH)
        if not path or not Path(str(path)).is_file():
            continue
        scale = float(meta.get(keys.IMAGE_SCALE, top.get(keys.IMAGE_SCALE, 1.0)) or 1.0)
        imgs, sf = library_images(str(path), scale)
        factors = dict(entry.get("scalefactors") or {})
        factors.update(sf)
        if keys.SPOT_DIAMETER_FULLRES not in factors:
            um = meta.get(keys.SPOT_DIAMETER_UM, top.get(keys.SPOT_DIAMETER_UM))
            mpp = meta.get(keys.MPP, top.get(keys.MPP))
            if um and mpp:
                factors[keys.SPOT_DIAMETER_FULLRES] = float(um) / float(mpp)
        entry[keys.IMAGES] = imgs
        entry["scalefactors"] = factors
    return adata


def _is_below(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def portable_paths(adata, out_path: str | os.PathLike) -> None:
    """Store each library's absolute ``image_path`` relative to ``out_path``'s folder when the
    image lies beside or below it, else relative to ``$STIMAGE_IMAGE_ROOT`` (``--image-root``)
    when set and the image lies below it (``metadata["image_base"] = "image_root"``); other
    paths stay absolute. POSIX separators, so the file moves between systems. In place."""
    folder = Path(out_path).resolve().parent
    root = image_root()
    for entry in _libraries(adata).values():
        meta = _meta(entry)
        p = meta.get(keys.IMAGE_PATH)
        if not p or not Path(str(p)).is_absolute():
            continue
        p = Path(str(p)).resolve()
        for base, tag in ((folder, IMAGE_BASE_FILE), (root.resolve() if root else None, IMAGE_BASE_ROOT)):
            if base is not None and _is_below(p, base):
                meta[keys.IMAGE_PATH] = PurePosixPath(*p.relative_to(base).parts).as_posix()
                meta[IMAGE_BASE] = tag
                break


def resolve_image_paths(adata, source: str | os.PathLike) -> None:
    """Undo :func:`portable_paths` after reading ``source``: a relative ``image_path`` is joined
    to ``$STIMAGE_IMAGE_ROOT`` when set, else to ``source``'s folder (a path stored relative to
    an image root stays relative without one, so tiling asks for ``--image-root``); an
    absolute one that no longer exists is looked up by name under ``$STIMAGE_IMAGE_ROOT``.
    In place. A reference that still names no file is left as is: tiling then says the
    image is missing and how to re-point it."""
    root = image_root()
    folder = Path(source).resolve().parent
    for entry in _libraries(adata).values():
        meta = _meta(entry)
        p = meta.get(keys.IMAGE_PATH)
        if not p:
            continue
        p = Path(str(p))
        if not p.is_absolute():
            base = root if root is not None else (folder if meta.get(IMAGE_BASE) != IMAGE_BASE_ROOT else None)
            if base is not None:
                meta[keys.IMAGE_PATH] = str((base / p).resolve())
                meta.pop(IMAGE_BASE, None)
        elif root is not None and not p.is_file():
            for cand in (root / p.name, root / p.parent.name / p.name):
                if cand.is_file():
                    meta[keys.IMAGE_PATH] = str(cand.resolve())
                    break


@contextlib.contextmanager
def scverse_ready(adata, out_path: str | os.PathLike) -> Iterator:
    """``with scverse_ready(adata, out) as obj: obj.write_h5ad(...)``: ``obj`` has the images
    and scale factors added and portable image paths; afterwards ``adata.uns`` is exactly what
    it was (the caller's object is not changed by writing it; a view is copied, not turned
    into an actual AnnData)."""
    if not _libraries(adata):
        yield adata
        return
    if getattr(adata, "is_view", False):
        adata = adata.copy()
    saved = adata.uns[keys.SPATIAL_UNS]
    work = {}
    for lib, entry in saved.items():  # copy the small dicts, share the (read-only) arrays
        if isinstance(entry, dict):
            e = {k: (copy.deepcopy(v) if k != keys.IMAGES else dict(v) if isinstance(v, dict) else v)
                 for k, v in entry.items()}
        else:
            e = entry
        work[lib] = e
    adata.uns[keys.SPATIAL_UNS] = work
    try:
        add_images(adata)
        portable_paths(adata, out_path)
        yield adata
    finally:
        adata.uns[keys.SPATIAL_UNS] = saved
