"""Training data for nucleus segmentation/classification (HoVer-Net): tiles → patches → targets.

- **Folders** (``list_cell_tiles``): images (``.png``/``.tif``/``.tiff``/``.jpg``) each with
  an annotation of the same stem — a MoNuSeg/ImageScope ``<stem>.xml``, or an instance map
  ``<stem>_instances.png`` (8/16-bit grey) / ``<stem>_instances.npy`` — and optionally a
  cell-type table ``<stem>_types.csv``. The ``monuseg/train`` and ``monuseg/test`` folders
  of the shared data are such folders.
- **Cell types** (``read_type_table``, ``assign_types``): a CSV of centroids ``x, y, type``
  (pixels of the image, x = column; ``type`` a class id or a name of ``class_names``) is
  mapped onto the instance containing each centroid (the majority when several land in one
  nucleus). Nuclei no centroid lands in have type −1 (unknown; left out of the type loss),
  so a partial table is fine. Centroids outside the image are an error; centroids on
  background pixels are counted and ignored. Coordinates from another image (e.g. Xenium
  cells on the DAPI image) are mapped first with the 2×3 ``matrix`` of ``register_affine``.
- **Patches** (``extract_patches``): ``size``² windows on a grid of ``stride`` (the last
  window flush with the far edge, so the whole tile is covered; tiles smaller than a patch
  are padded white with no nuclei); patches holding fewer than ``min_nuclei`` instances
  are dropped.
- **Targets** (``hv_targets``, ``patch_targets``): NP = instance > 0; HV as HoVer-Net's
  ``gen_targets``: per instance, each pixel's x and y offset from the instance's centre of
  mass, negative offsets divided by the largest negative one and positive by the largest
  positive one (so each nucleus spans [−1, 1] on both axes); background 0. Departures from
  HoVer-Net's code: the exact centre of mass (it rounds to a pixel and then, through a
  1-based ``arange``, shifts the grid by one pixel), and no removal of nuclei < 30 px.
- **Augmentation** (``augment_pairs``): the 8 dihedral transforms (rot90 × flips) applied
  identically to image, instances and types — exact pixel permutations, so labels stay
  valid — then an optional photometric ``hook`` on the images only (the training loop
  passes JAX's ``data_pipelines.augmentation.augment`` with geometry off). Targets are
  computed after the geometry, from the transformed instance map.
- **Registration** (``register_affine``): SIFT keypoints, brute-force matching with
  Lowe's ratio test, RANSAC affine fit (``cv2.estimateAffinePartial2D`` — rotation,
  uniform scale, translation — or ``cv2.estimateAffine2D``); ``nuclear_grey`` turns H&E
  into a DAPI-like image (haematoxylin density, nuclei bright) so DAPI → H&E works.

NumPy/SciPy/OpenCV only (no JAX), like the rest of ``data_pipelines``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from data_pipelines.errors import StimageError
from data_pipelines.monuseg import read_monuseg_xml
from data_pipelines.tiles import load_image

__all__ = ["CELL_TYPES", "CellTileFiles", "CellTile", "CellPatches", "list_cell_tiles", "load_cell_tile",
           "read_instances", "write_instances", "read_type_table", "TypeAssignment", "assign_types",
           "extract_patches", "hv_targets", "patch_targets", "dihedral", "augment_pairs", "nuclear_grey",
           "register_affine", "warp_points"]

# Type classes of the TC branch (index = class id); 0 is background.
CELL_TYPES: tuple[str, ...] = ("background", "immune", "stromal", "cancer_epithelial", "endothelial")
IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
# Files a folder may hold beside the images that are not images to segment (outputs of
# ``stimage cells predict`` and annotations).
_DERIVED = ("_instances", "_entropy", "_types", "_overlay")


# --- files -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CellTileFiles:
    image: Path
    annotation: Path            # .xml polygons or an instance map (.png/.tif/.npy)
    types: Path | None = None   # x, y, type CSV


@dataclasses.dataclass
class CellTile:
    name: str
    rgb: np.ndarray                 # (H, W, 3) uint8
    instances: np.ndarray           # (H, W) int32, 0 = background
    types: np.ndarray | None        # (H, W) int16 class per pixel, −1 unknown; None without a table


def list_cell_tiles(folder: str | os.PathLike) -> list[CellTileFiles]:
    """Sorted tiles of ``folder`` with their annotations (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StimageError(f"cell data folder {folder} not found")
    images: dict[str, Path] = {}
    for ext in IMAGE_EXTS[::-1]:  # earlier extensions win: prefer the lossless PNG copy
        for p in folder.glob(f"*{ext}"):
            if not p.stem.endswith(_DERIVED):
                images[p.stem] = p
    if not images:
        raise StimageError(f"cell data folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
    out = []
    for stem in sorted(images):
        cands = [folder / f"{stem}.xml", folder / f"{stem}_instances.npy", folder / f"{stem}_instances.png",
                 folder / f"{stem}_instances.tif"]
        ann = next((c for c in cands if c.is_file()), None)
        if ann is None:
            raise StimageError(f"image {images[stem]} has no annotation ({stem}.xml or {stem}_instances.png/.npy)")
        types = folder / f"{stem}_types.csv"
        out.append(CellTileFiles(images[stem], ann, types if types.is_file() else None))
    return out


def read_instances(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """(H, W) int32 instance map from ``.xml`` polygons (needs ``shape``), ``.npy``, or a grey image.

    ``shape`` (H, W[, C]), when given, must match the map (one-line error otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"instance map {path} not found")
    if path.suffix.lower() == ".xml":
        if shape is None:
            raise StimageError(f"{path}: XML polygons need the image size to be rasterised")
        return read_monuseg_xml(path, shape)
    if path.suffix.lower() == ".npy":
        try:
            lab = np.load(path, allow_pickle=False)
        except Exception as e:
            raise StimageError(f"instance map {path} is not a readable .npy ({type(e).__name__})") from None
    else:
        from data_pipelines.io import quiet_stderr
        from data_pipelines.slides.common import image_header, max_image_pixels

        w, h, _ = image_header(path)  # refuse a header claiming more pixels than the cap before decoding
        if w * h > max_image_pixels():
            raise StimageError(f"instance map {path} claims {w}×{h} px, more than the {max_image_pixels()} px "
                               "an image may have (STIMAGE_MAX_IMAGE_PIXELS)")
        try:
            with quiet_stderr():
                lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        except cv2.error:
            lab = None
        if lab is None:
            raise StimageError(f"instance map {path} is unreadable")
    if lab.ndim != 2:
        raise StimageError(f"instance map {path} must be one channel (H, W) of ids, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer) and not (np.issubdtype(lab.dtype, np.floating)
                                                          and np.all(lab == np.round(lab))):
        raise StimageError(f"instance map {path} holds non-integer values ({lab.dtype})")
    if lab.size and lab.min() < 0:
        raise StimageError(f"instance map {path} has negative ids")
    if lab.size and lab.max() > np.iinfo(np.int32).max:  # int32 below would wrap them into other ids
        raise StimageError(f"instance map {path} has ids above {np.iinfo(np.int32).max}")
    if shape is not None and tuple(lab.shape) != tuple(shape[:2]):
        raise StimageError(f"instance map {path} is {lab.shape[1]}×{lab.shape[0]} px but the image is "
                           f"{shape[1]}×{shape[0]}")
    return lab.astype(np.int32)


def write_instances(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write an instance map: 16-bit PNG/TIFF (ids ≤ 65535) or ``.npy``."""
    path = Path(path)
    labels = np.asarray(labels)
    if path.suffix.lower() == ".npy":
        np.save(path, labels.astype(np.int32))
        return path
    if labels.size and int(labels.max()) > 65535:
        raise StimageError(f"{int(labels.max())} instances do not fit a 16-bit image; write {path.stem}.npy instead")
    if not cv2.imwrite(str(path), labels.astype(np.uint16)):
        raise StimageError(f"cannot write {path} (use .png, .tif or .npy)")
    return path


# --- cell types ---------------------------------------------------------------------------------------

def _type_id(v, class_names: Sequence[str], where: str) -> int:
    names = {n.lower(): i for i, n in enumerate(class_names)}
    if isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
        i = int(v)
        if not 0 <= i < len(class_names):
            raise StimageError(f"{where}: type {i} is outside 0..{len(class_names) - 1} ({', '.join(class_names)})")
        return i
    if isinstance(v, float):
        if not (np.isfinite(v) and v == int(v)):  # an empty cell reads as NaN
            raise StimageError(f"{where}: cell type {v!r} is not a class id or name (empty cell?)")
        return _type_id(int(v), class_names, where)
    key = str(v).strip().lower().replace(" ", "_").replace("-", "_")
    if key not in names:
        raise StimageError(f"{where}: unknown cell type {v!r}; known: {', '.join(class_names)}")
    return names[key]


def read_type_table(path: str | os.PathLike, class_names: Sequence[str] = CELL_TYPES) -> pd.DataFrame:
    """CSV with columns ``x, y, type`` → DataFrame (x, y float; type int class id).

    ``type`` holds class ids or names of ``class_names`` (case and spaces/hyphens ignored).
    """
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"cell-type table {path} not found")
    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise StimageError(f"cell-type table {path} is not a readable CSV ({type(e).__name__})") from None
    missing = [c for c in ("x", "y", "type") if c not in df.columns]
    if missing:
        raise StimageError(f"cell-type table {path} lacks column(s) {', '.join(missing)} (needs x, y, type)")
    x = pd.to_numeric(df["x"], errors="coerce").to_numpy(np.float64)
    y = pd.to_numeric(df["y"], errors="coerce").to_numpy(np.float64)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise StimageError(f"cell-type table {path}: x and y must be finite numbers")
    types = [_type_id(v, class_names, str(path)) for v in df["type"].tolist()]
    return pd.DataFrame({"x": x, "y": y, "type": np.asarray(types, np.int64)})


@dataclasses.dataclass(frozen=True)
class TypeAssignment:
    """``lut[id]`` = type of instance ``id`` (−1 unknown); counts of how centroids landed."""

    lut: np.ndarray          # (max id + 1,) int16; lut[0] = 0 (background)
    matched: int             # centroids inside a nucleus
    on_background: int       # centroids on background pixels (ignored)
    conflicts: int           # nuclei holding centroids of different types (majority kept)

    def type_map(self, instances: np.ndarray) -> np.ndarray:
        """(H, W) int16 class per pixel: 0 background, −1 unknown nucleus."""
        return self.lut[np.asarray(instances)]


def assign_types(instances: np.ndarray, table: pd.DataFrame, *, matrix: np.ndarray | None = None,
                 where: str = "cell-type table") -> TypeAssignment:
    """Map (x, y, type) centroids onto ``instances`` (H, W); see the module docstring.

    ``matrix`` (2×3) maps the table's coordinates into the image first. A centroid is in
    pixel (round(y), round(x)); one outside the image raises a one-line StimageError.
    """
    inst = np.asarray(instances)
    h, w = inst.shape
    xy = table[["x", "y"]].to_numpy(np.float64)
    if matrix is not None:
        xy = warp_points(matrix, xy)
    col, row = np.round(xy[:, 0]).astype(np.int64), np.round(xy[:, 1]).astype(np.int64)
    outside = (col < 0) | (col >= w) | (row < 0) | (row >= h)
    if outside.any():
        i = int(np.argmax(outside))
        raise StimageError(f"{where}: {int(outside.sum())} centroid(s) outside the {w}×{h} image, e.g. row {i} at "
                           f"x={xy[i, 0]:.1f}, y={xy[i, 1]:.1f}")
    types = table["type"].to_numpy(np.int64)
    ids = inst[row, col].astype(np.int64)
    inside = ids > 0
    n_types = int(types.max(initial=0)) + 1
    top = int(inst.max(initial=0))
    lut = np.full(top + 1, -1, np.int16)
    lut[0] = 0
    conflicts = 0
    if inside.any():
        votes = np.bincount(ids[inside] * n_types + types[inside], minlength=(top + 1) * n_types)
        votes = votes.reshape(top + 1, n_types)
        has = votes.sum(1) > 0
        lut[has] = votes[has].argmax(1)  # ties: the lowest class id
        conflicts = int(np.sum((votes > 0).sum(1) > 1))
    return TypeAssignment(lut=lut, matched=int(inside.sum()), on_background=int((~inside).sum()), conflicts=conflicts)


def load_cell_tile(files: CellTileFiles, class_names: Sequence[str] = CELL_TYPES) -> CellTile:
    """Read one tile, its instances and (with a table) its per-pixel types."""
    rgb = load_image(files.image)
    inst = read_instances(files.annotation, rgb.shape)
    types = None
    if files.types is not None:
        ta = assign_types(inst, read_type_table(files.types, class_names), where=str(files.types))
        types = ta.type_map(inst)
    return CellTile(files.image.stem, rgb, inst, types)


# --- patches and targets ---------------------------------------------------------------------------------

@dataclasses.dataclass
class CellPatches:
    images: np.ndarray        # (N, S, S, 3) uint8
    instances: np.ndarray     # (N, S, S) int32 (ids of the source tile)
    types: np.ndarray         # (N, S, S) int16, −1 unknown (all −1 without a type table)
    origins: np.ndarray       # (N, 2) int (row, col) of each patch in its tile
    tile: np.ndarray          # (N,) int index of the source tile

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def concat(parts: Sequence[CellPatches]) -> CellPatches:
        if not parts:
            raise StimageError("no patches to concatenate")
        return CellPatches(*(np.concatenate([getattr(p, f.name) for p in parts])
                             for f in dataclasses.fields(CellPatches)))


def _starts(n: int, size: int, stride: int) -> list[int]:
    s = list(range(0, max(n - size, 0) + 1, stride))
    if s[-1] + size < n:
        s.append(n - size)  # flush with the far edge: every pixel is in some patch
    return s


def extract_patches(rgb: np.ndarray, instances: np.ndarray, types: np.ndarray | None = None, *,
                    size: int = 256, stride: int = 256, min_nuclei: int = 2, tile_index: int = 0) -> CellPatches:
    """Grid patches of one tile (see the module docstring); shapes in :class:`CellPatches`."""
    rgb, inst = np.asarray(rgb), np.asarray(instances)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise StimageError(f"patches need an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if inst.shape != rgb.shape[:2]:
        raise StimageError(f"instance map {inst.shape[1]}×{inst.shape[0]} and image {rgb.shape[1]}×{rgb.shape[0]} "
                           "differ in size")
    if types is not None and np.shape(types) != inst.shape:
        raise StimageError(f"type map {np.shape(types)} and instance map {inst.shape} differ in shape")
    if size <= 0 or stride <= 0:
        raise StimageError(f"patch size and stride must be positive, got {size}, {stride}")
    ty = np.full(inst.shape, -1, np.int16) if types is None else np.asarray(types, np.int16)
    h, w = inst.shape
    if h < size or w < size:  # pad: white glass, no nuclei
        ph, pw = max(size - h, 0), max(size - w, 0)
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=255)
        inst = np.pad(inst, ((0, ph), (0, pw)))
        ty = np.pad(ty, ((0, ph), (0, pw)))
        h, w = inst.shape
    keep = []
    for r in _starts(h, size, stride):
        for c in _starts(w, size, stride):
            ids = np.unique(inst[r:r + size, c:c + size])
            if np.count_nonzero(ids) >= min_nuclei:
                keep.append((r, c))
    idx = np.asarray(keep, np.int64).reshape(-1, 2)
    take = lambda a: np.stack([a[r:r + size, c:c + size] for r, c in keep]) if keep else \
        np.zeros((0, size, size, *a.shape[2:]), a.dtype)  # noqa: E731
    return CellPatches(take(rgb), take(inst).astype(np.int32), take(ty).astype(np.int16), idx,
                       np.full(len(keep), tile_index, np.int64))


def hv_targets(instances: np.ndarray) -> np.ndarray:
    """(H, W) instance map → (H, W, 2) float32 HV map: channel 0 = x (columns), 1 = y (rows).

    For instance k with centre of mass (cx, cy): d = x − cx, scaled by 1/|min d| where
    d < 0 and 1/max d where d > 0 over the instance (likewise y); 0 on background and
    where d = 0.
    """
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise StimageError(f"hv_targets needs a 2-D instance map, got shape {inst.shape}")
    out = np.zeros((*inst.shape, 2), np.float32)
    lab = inst.ravel()
    fg = np.flatnonzero(lab > 0)
    if fg.size == 0:
        return out
    ids, comp = np.unique(lab[fg], return_inverse=True)
    n = len(ids)
    rows, cols = np.divmod(fg, inst.shape[1])
    area = np.bincount(comp, minlength=n).astype(np.float64)
    for ch, coord in ((0, cols), (1, rows)):
        d = coord - (np.bincount(comp, weights=coord, minlength=n) / area)[comp]
        lo = np.zeros(n)
        hi = np.zeros(n)
        np.minimum.at(lo, comp, d)
        np.maximum.at(hi, comp, d)
        # Offsets of rounding size (|d| < 1e-9) count as 0: the centre pixel itself.
        neg, pos = d < -1e-9, d > 1e-9
        v = np.zeros_like(d)
        v[neg] = d[neg] / -lo[comp[neg]]
        v[pos] = d[pos] / hi[comp[pos]]
        out.reshape(-1, 2)[fg, ch] = v
    return out


def patch_targets(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) instance maps → NP (B, H, W) uint8 {0, 1} and HV (B, H, W, 2) float32."""
    inst = np.asarray(instances)
    return (inst > 0).astype(np.uint8), np.stack([hv_targets(m) for m in inst]) if len(inst) else \
        np.zeros((*inst.shape, 2), np.float32)


def dihedral(a: np.ndarray, t: int) -> np.ndarray:
    """Dihedral transform ``t`` (0..7) of the first two axes of an (H, W, ...) array.

    Bit 2: transpose (swap rows and columns, first), bit 1: flip rows, bit 0: flip columns;
    t = 0 is the identity. The same ``t`` on an image and its label maps keeps them aligned.
    """
    if t & 4:
        a = np.swapaxes(a, 0, 1)
    if t & 2:
        a = a[::-1]
    if t & 1:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


def augment_pairs(rng: np.random.Generator, images: np.ndarray, instances: np.ndarray, types: np.ndarray, *,
                  hook: Callable[[np.ndarray], np.ndarray] | None = None, geometric: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dihedral-augment (B, S, S, 3) images with their (B, S, S) instance and type maps.

    Each patch draws one of the 8 transforms, applied to all three arrays alike; then
    ``hook(images)`` (photometric only: it must not move pixels) changes the images.
    Needs square patches.
    """
    images, instances, types = np.asarray(images), np.asarray(instances), np.asarray(types)
    if geometric:
        if images.shape[1] != images.shape[2]:
            raise StimageError(f"dihedral augmentation needs square patches, got {images.shape[1:3]}")
        ts = rng.integers(0, 8, len(images))
        images = np.stack([dihedral(x, t) for x, t in zip(images, ts)])
        instances = np.stack([dihedral(x, t) for x, t in zip(instances, ts)])
        types = np.stack([dihedral(x, t) for x, t in zip(types, ts)])
    if hook is not None:
        out = np.asarray(hook(images))
        if out.shape != images.shape:
            raise StimageError(f"augmentation hook changed the image batch shape {images.shape} → {out.shape}")
        images = out
    return images, instances, types


# --- registration ------------------------------------------------------------------------------------------

def nuclear_grey(rgb: np.ndarray) -> np.ndarray:
    """H&E (H, W, 3) uint8 → (H, W) uint8 haematoxylin density, nuclei bright (DAPI-like).

    Colour deconvolution on Ruifrok & Johnston's H, E basis (skimage's ``rgb_from_hed``),
    the H concentration scaled by its 1st–99.5th percentiles.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise StimageError(f"nuclear_grey needs an RGB image (H, W, 3), got shape {rgb.shape}")
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    basis = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    h = od.reshape(-1, 3) @ np.linalg.inv(basis)[:, 0]
    return _to_uint8(h.reshape(rgb.shape[:2]))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Any 2-D numeric image → uint8 by its 1st–99.5th percentiles (uint16 DAPI, floats)."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    x = img.astype(np.float64)
    lo, hi = np.percentile(x, [1.0, 99.5])
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.clip((x - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def register_affine(moving_grey: np.ndarray, fixed_grey: np.ndarray, *, full_affine: bool = False,
                    ratio: float = 0.75, ransac_px: float = 3.0, min_inliers: int = 6,
                    max_features: int = 5000) -> np.ndarray:
    """2×3 float64 matrix M mapping ``moving`` pixel coordinates (x, y) to ``fixed`` ones.

    Both images are 2-D (any numeric dtype: non-uint8 is scaled to uint8 by percentiles;
    for DAPI → H&E pass ``nuclear_grey(he_rgb)`` as the fixed image). SIFT keypoints,
    brute-force L2 matching with Lowe's ratio test (``ratio``), then a RANSAC fit
    (reprojection threshold ``ransac_px``): similarity (``estimateAffinePartial2D``:
    rotation, uniform scale, translation) by default, a full affine with ``full_affine``.
    Fewer than ``min_inliers`` RANSAC inliers → StimageError (the images do not match).
    ``cv2.warpAffine(moving, M, (W_fixed, H_fixed))`` then lays moving over fixed.
    """
    mov, fix = np.asarray(moving_grey), np.asarray(fixed_grey)
    if mov.ndim != 2 or fix.ndim != 2:
        raise StimageError(f"register_affine needs 2-D grey images, got shapes {mov.shape} and {fix.shape}")
    mov, fix = _to_uint8(mov), _to_uint8(fix)
    sift = cv2.SIFT_create(nfeatures=max_features)
    kp_m, des_m = sift.detectAndCompute(mov, None)
    kp_f, des_f = sift.detectAndCompute(fix, None)
    if des_m is None or des_f is None or len(kp_m) < 2 or len(kp_f) < 2:
        raise StimageError(f"registration: too few SIFT keypoints ({len(kp_m)} moving, {len(kp_f)} fixed); "
                           "the images lack texture")
    matches = cv2.BFMatcher(cv2.NORM_L2).knnMatch(des_m, des_f, k=2)
    good = [m[0] for m in matches if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    if len(good) < min_inliers:
        raise StimageError(f"registration: only {len(good)} SIFT matches pass the ratio test "
                           f"(need {min_inliers}); are these images of the same tissue?")
    src = np.float32([kp_m[m.queryIdx].pt for m in good]).reshape(-1, 1, 2)
    dst = np.float32([kp_f[m.trainIdx].pt for m in good]).reshape(-1, 1, 2)
    fit = cv2.estimateAffine2D if full_affine else cv2.estimateAffinePartial2D
    mat, inliers = fit(src, dst, method=cv2.RANSAC, ransacReprojThreshold=ransac_px, maxIters=5000,
                       confidence=0.999, refineIters=10)
    n_in = int(inliers.sum()) if inliers is not None else 0
    if mat is None or n_in < min_inliers:
        raise StimageError(f"registration: RANSAC kept {n_in} of {len(good)} matches (need {min_inliers})")
    return mat.astype(np.float64)


def warp_points(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2) points (x, y) through a 2×3 affine matrix → (N, 2)."""
    m = np.asarray(matrix, np.float64)
    if m.shape != (2, 3):
        raise StimageError(f"affine matrix must be 2×3, got shape {m.shape}")
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    return xy @ m[:, :2].T + m[:, 2]
