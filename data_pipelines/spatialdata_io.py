"""SpatialData (OME-Zarr) output and input, through the ``spatialdata`` library.

What :func:`write_spatialdata` writes for an AnnData in stimage's conventions (counts from
``stimage read``, or a prediction with all its layers), one set per library ``lib``:

- ``images/<lib>_he``: the H&E (full resolution unless ``max_image_px``) as a multiscale
  image (c, y, x) uint8, levels halved down to ≤ 1,024 px, read lazily from the file the
  library references (whole-slide TIFFs block by block);
- ``shapes/<lib>_spots``: one circle per spot / grid tile, centre = ``obsm["spatial"]``
  (full-resolution px), radius = half the spot diameter (or half the tile side);
- ``tables/table``: the AnnData (X, layers, obs, var, obsm, uns), annotating the shapes
  (``obs["region"]`` = shapes name, ``obs["instance_id"]`` = shape index).

Coordinate system: µm (``"global"`` for one library, else the library id): the image's
transformation is Scale(mpp / image_scale) and the shapes' Scale(mpp), so image and spots
overlay in physical units and the image's pixel size is its µm scale.

:func:`read_spatialdata` turns such a store (or any SpatialData with one table annotating
circles) back into stimage's AnnData; :func:`data_pipelines.slides.h5ad.read_anndata`
calls it for every ``.zarr`` input. Needs the ``scverse`` extra.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np

from data_pipelines import keys
from data_pipelines.errors import StimageError

__all__ = ["write_output", "check_output", "is_zarr", "write_spatialdata", "to_spatialdata", "read_spatialdata", "is_spatialdata", "TABLE", "REGION_KEY",
           "INSTANCE_KEY", "ZARR_SUFFIX"]

TABLE = "table"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
ZARR_SUFFIX = ".zarr"
_MIN_LEVEL_PX = 1024   # the coarsest pyramid level's longer side is at most this
_CHUNK = 2048          # image chunk side (px) on disk and when reading lazily


def _need_spatialdata():
    try:
        import spatialdata
    except ImportError:
        raise StimageError("SpatialData (.zarr) needs the scverse extra: pip install 'stimage-jax[scverse]'") from None
    return spatialdata


@contextlib.contextmanager
def _regular_chunks():
    """spatialdata 0.7.0 hands each pyramid level's dask chunks to ome-zarr as a tuple of
    tuples; with dask >= 2026.3 ome-zarr passes them on to ``zarr.create_array``, which wants
    one size per axis (spatialdata >= 0.7.1 pins dask < 2026.1.2 instead, which would
    downgrade this project's dask). Our levels are regularly chunked, so the first chunk
    per axis is the chunk size; scoped to our own writes."""
    import ome_zarr.writer as w

    orig = w._retuple

    def flat(chunks, shape):
        if not isinstance(chunks, int) and any(isinstance(c, tuple) for c in chunks):
            chunks = tuple(int(max(c)) if isinstance(c, tuple) else c for c in chunks)
        return orig(chunks, shape)

    w._retuple = flat
    try:
        yield
    finally:
        w._retuple = orig


def _lazy_image(path: str, max_px: int | None):
    """(dask array (3, h, w) uint8 of the H&E, image px per file px)."""
    import dask
    import dask.array as da

    from data_pipelines.wsi import open_slide

    slide = open_slide(path, mpp=1.0)  # pixels only
    if max_px is not None and max(slide.width, slide.height) > max_px:
        from data_pipelines.scverse import shrunk_image

        thumb, f = shrunk_image(slide, max_px)
        return da.from_array(np.ascontiguousarray(np.moveaxis(thumb[..., :3], -1, 0)),
                             chunks=(3, _CHUNK, _CHUNK)), f
    w, h = slide.width, slide.height
    rows = []
    for y0 in range(0, h, _CHUNK):
        row = []
        for x0 in range(0, w, _CHUNK):
            bw, bh = min(_CHUNK, w - x0), min(_CHUNK, h - y0)
            block = dask.delayed(slide.region)(x0, y0, bw, bh)
            row.append(da.from_delayed(block, (bh, bw, 3), np.uint8))
        rows.append(da.concatenate(row, axis=1))
    img = da.concatenate(rows, axis=0).rechunk((_CHUNK, _CHUNK, 3))
    return img.transpose(2, 0, 1), 1.0


def _levels(h: int, w: int) -> list[int]:
    n, side = [], max(h, w)
    while side > _MIN_LEVEL_PX:
        n.append(2)
        side //= 2
    return n


def _library_of(adata) -> dict:
    libs = adata.uns.get(keys.SPATIAL_UNS)
    return libs if isinstance(libs, dict) else {}


def _spots_per_library(adata, libs: list[str]) -> dict[str, np.ndarray]:
    """Boolean obs mask per library (by ``obs["sample"]``; all spots when there is one library)."""
    if len(libs) == 1:
        return {libs[0]: np.ones(adata.n_obs, bool)}
    if keys.SAMPLE not in adata.obs:
        raise StimageError(f"{len(libs)} libraries in uns['spatial'] but no obs['sample'] saying which spot is where")
    s = adata.obs[keys.SAMPLE].astype(str).to_numpy()
    return {lib: s == lib for lib in libs}


def to_spatialdata(adata, *, max_image_px: int | None = None, table_uns: bool = True):
    """stimage AnnData → SpatialData (images, circle shapes, one table); see the module doc.

    The table is a copy of ``adata`` plus ``obs["region"]``/``obs["instance_id"]``; its
    ``uns["spatial"]`` keeps the scverse images and scale factors, so the table alone is
    still what ``sc.pl.spatial`` plots.
    """
    with warnings.catch_warnings():
        # spatialdata/ome-zarr's own deprecations (its Scaler use), not the user's business
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return _to_spatialdata(adata, max_image_px, table_uns)


def _to_spatialdata(adata, max_image_px: int | None, table_uns: bool):
    _need_spatialdata()
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    from data_pipelines.scverse import add_images

    if keys.SPATIAL not in adata.obsm:
        raise StimageError("SpatialData output needs spot positions (obsm['spatial'])")
    table = adata.copy()
    add_images(table)
    libs = list(_library_of(table)) or [str(table.uns.get(keys.STIMAGE_UNS, {}).get(keys.LIBRARY_ID, "sample"))]
    masks = _spots_per_library(table, libs)
    top = table.uns.get(keys.STIMAGE_UNS, {}) or {}
    images, shapes = {}, {}
    region = np.empty(table.n_obs, object)
    instance = np.zeros(table.n_obs, np.int64)
    xy = np.asarray(table.obsm[keys.SPATIAL], np.float64)
    for lib in libs:
        entry = _library_of(table).get(lib, {}) or {}
        meta = entry.get("metadata", {}) or {}
        sf = entry.get("scalefactors", {}) or {}
        mpp = float(meta.get(keys.MPP, top.get(keys.MPP, 1.0)) or 1.0)
        scale = float(meta.get(keys.IMAGE_SCALE, top.get(keys.IMAGE_SCALE, 1.0)) or 1.0)
        cs = "global" if len(libs) == 1 else str(lib)
        diam = sf.get(keys.SPOT_DIAMETER_FULLRES)
        if diam is None:
            um = meta.get(keys.SPOT_DIAMETER_UM, top.get(keys.SPOT_DIAMETER_UM))
            diam = float(um) / mpp if um else 1.0
        m = masks[lib]
        name = f"{lib}_spots"
        shapes[name] = ShapesModel.parse(xy[m], geometry=0, radius=np.full(int(m.sum()), float(diam) / 2),
                                         index=pd.RangeIndex(int(m.sum())),
                                         transformations={cs: Scale([mpp, mpp], axes=("x", "y"))})
        region[m] = name
        instance[m] = np.arange(int(m.sum()))
        path = meta.get(keys.IMAGE_PATH)
        if path and Path(str(path)).is_file():
            data, f = _lazy_image(str(path), max_image_px)
            um_per_px = mpp / (scale * f)  # µm per pixel of the stored image
            images[f"{lib}_he"] = Image2DModel.parse(
                data, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                scale_factors=_levels(*data.shape[1:]) or None, chunks={"c": 3, "y": _CHUNK, "x": _CHUNK},
                transformations={cs: Scale([um_per_px, um_per_px], axes=("y", "x"))})
    table.obs[REGION_KEY] = pd.Categorical(region.astype(str))
    table.obs[INSTANCE_KEY] = instance
    if not table_uns:
        table.uns.pop(keys.SPATIAL_UNS, None)
    table = TableModel.parse(ad.AnnData(table.X, obs=table.obs, var=table.var, obsm=dict(table.obsm),
                                        layers=dict(table.layers), uns=dict(table.uns)),
                             region=sorted(shapes), region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(images=images, shapes=shapes, tables={TABLE: table})


def write_spatialdata(adata, path: str | os.PathLike, *, overwrite: bool = False,
                      max_image_px: int | None = None) -> Path:
    """Write :func:`to_spatialdata` of ``adata`` to the ``.zarr`` folder ``path`` atomically
    (built in a hidden sibling, then swapped in); image paths in the table are stored
    relative to the store's folder when the image lies beside or below it."""
    from data_pipelines.io import atomic_dir
    from data_pipelines.scverse import portable_paths

    path = Path(path)
    if path.suffix != ZARR_SUFFIX:
        raise StimageError(f"SpatialData output {path} must end in {ZARR_SUFFIX}")
    if path.exists() and not overwrite:
        raise StimageError(f"output {path} already exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise StimageError(f"output {path} is a file, not a .zarr folder")
    sdata = to_spatialdata(adata, max_image_px=max_image_px)
    portable_paths(sdata.tables[TABLE], path)
    with atomic_dir(path) as tmp, _regular_chunks(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spatialdata/ome-zarr deprecation chatter, not the user's
        store = tmp / path.name
        sdata.write(store)
        for child in store.iterdir():  # the store's content becomes the folder itself
            os.replace(child, tmp / child.name)
        store.rmdir()
    return path


def is_spatialdata(path: str | os.PathLike) -> bool:
    """A SpatialData store: a folder with a ``tables``/``shapes``/``images`` group."""
    p = Path(path)
    return p.is_dir() and any((p / g).is_dir() for g in ("tables", "shapes", "images", "points"))


def read_spatialdata(path: str | os.PathLike, what: str = "data file"):
    """A SpatialData ``.zarr`` → stimage AnnData: the table, with ``obsm["spatial"]`` the
    centres of the circles it annotates (their own coordinates, i.e. full-resolution px for
    stores stimage wrote) and image paths resolved (:func:`~data_pipelines.scverse.resolve_image_paths`).
    One StimageError line when the store has no table or the table annotates no circles."""
    _need_spatialdata()
    import spatialdata as sd

    from data_pipelines.scverse import resolve_image_paths

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata = sd.read_zarr(path)
    except Exception as e:  # zarr/ome-zarr raise many types on a damaged store
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise StimageError(f"{what} {path} is not a readable SpatialData store ({type(e).__name__}: {first})") from None
    if not sdata.tables:
        raise StimageError(f"{what} {path} has no table (counts or predictions)")
    name = TABLE if TABLE in sdata.tables else sorted(sdata.tables)[0]
    table = sdata.tables[name]
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    rkey, ikey = attrs.get("region_key"), attrs.get("instance_key")
    adata = table.copy()
    if rkey in adata.obs and ikey in adata.obs:
        xy = np.full((adata.n_obs, 2), np.nan)
        regions = adata.obs[rkey].astype(str).to_numpy()
        for reg in np.unique(regions):
            if reg not in sdata.shapes:
                raise StimageError(f"{what} {path}: table annotates {reg!r}, which is not a shapes element")
            gdf = sdata.shapes[reg]
            m = regions == reg
            centres = np.c_[gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy()] if (
                gdf.geometry.geom_type == "Point").all() else np.c_[gdf.geometry.centroid.x, gdf.geometry.centroid.y]
            pos = gdf.index.get_indexer(adata.obs[ikey].to_numpy()[m])
            if (pos < 0).any():
                raise StimageError(f"{what} {path}: {int((pos < 0).sum())} table row(s) name no shape of {reg!r}")
            xy[m] = centres[pos]
        adata.obsm[keys.SPATIAL] = xy
        adata.obs = adata.obs.drop(columns=[rkey, ikey])
    adata.uns.pop("spatialdata_attrs", None)
    resolve_image_paths(adata, path)
    return adata


def is_zarr(path: str | os.PathLike) -> bool:
    """An output/input named ``*.zarr`` (SpatialData) rather than ``.h5ad``."""
    return Path(path).suffix.lower() == ZARR_SUFFIX


def check_output(path: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """:func:`data_pipelines.io.check_writable` for an ``.h5ad`` file or a ``.zarr`` folder,
    before any work."""
    from data_pipelines.io import check_distinct, check_new_output, check_writable

    path = Path(path)
    if not is_zarr(path):
        return check_writable(path, overwrite, inputs)
    check_distinct(path, *inputs)
    if path.exists() and not path.is_dir():
        raise StimageError(f"output {path} is a file, not a .zarr folder")
    return check_new_output(path, overwrite)


def write_output(adata, path: str | os.PathLike, *, overwrite: bool = False, max_image_px: int | None = None) -> Path:
    """Write ``adata`` as SpatialData when ``path`` ends in ``.zarr`` (its H&E at most
    ``max_image_px`` on the longer side; None = full resolution), else as a scanpy-ready
    ``.h5ad`` (:func:`data_pipelines.io.write_h5ad`)."""
    from data_pipelines.io import write_h5ad

    if is_zarr(path):
        return write_spatialdata(adata, path, overwrite=overwrite, max_image_px=max_image_px)
    return write_h5ad(adata, path, overwrite=overwrite)
