"""10x Xenium output bundle → cells with types on the H&E, and Visium-like pseudo-spots.

The paper labels the nuclei its HoVer-Net-style cell network learns from with Xenium cell
types. This reader takes what that needs from a Xenium Onboard Analysis folder, in 10x's
documented formats:

- ``experiment.xenium`` (JSON): ``pixel_size`` — µm per pixel of the morphology image;
  cell coordinates are in µm of that image's frame (pixel = µm / pixel_size).
- ``cells.csv.gz`` (or ``cells.parquet``, which needs pyarrow): ``cell_id``,
  ``x_centroid``, ``y_centroid`` (µm), and the area/count columns kept as they are.
- ``cell_feature_matrix.h5``: the cell × feature matrix in the Space Ranger v3 HDF5
  layout (read by :func:`~data_pipelines.slides.visium.read_10x_h5`; only "Gene Expression"
  features are kept, the negative-control probes and codewords are not genes).
- the DAPI morphology image: ``morphology_focus.ome.tif`` (XOA 1.x),
  ``morphology_focus/morphology_focus_0000.ome.tif`` (XOA 2+) or ``morphology_mip.ome.tif``;
  the pyramid level nearest the registration resolution is read, never the full image.

Steps (each a pure function, tested on its own):

1. **Cell types** (:func:`score_cell_types`): counts normalised to the median library
   size, ``log1p``, each gene z-scored over cells; a class's score is the mean z of its
   panel markers present in the data; a cell takes the best class when that score is above
   ``min_score`` and it has at least ``min_counts`` transcripts, else it stays unknown.
   The default panel (:data:`DEFAULT_MARKERS`) names markers of the paper's four classes
   that are on 10x's human breast and multi-tissue panels; ``--markers FILE`` (JSON
   ``{"immune": ["PTPRC", ...], ...}``) replaces it.
2. **Registration** (:func:`register_dapi_to_he`): the DAPI and the H&E's haematoxylin
   channel (``nuclear_grey``) are both resampled to one working resolution (µm per px from
   the two pixel sizes, so SIFT sees nuclei at one scale) and matched with the project's
   SIFT/RANSAC ``register_affine``; the result is composed into one 2×3 matrix from Xenium
   µm to H&E full-resolution pixels.
3. **Outputs** (:func:`read_xenium`): an AnnData of cells (``obsm["spatial"]`` in H&E
   pixels, ``obsm["spatial_um"]`` in Xenium µm, ``obs["cell_type"]``) and
   :func:`type_table`, the ``x, y, type`` CSV that ``stimage cells train`` reads beside the
   H&E tile; :func:`pseudo_spots` sums cells into 55 µm spots on Visium's hexagonal
   100 µm grid (HEST's recipe for Xenium) as a spot AnnData the spot model trains on.

Hand-written rather than ``spatialdata_io.xenium``: that reader needs the whole bundle
(transcripts, boundaries, all images) and the ``scverse`` extra, while training labels need
three small files and one image level; the matrix reader is the project's Visium one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.cell_patches import CELL_TYPES, nuclear_grey, register_affine, warp_points
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import DROPPED, IMAGE_SCALE, LIBRARY_ID, PLATFORM, library_metadata
from data_pipelines.slides.visium import read_10x_h5

__all__ = ["DEFAULT_MARKERS", "XeniumBundle", "find_bundle", "read_markers", "score_cell_types",
           "register_dapi_to_he", "read_xenium", "type_table", "pseudo_spots", "hex_grid",
           "VISIUM_SPOT_UM", "VISIUM_PITCH_UM", "CELL_TYPE"]

CELL_TYPE = "cell_type"               # obs: one of CELL_TYPES[1:] or "unknown"
SPATIAL_UM = "spatial_um"             # obsm: Xenium µm (x, y)
UNKNOWN = "unknown"
VISIUM_SPOT_UM = 55.0                 # Visium spot diameter
VISIUM_PITCH_UM = 100.0               # Visium centre-to-centre distance
# Markers of the paper's four classes on 10x's human breast / multi-tissue Xenium panels.
DEFAULT_MARKERS: dict[str, tuple[str, ...]] = {
    "immune": ("PTPRC", "CD3E", "CD3D", "CD2", "CD4", "CD8A", "CD68", "CD163", "CD14", "MS4A1", "CD79A",
               "CD19", "LYZ", "ITGAX", "IL7R", "CD247", "FCGR3A"),
    "stromal": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "PDGFRB", "FAP", "POSTN", "SFRP4",
                "MMP2", "ACTA2", "MYH11"),
    "cancer_epithelial": ("EPCAM", "KRT8", "KRT18", "KRT19", "KRT7", "CDH1", "ERBB2", "ESR1", "FOXA1",
                          "GATA3", "CEACAM6", "ELF3", "TACSTD2", "MUC1"),
    "endothelial": ("PECAM1", "VWF", "CDH5", "CLDN5", "KDR", "EMCN", "AQP1", "PLVAP", "TIE1"),
}
_DAPI_NAMES = ("morphology_focus.ome.tif", "morphology_focus/morphology_focus_0000.ome.tif",
               "morphology_mip.ome.tif", "morphology.ome.tif")
_CELL_TABLES = ("cells.csv.gz", "cells.csv", "cells.parquet")


@dataclasses.dataclass(frozen=True)
class XeniumBundle:
    """The files of one Xenium output folder that the reader uses."""

    root: Path
    pixel_size_um: float
    cells: Path
    matrix: Path
    dapi: Path
    experiment: dict


def find_bundle(root: str | os.PathLike) -> XeniumBundle:
    """Locate and check the needed files; one StimageError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise StimageError(f"Xenium folder {root} not found")
    exp_path = root / "experiment.xenium"
    if not exp_path.is_file():
        raise StimageError(f"{root} is not a Xenium output folder (no experiment.xenium)")
    try:
        exp = json.loads(exp_path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise StimageError(f"{exp_path} is not valid JSON ({type(e).__name__})") from None
    try:
        px = float(exp["pixel_size"])
    except (KeyError, TypeError, ValueError):
        raise StimageError(f"{exp_path} lacks a numeric pixel_size (µm per morphology pixel)") from None
    if not (np.isfinite(px) and 0 < px < 100):
        raise StimageError(f"{exp_path}: pixel_size {px} µm is not a plausible pixel size")
    cells = next((root / n for n in _CELL_TABLES if (root / n).is_file()), None)
    if cells is None:
        raise StimageError(f"{root} has no cell table ({' or '.join(_CELL_TABLES)})")
    matrix = root / "cell_feature_matrix.h5"
    if not matrix.is_file():
        raise StimageError(f"{root} has no cell_feature_matrix.h5")
    dapi = next((root / n for n in _DAPI_NAMES if (root / n).is_file()), None)
    if dapi is None:
        raise StimageError(f"{root} has no DAPI morphology image ({', '.join(_DAPI_NAMES)})")
    return XeniumBundle(root, px, cells, matrix, dapi, exp)


def _read_cells(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            try:
                df = pd.read_parquet(path)
            except ImportError:
                raise StimageError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                                   "or give the bundle's cells.csv.gz") from None
        else:
            df = pd.read_csv(path)
    except StimageError:
        raise
    except Exception as e:  # pandas raises many types on a damaged file
        raise StimageError(f"cell table {path} is not readable ({type(e).__name__})") from None
    missing = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in df.columns]
    if missing:
        raise StimageError(f"cell table {path} lacks column(s) {', '.join(missing)}")
    df["cell_id"] = df["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    for c in ("x_centroid", "y_centroid"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    if not np.isfinite(df[["x_centroid", "y_centroid"]].to_numpy(np.float64)).all():
        raise StimageError(f"cell table {path}: x_centroid/y_centroid must be finite numbers (µm)")
    if df["cell_id"].duplicated().any():
        raise StimageError(f"cell table {path}: cell_id {df['cell_id'][df['cell_id'].duplicated()].iloc[0]} "
                           "appears twice")
    return df.set_index("cell_id")


def read_markers(path: str | os.PathLike | None) -> dict[str, tuple[str, ...]]:
    """The marker panel: :data:`DEFAULT_MARKERS`, or a JSON file ``{class: [genes]}``.

    Class names must be among the cell network's classes (``CELL_TYPES[1:]``)."""
    if path is None:
        return dict(DEFAULT_MARKERS)
    path = Path(path)
    try:
        panel = json.loads(path.read_text())
    except FileNotFoundError:
        raise StimageError(f"marker file {path} not found") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise StimageError(f"marker file {path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(panel, dict) or not panel:
        raise StimageError(f"marker file {path} must be a JSON object {{class: [genes]}}")
    out = {}
    for cls, genes in panel.items():
        if cls not in CELL_TYPES[1:]:
            raise StimageError(f"marker file {path}: class {cls!r} is not one of {', '.join(CELL_TYPES[1:])}")
        if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
            raise StimageError(f"marker file {path}: {cls!r} needs a non-empty list of gene names")
        out[cls] = tuple(genes)
    return out


def score_cell_types(counts, genes: Sequence[str], markers: Mapping[str, Sequence[str]], *,
                     min_counts: int = 10, min_score: float = 0.0) -> tuple[np.ndarray, pd.DataFrame]:
    """Marker-panel scoring → (types (n_cells,) object array, scores DataFrame n_cells × classes).

    counts: (n_cells, n_genes) counts (dense or sparse). See the module docstring for the
    recipe. Classes with no marker in ``genes`` score −inf (never chosen); if no class has
    one, StimageError (the panel does not fit the data).
    """
    x = sp.csr_matrix(counts, dtype=np.float64)
    n = x.shape[0]
    lib = np.asarray(x.sum(1)).ravel()
    target = float(np.median(lib[lib > 0])) if (lib > 0).any() else 1.0
    norm = sp.diags(np.where(lib > 0, target / np.maximum(lib, 1e-12), 0.0)) @ x
    logx = np.log1p(norm.toarray())
    sd = logx.std(0)
    z = (logx - logx.mean(0)) / np.where(sd > 0, sd, 1.0)
    index = {g: i for i, g in enumerate(genes)}
    scores, used = {}, {}
    for cls, panel in markers.items():
        cols = [index[g] for g in panel if g in index]
        used[cls] = len(cols)
        scores[cls] = z[:, cols].mean(1) if cols else np.full(n, -np.inf)
    if not any(used.values()):
        raise StimageError("no marker gene of the panel is in the data "
                           f"(panel classes: {', '.join(markers)}); give --markers FILE for this panel")
    table = pd.DataFrame(scores)
    best = table.to_numpy().argmax(1)
    top = table.to_numpy()[np.arange(n), best]
    types = np.asarray(table.columns, dtype=object)[best]
    types[(top <= min_score) | (lib < min_counts)] = UNKNOWN
    return types, table


def _dapi_level(path: Path, pixel_size: float, work_mpp: float) -> tuple[np.ndarray, float]:
    """The coarsest pyramid level of the DAPI that is still at least as fine as work_mpp,
    as a 2-D array, and its µm per px."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            levels = list(series.levels) if getattr(series, "levels", None) else [series]
            full_w = levels[0].shape[-1]
            pick = levels[0]
            for lv in levels:
                if pixel_size * full_w / lv.shape[-1] <= work_mpp * 1.001:
                    pick = lv
            arr = pick.asarray()
            mpp = pixel_size * full_w / pick.shape[-1]
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as e:
        raise StimageError(f"DAPI image {path} is not a readable TIFF ({type(e).__name__})") from None
    arr = np.asarray(arr)
    while arr.ndim > 2:  # (z|c, y, x): DAPI is the first channel / plane
        arr = arr[0]
    return arr, mpp


def register_dapi_to_he(dapi: np.ndarray, dapi_mpp: float, he_grey: np.ndarray, he_grey_mpp: float,
                        he_mpp: float, *, max_side: int = 2000) -> tuple[np.ndarray, dict]:
    """2×3 matrix from Xenium µm (x, y) to H&E full-resolution pixels, and a report.

    dapi (H, W) any dtype at ``dapi_mpp`` µm/px (its px (0, 0) = Xenium µm (0, 0));
    he_grey (h, w) uint8 haematoxylin image at ``he_grey_mpp`` µm/px; he_mpp the H&E's
    full-resolution µm/px. Both are resampled to one working µm/px (the coarser of the two,
    capped so the larger side is at most ``max_side``) before SIFT.
    """
    extent = max(dapi.shape[0] * dapi_mpp, dapi.shape[1] * dapi_mpp, he_grey.shape[0] * he_grey_mpp,
                 he_grey.shape[1] * he_grey_mpp)
    work = max(dapi_mpp, he_grey_mpp, extent / max_side)

    def resample(img, mpp):
        f = mpp / work
        size = (max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f)))
        return cv2.resize(img, size, interpolation=cv2.INTER_AREA) if f < 1 else img

    d = resample(np.asarray(dapi, np.float32), dapi_mpp)
    h = resample(np.asarray(he_grey), he_grey_mpp)
    m = register_affine(d, h)  # DAPI-work px → H&E-work px
    # µm → DAPI-work px (÷ work) → H&E-work px (m) → H&E full px (× work / he_mpp).
    a = np.vstack([m, [0.0, 0.0, 1.0]])
    um_to_work = np.diag([1 / work, 1 / work, 1.0])
    work_to_full = np.diag([work / he_mpp, work / he_mpp, 1.0])
    full = (work_to_full @ a @ um_to_work)[:2]
    scale = float(np.sqrt(abs(np.linalg.det(full[:, :2]))))
    return full, {"work_mpp": work, "scale_px_per_um": scale, "rotation_deg":
                  float(np.degrees(np.arctan2(full[1, 0], full[0, 0])))}


def read_xenium(root: str | os.PathLike, he: str | os.PathLike, *, he_mpp: float | None = None,
                markers: Mapping[str, Sequence[str]] | None = None, min_counts: int = 10,
                sample_id: str | None = None, progress=None) -> ad.AnnData:
    """A Xenium folder + its H&E → AnnData of cells (see the module docstring).

    ``obsm["spatial"]`` (n, 2) H&E full-resolution px; cells whose centroid falls outside
    the H&E are kept with ``obs["in_he"] = False``. ``uns["stimage"]["xenium"]`` records
    the pixel size, the µm → H&E matrix and the marker panel.
    """
    from data_pipelines.wsi import open_slide

    bundle = find_bundle(root)
    say = progress or (lambda msg: None)
    say(f"reading cells and matrix of {bundle.root}")
    cells = _read_cells(bundle.cells)
    mat = read_10x_h5(bundle.matrix)
    common = mat.obs_names[mat.obs_names.isin(cells.index)]
    if len(common) == 0:
        raise StimageError(f"no cell of {bundle.matrix.name} is in {bundle.cells.name} (different runs?)")
    adata = mat[common].copy()
    cells = cells.loc[common]
    panel = dict(markers or DEFAULT_MARKERS)
    types, scores = score_cell_types(adata.X, list(adata.var_names), panel, min_counts=min_counts)
    slide = open_slide(he, mpp=he_mpp)
    say("registering DAPI to the H&E")
    thumb, scale = slide.thumbnail(2000)
    dapi, dapi_mpp = _dapi_level(bundle.dapi, bundle.pixel_size_um,
                                 max(slide.mpp / scale, bundle.pixel_size_um))
    matrix, report = register_dapi_to_he(dapi, dapi_mpp, nuclear_grey(thumb), slide.mpp / scale, slide.mpp)
    um = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    xy = warp_points(matrix, um)
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < slide.width) & (xy[:, 1] < slide.height)
    if not inside.any():
        raise StimageError(f"no Xenium cell maps inside the {slide.width}x{slide.height} H&E {slide.path} "
                           "(registration failed, or another section?)")
    sample = sample_id or str(bundle.experiment.get("run_name") or bundle.root.name)
    adata.obs_names = [f"{sample}_{c}" for c in adata.obs_names]
    for c in cells.columns:
        if c not in ("x_centroid", "y_centroid") and pd.api.types.is_numeric_dtype(cells[c]):
            adata.obs[c] = cells[c].to_numpy()
    adata.obs[keys.SAMPLE] = pd.Categorical([sample] * adata.n_obs)
    adata.obs[CELL_TYPE] = pd.Categorical(types, categories=[*CELL_TYPES[1:], UNKNOWN])
    adata.obs["in_he"] = inside
    for cls in scores.columns:
        adata.obs[f"score_{cls}"] = scores[cls].to_numpy()
    adata.obsm[keys.SPATIAL] = xy
    adata.obsm[SPATIAL_UM] = um
    adata.uns[keys.SPATIAL_UNS] = {sample: {"scalefactors": {"tissue_hires_scalef": 1.0,
                                                             keys.SPOT_DIAMETER_FULLRES: 10.0 / slide.mpp},
                                            "metadata": library_metadata(str(Path(he).resolve()), slide.mpp, 10.0,
                                                                         1.0, str(bundle.root.resolve()))}}
    adata.uns[keys.STIMAGE_UNS] = {
        keys.MPP: slide.mpp, PLATFORM: "xenium", LIBRARY_ID: sample,
        "xenium": {"pixel_size_um": bundle.pixel_size_um, "um_to_he_px": matrix.tolist(), **report,
                   "markers": {k: list(v) for k, v in panel.items()}, "min_counts": int(min_counts),
                   "cells_outside_he": int((~inside).sum())}}
    return adata


def type_table(cells: ad.AnnData) -> pd.DataFrame:
    """``x, y, type`` (H&E px, class name) of the typed cells inside the H&E: the table
    ``stimage cells train`` reads as ``<image stem>_types.csv``."""
    keep = cells.obs["in_he"].to_numpy(bool) & (cells.obs[CELL_TYPE].astype(str) != UNKNOWN).to_numpy()
    xy = np.asarray(cells.obsm[keys.SPATIAL])[keep]
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "type": cells.obs[CELL_TYPE].astype(str).to_numpy()[keep]})


def hex_grid(width_um: float, height_um: float, pitch_um: float = VISIUM_PITCH_UM) -> tuple[np.ndarray, np.ndarray]:
    """Visium-like hexagonal grid over [0, width) × [0, height) µm → (centres (n, 2) µm,
    (array_row, array_col) (n, 2) int with Visium's doubled-column convention)."""
    dy = pitch_um * np.sqrt(3) / 2
    rows = int(np.floor(height_um / dy)) + 1
    cols = int(np.floor(width_um / pitch_um)) + 1
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x = c * pitch_um + (r % 2) * pitch_um / 2
    y = r * dy
    centres = np.stack([x.ravel(), y.ravel()], 1)
    grid = np.stack([r.ravel(), (2 * c + r % 2).ravel()], 1)
    ok = (centres[:, 0] < width_um) & (centres[:, 1] < height_um)
    return centres[ok], grid[ok]


def pseudo_spots(cells: ad.AnnData, *, spot_um: float = VISIUM_SPOT_UM, pitch_um: float | None = None,
                 he_path: str | os.PathLike | None = None, min_cells: int = 1) -> ad.AnnData:
    """Sum cells into spots of diameter ``spot_um`` on a hexagonal grid (pitch
    ``spot_um · 100/55`` unless given: Visium's geometry scaled) in Xenium µm; a cell
    belongs to the spot whose disc holds its centroid. Spots with fewer than ``min_cells``
    cells are dropped. Returns a spot AnnData with the keys of :func:`read_visium` (H&E
    pixels in ``obsm["spatial"]``), ready for ``stimage train``.
    """
    if not (np.isfinite(spot_um) and spot_um > 0):
        raise StimageError(f"--pseudo-spots needs a positive spot diameter in µm, got {spot_um}")
    pitch = float(pitch_um or spot_um * VISIUM_PITCH_UM / VISIUM_SPOT_UM)
    st = cells.uns[keys.STIMAGE_UNS]
    matrix = np.asarray(st["xenium"]["um_to_he_px"], np.float64)
    um = np.asarray(cells.obsm[SPATIAL_UM], np.float64)
    origin = um.min(0) - spot_um
    extent = um.max(0) - origin + spot_um
    centres, grid = hex_grid(float(extent[0]), float(extent[1]), pitch)
    centres = centres + origin
    # Nearest centre, then keep the cell only if it lies within the spot's radius.
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(centres).query(um)
    member = dist <= spot_um / 2
    assign = sp.csr_matrix((np.ones(int(member.sum())), (idx[member], np.flatnonzero(member))),
                           shape=(len(centres), cells.n_obs))
    n_cells = np.asarray(assign.sum(1)).ravel()
    keep = n_cells >= max(1, min_cells)
    if not keep.any():
        raise StimageError(f"no pseudo-spot of {spot_um} µm holds a cell")
    x = (assign[keep] @ sp.csr_matrix(cells.X)).astype(np.int32).tocsr()
    lib = str(st[LIBRARY_ID])
    names = [f"{lib}_spot{r}x{c}" for r, c in grid[keep]]
    out = ad.AnnData(X=x, obs=pd.DataFrame(index=names), var=cells.var.copy())
    out.obs[keys.SAMPLE] = pd.Categorical([lib] * out.n_obs)
    out.obs[keys.ARRAY_ROW] = grid[keep, 0].astype(np.int64)
    out.obs[keys.ARRAY_COL] = grid[keep, 1].astype(np.int64)
    out.obs["n_cells"] = n_cells[keep].astype(np.int64)
    out.obsm[keys.SPATIAL] = warp_points(matrix, centres[keep])
    he_mpp = float(st[keys.MPP])
    meta = cells.uns[keys.SPATIAL_UNS][lib]["metadata"]
    image = str(Path(he_path).resolve()) if he_path is not None else meta[keys.IMAGE_PATH]
    out.uns[keys.SPATIAL_UNS] = {lib: {
        "scalefactors": {"tissue_hires_scalef": 1.0, keys.SPOT_DIAMETER_FULLRES: spot_um / he_mpp},
        "metadata": library_metadata(image, he_mpp, spot_um, 1.0, meta.get("source", ""))}}
    out.uns[keys.STIMAGE_UNS] = {keys.MPP: he_mpp, keys.SPOT_DIAMETER_UM: float(spot_um), PLATFORM: "xenium_pseudo",
                                 LIBRARY_ID: lib, IMAGE_SCALE: 1.0,
                                 DROPPED: {"cells_outside_spots": int((~member).sum())},
                                 "pseudo_spots": {"spot_um": float(spot_um), "pitch_um": pitch}}
    return out
