"""MoNuSeg 2018 nucleus annotations: Aperio ImageScope XML polygons → instance maps.

Layout (``shared/data/monuseg``): ``train/`` and ``test/`` each hold ``<name>.png`` (a
lossless copy of the 1000×1000 40× H&E tile) and ``<name>.xml``, one ``<Region>`` per
nucleus whose ``<Vertex X= Y=>`` children are the outline in image pixels (X = column,
Y = row). The root's ``MicronsPerPixel`` (≈ 0.25) is the tile's resolution; one tile has
none.

Rasterisation: each polygon's vertices are rounded to the nearest pixel and filled with
``cv2.fillPoly`` (outline pixels included), instance id ``k`` for the k-th Region in file
order (1-based), so an id always names the same Region. Annotators' polygons sometimes
overlap; the later Region wins the shared pixels, and a Region wholly covered by later
ones is absent from the map (ids need not be contiguous: metrics relabel). Regions with
fewer than three vertices (two in the 20 tiles) are filled as the segment or point
``fillPoly`` draws. Vertices may lie a few pixels outside the tile (annotators clicked
past the border, up to 3 px in MoNuSeg); they are clipped.

NumPy/OpenCV only (no JAX), like the rest of ``data_pipelines``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from data_pipelines.errors import StimageError
from data_pipelines.tiles import load_image

__all__ = ["read_monuseg_xml", "read_monuseg_polygons", "monuseg_mpp", "list_monuseg", "load_monuseg_pair"]

# Vertices further outside the (H, W) frame than this mean the XML belongs to a larger
# image (or the shape is wrong), not an annotator's click past the border (≤ 3 px seen).
_OUTSIDE_TOLERANCE_PX = 16.0


def _parse(path: str | os.PathLike) -> ET.Element:
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"annotation {path} not found")
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StimageError(f"annotation {path} is not readable XML ({msg})") from None


def read_monuseg_polygons(path: str | os.PathLike) -> list[np.ndarray]:
    """Every Region's outline, in file order: a list of (V, 2) float64 arrays of (x, y) px."""
    root = _parse(path)
    polys = []
    for i, region in enumerate(root.iter("Region")):
        try:
            xy = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
        except (KeyError, ValueError):
            raise StimageError(f"annotation {path}: Region {i + 1} has a Vertex without numeric X and Y") from None
        if not xy:
            raise StimageError(f"annotation {path}: Region {i + 1} has no Vertex")
        if not np.all(np.isfinite(xy)):
            raise StimageError(f"annotation {path}: Region {i + 1} has a Vertex that is not a finite number")
        polys.append(np.asarray(xy, np.float64).reshape(-1, 2))
    if not polys:
        raise StimageError(f"annotation {path} holds no <Region> polygons (not a MoNuSeg/ImageScope XML?)")
    return polys


def read_monuseg_xml(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) int32 instance map of the XML's polygons; 0 = background, k = k-th Region.

    ``shape`` is the image's (H, W) or (H, W, C). Overlapping pixels go to the later Region
    (file order); see the module docstring. A polygon lying more than a few pixels outside
    the frame means the annotation does not belong to an image of this size: StimageError.
    """
    if len(shape) < 2 or int(shape[0]) <= 0 or int(shape[1]) <= 0:
        raise StimageError(f"annotation {path}: image shape {tuple(shape)} is not (H, W[, C]) with H, W > 0")
    h, w = int(shape[0]), int(shape[1])
    polys = read_monuseg_polygons(path)
    hi = np.max([p.max(0) for p in polys], axis=0)
    lo = np.min([p.min(0) for p in polys], axis=0)
    if (hi[0] > w + _OUTSIDE_TOLERANCE_PX or hi[1] > h + _OUTSIDE_TOLERANCE_PX
            or lo.min() < -_OUTSIDE_TOLERANCE_PX):
        raise StimageError(f"annotation {path} spans x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f} px: "
                           f"does not fit the {w}×{h} image (wrong image or shape?)")
    if len(polys) >= np.iinfo(np.int32).max:
        raise StimageError(f"annotation {path} has too many Regions ({len(polys)}) for an int32 map")
    # fillPoly needs int32 points; colour is a Python int so ids above 2**24 stay exact in CV_32S.
    out = np.zeros((h, w), np.int32)
    for k, p in enumerate(polys, start=1):
        cv2.fillPoly(out, [np.round(p).astype(np.int32)], color=int(k))
    return out


def monuseg_mpp(path: str | os.PathLike) -> float | None:
    """The XML root's ``MicronsPerPixel`` (µm per px), or None when absent or not a positive number."""
    value = _parse(path).attrib.get("MicronsPerPixel")
    try:
        mpp = float(value) if value is not None else None
    except ValueError:
        return None
    return mpp if mpp is not None and np.isfinite(mpp) and mpp > 0 else None


def list_monuseg(root: str | os.PathLike, split: Literal["train", "test"]) -> list[tuple[Path, Path]]:
    """Sorted (image, xml) pairs of ``root/split``; an image without its XML is an error.

    ``root`` is the ``monuseg`` folder (holding ``train/`` and ``test/``). Images are the
    ``.png`` copies, or ``.tif``/``.tiff`` originals when no PNG of that name exists.
    """
    folder = Path(root) / split
    if split not in ("train", "test"):
        raise StimageError(f"MoNuSeg split {split!r} unknown (use train or test)")
    if not folder.is_dir():
        raise StimageError(f"MoNuSeg folder {folder} not found")
    images: dict[str, Path] = {}
    for ext in (".tiff", ".tif", ".png"):  # later extensions win: prefer the PNG copy
        for p in folder.glob(f"*{ext}"):
            images[p.stem] = p
    if not images:
        raise StimageError(f"MoNuSeg folder {folder} holds no .png/.tif images")
    pairs = []
    for stem in sorted(images):
        xml = folder / f"{stem}.xml"
        if not xml.is_file():
            raise StimageError(f"MoNuSeg image {images[stem]} has no annotation {xml.name}")
        pairs.append((images[stem], xml))
    return pairs


def load_monuseg_pair(image: str | os.PathLike, xml: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (H, W, 3) uint8, instances (H, W) int32) of one tile; the map takes the image's size."""
    rgb = load_image(image)
    return rgb, read_monuseg_xml(xml, rgb.shape)
