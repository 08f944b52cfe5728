"""Reader for the HEST-1k sample layout (Jaume et al., NeurIPS 2024; mahmoodlab/HEST).

ROOT/st/<id>.h5ad          spots × genes, raw counts in X, ``obsm["spatial"]`` = spot centres
                           in full-resolution WSI px (x, y); obs ``array_row``/``array_col``
                           (and ``pxl_col_in_fullres``/``pxl_row_in_fullres``) where the
                           technology has a grid
ROOT/wsis/<id>.tif         the H&E, pyramidal generic TIFF (BigTIFF above 4 GB)
ROOT/metadata/<id>.json    one record of HEST's metadata table: ``pixel_size_um_estimated``
                           (µm per WSI px; ``pixel_size_um_embedded`` is the scanner's own
                           value, often missing), ``spot_diameter`` and ``inter_spot_dist``
                           (µm), ``st_technology`` ("Visium", "Spatial Transcriptomics",
                           "Visium HD", "Xenium"), ``organ``, ``oncotree_code``, ``species``, ...

HEST's own ``uns["spatial"]`` (a down-scaled image under the key "ST") is replaced by
stimage's per-sample entry, so the result is tiled, trained on and plotted like any other
reader's output.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import (DROPPED, IMAGE_SCALE, LIBRARY_ID, PLATFORM, as_count_matrix, image_size,
                                          library_metadata, unique_names)

__all__ = ["read_hest", "hest_ids", "hest_paths", "HEST_MPP_KEYS", "HEST_TECH_SPOT_UM"]

# µm per px, in order of preference: HEST's estimate from the spot grid is what HEST itself
# uses to extract its 0.5 µm/px patches; the scanner's embedded value is a fallback.
HEST_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
# Nominal spot diameters (µm) when the record lacks ``spot_diameter``.
HEST_TECH_SPOT_UM = {"visium": 55.0, "spatial transcriptomics": 100.0}
# Kept from the record in uns["stimage"]["hest"] (provenance, HEST-Bench task lookup).
_META_KEEP = ("id", "st_technology", "organ", "oncotree_code", "species", "disease_state", "tissue",
              "preservation_method", "patient", "dataset_title", "inter_spot_dist", "spot_diameter",
              "pixel_size_um_estimated", "pixel_size_um_embedded", "magnification")


def hest_paths(root: str | Path, sample_id: str) -> dict[str, Path]:
    """The three files of one HEST sample: ``st``, ``wsi``, ``metadata``."""
    root = Path(root)
    return {"st": root / "st" / f"{sample_id}.h5ad", "wsi": root / "wsis" / f"{sample_id}.tif",
            "metadata": root / "metadata" / f"{sample_id}.json"}


def hest_ids(root: str | Path) -> list[str]:
    """Sample ids with an expression file under ``ROOT/st``."""
    st = Path(root) / "st"
    return sorted(p.stem for p in st.glob("*.h5ad")) if st.is_dir() else []


def _positive(value, what: str) -> float | None:
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(v) or v <= 0:
        raise StimageError(f"{what} is {value!r}; a finite positive number is required")
    return v


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise StimageError(f"HEST metadata {path} not found")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise StimageError(f"HEST metadata {path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise StimageError(f"HEST metadata {path} is not a JSON object")
    return meta


def _mpp(meta: dict, path: Path) -> tuple[float, str]:
    for k in HEST_MPP_KEYS:
        if isinstance(meta.get(k), str):
            raise StimageError(f"{path}: {k} is the string {meta[k]!r}; a number is required")
        v = _positive(meta.get(k), f"{path}: {k}")
        if v is not None:
            return v, k
    raise StimageError(f"{path} has no pixel size ({' or '.join(HEST_MPP_KEYS)})")


def _spot_um(meta: dict, path: Path) -> float:
    if isinstance(meta.get("spot_diameter"), str):
        raise StimageError(f"{path}: spot_diameter is the string {meta['spot_diameter']!r}; a number is required")
    v = _positive(meta.get("spot_diameter"), f"{path}: spot_diameter")
    if v is not None:
        return v
    tech = str(meta.get("st_technology", "")).strip().lower()
    if tech in HEST_TECH_SPOT_UM:
        return HEST_TECH_SPOT_UM[tech]
    raise StimageError(f"{path} has no spot_diameter and its st_technology {meta.get('st_technology')!r} "
                       "has no nominal one")


def _platform(meta: dict) -> str:
    tech = str(meta.get("st_technology", "")).strip().lower()
    if tech == "visium":
        return "visium"  # hexagonal grid: Moran's I uses the 6 grid neighbours
    if tech == "spatial transcriptomics":
        return "legacy_st"
    return f"hest_{tech.replace(' ', '_')}" if tech else "hest"


def _spot_pixels(adata: ad.AnnData, where: Path) -> np.ndarray:
    if keys.SPATIAL in adata.obsm:
        xy = np.asarray(adata.obsm[keys.SPATIAL])
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        xy = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    else:
        raise StimageError(f"{where} has no spot positions (obsm['spatial'] or obs pxl_col/row_in_fullres)")
    if xy.dtype.kind not in "biuf" or xy.ndim != 2 or xy.shape[1] != 2:
        raise StimageError(f"{where}: spot positions are {xy.dtype} of shape {xy.shape}, not (n_spots, 2) numbers")
    xy = xy.astype(np.float64)
    if not np.isfinite(xy).all():
        raise StimageError(f"{where}: spot position not finite at spot {adata.obs_names[int(np.argmax(~np.isfinite(xy).all(1)))]}")
    return xy


def read_hest(root: str | Path, sample_id: str, *, require_image: bool = True) -> ad.AnnData:
    """One HEST-1k sample → stimage AnnData (n_spots × n_genes).

    ``X`` int32 CSR raw counts; ``obs_names`` ``<id>_<barcode>``; ``obs`` sample (and
    array_row/array_col where HEST has them); ``obsm["spatial"]`` (n_spots, 2) float64 WSI px
    (x, y); mpp from the metadata's ``pixel_size_um_estimated`` (else ``..._embedded``);
    spot diameter from ``spot_diameter`` (µm). Spots outside ``in_tissue`` (when that column
    exists) or centred outside the WSI are dropped and counted in ``uns["stimage"]["dropped"]``.
    """
    from data_pipelines.slides.h5ad import read_anndata

    paths = hest_paths(root, sample_id)
    if not paths["st"].is_file():
        avail = hest_ids(root)
        hint = f"; available: {', '.join(avail[:10])}{' ...' if len(avail) > 10 else ''}" if avail else \
            f" (is {root} a HEST root with st/, wsis/, metadata/?)"
        raise StimageError(f"no HEST expression file for {sample_id!r} at {paths['st']}{hint}")
    meta = _read_metadata(paths["metadata"])
    mpp, mpp_key = _mpp(meta, paths["metadata"])
    spot_um = _spot_um(meta, paths["metadata"])
    src = read_anndata(paths["st"], "HEST expression file")
    if src.n_obs == 0 or src.n_vars == 0:
        raise StimageError(f"{paths['st']} is empty ({src.n_obs} spots x {src.n_vars} genes)")
    xy = _spot_pixels(src, paths["st"])
    keep = np.ones(src.n_obs, bool)
    dropped = {"not_in_tissue": 0, "outside_image": 0}
    if "in_tissue" in src.obs:
        t = pd.to_numeric(src.obs["in_tissue"], errors="coerce").to_numpy()
        keep &= t == 1
        dropped["not_in_tissue"] = int((~keep).sum())
    image_path = ""
    if paths["wsi"].is_file():
        image_path = str(paths["wsi"].resolve())
        w, h = image_size(image_path)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        dropped["outside_image"] = int((keep & ~inside).sum())
        if dropped["outside_image"]:
            warnings.warn(f"{sample_id}: {dropped['outside_image']} spot(s) centred outside the {w}x{h} WSI "
                          "dropped", stacklevel=2)
        keep &= inside
    elif require_image:
        raise StimageError(f"HEST sample {sample_id} has no WSI at {paths['wsi']}")
    if not keep.any():
        raise StimageError(f"HEST sample {sample_id}: no spot left (in tissue and inside the WSI)")
    src = src[keep]
    xy = xy[keep]
    where = f"HEST sample {sample_id} ({paths['st'].name})"
    obs_names = [f"{sample_id}_{b}" for b in src.obs_names]
    var_names = unique_names(src.var_names, where)
    X = as_count_matrix(src.X, where, obs_names, var_names)
    obs = pd.DataFrame({keys.SAMPLE: pd.Categorical([sample_id] * len(obs_names))}, index=obs_names)
    for k in (keys.ARRAY_ROW, keys.ARRAY_COL):
        if k in src.obs:
            v = pd.to_numeric(src.obs[k], errors="coerce").to_numpy(np.float64)
            if np.isfinite(v).all() and (v == np.round(v)).all():
                obs[k] = v.astype(np.int64)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var_names))
    adata.obsm[keys.SPATIAL] = xy
    platform = _platform(meta)
    adata.uns[keys.SPATIAL_UNS] = {sample_id: {
        "scalefactors": {keys.SPOT_DIAMETER_FULLRES: spot_um / mpp},
        "metadata": library_metadata(image_path, mpp, spot_um, 1.0, str(paths["st"].resolve()))}}
    hest = {k: meta[k] for k in _META_KEEP if k in meta and isinstance(meta[k], (str, int, float)) and meta[k] == meta[k]}
    hest["mpp_from"] = mpp_key
    adata.uns[keys.STIMAGE_UNS] = {keys.MPP: mpp, keys.SPOT_DIAMETER_UM: spot_um, PLATFORM: platform,
                                   LIBRARY_ID: sample_id, IMAGE_SCALE: 1.0, DROPPED: dropped, "hest": hest}
    return adata
