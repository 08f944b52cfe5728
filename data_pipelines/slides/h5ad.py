"""Reading stimage AnnData files back, with the checks every step relies on."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import IMAGE_SCALE, LIBRARY_ID, as_count_matrix

__all__ = ["read_h5ad", "validate_counts", "validate_geometry", "check_hdf5_readable", "read_anndata"]

# A damaged HDF5 file can make the HDF5 library loop forever inside one C call (reading
# an object's attributes), where no signal or exception reaches it. Its metadata is
# therefore first walked in a forked child with a time limit: a healthy file's walk takes
# milliseconds (metadata only, h5py already imported), a looping one is killed and reported.


def _walk_hdf5(path: str) -> None:
    import h5py

    with h5py.File(path, "r") as f:
        dict(f.attrs)
        f.visititems(lambda name, obj: dict(obj.attrs))


def check_hdf5_readable(path: str | Path, seconds: float | None = None, what: str = "file") -> None:
    """Refuse an HDF5 file whose metadata cannot be walked within ``seconds``
    (``$STIMAGE_HDF5_CHECK_SECONDS``, default 5), walked in a forked child process.
    Without ``os.fork`` (Windows) the file is read unguarded."""
    import os
    import signal
    import time

    if not hasattr(os, "fork"):
        return
    seconds = float(os.environ.get("STIMAGE_HDF5_CHECK_SECONDS", 5)) if seconds is None else seconds
    r, w = os.pipe()
    with warnings.catch_warnings():
        # JAX warns at every fork once it is initialised; this child only walks HDF5 metadata
        # with h5py and leaves by os._exit, never touching JAX's threads or state.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        pid = os.fork()
    if pid == 0:  # the child: walk, report, leave without running any of the parent's cleanup
        code = 1
        try:
            os.close(r)
            # Self-destruct even if the parent is killed while waiting: the default SIGALRM
            # action ends a process stuck inside a C call, where nothing else reaches it.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(seconds) + 2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)  # HDF5's diagnostic dump is not for the user
            _walk_hdf5(str(path))
            code = 0
        except BaseException as e:  # noqa: BLE001  anything the walk raises is the file's fault
            try:
                os.write(w, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300].encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    try:
        deadline = time.monotonic() + seconds
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise StimageError(f"{what} {path} is not a readable .h5ad (corrupt: its HDF5 metadata could "
                                   f"not be read within {seconds:g} s)")
            time.sleep(0.002)
        msg = os.read(r, 400).decode(errors="replace")
    finally:
        os.close(r)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise StimageError(f"{what} {path} is not a readable .h5ad ({msg or 'unreadable HDF5'})")


def read_anndata(path: str | Path, what: str = "data file") -> ad.AnnData:
    """``anndata.read_h5ad`` behind :func:`check_hdf5_readable`, any failure one StimageError line.

    A ``.zarr`` folder is read too: a SpatialData store through
    :func:`data_pipelines.spatialdata_io.read_spatialdata` (its table, spots from its circles),
    else an AnnData zarr. Image references stored relative to the file are made absolute
    (:func:`data_pipelines.scverse.resolve_image_paths`; ``$STIMAGE_IMAGE_ROOT`` re-points them).
    """
    from data_pipelines.scverse import resolve_image_paths

    path = Path(path)
    if path.suffix == ".zarr" and path.is_dir():
        from data_pipelines.spatialdata_io import is_spatialdata, read_spatialdata

        if is_spatialdata(path):
            return read_spatialdata(path, what)
        try:
            adata = ad.read_zarr(path)
        except Exception as e:  # zarr/anndata raise many types on a damaged store
            first = str(e).splitlines()[0][:120] if str(e) else ""
            raise StimageError(f"{what} {path} is not a readable AnnData .zarr ({type(e).__name__}: {first})") from None
        resolve_image_paths(adata, path)
        return adata
    if not path.is_file():
        raise StimageError(f"{what} {path} not found")
    check_hdf5_readable(path, what=what)
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types on a corrupt file
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise StimageError(f"{what} {path} is not a readable .h5ad ({type(e).__name__}: {first})") from None
    resolve_image_paths(adata, path)
    return adata


def validate_counts(adata: ad.AnnData, where: str = "data") -> ad.AnnData:
    """Check raw counts and a sample id per spot; returns ``adata`` (modified in place).

    ``X`` (n_spots, n_genes) must be finite, non-negative and integer-valued; it becomes
    int32 CSR. The first offending spot and gene are named in the error. Without
    ``obs["sample"]`` every spot gets ``uns["stimage"]["library_id"]``, else the stem of
    ``where`` (the file name), with a warning saying so.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise StimageError(f"{where} is empty ({adata.n_obs} spots x {adata.n_vars} genes)")
    if adata.X is None:
        raise StimageError(f"{where} has no X matrix; raw counts are required")
    adata.X = as_count_matrix(adata.X, where, list(adata.obs_names), list(adata.var_names))
    if keys.SAMPLE not in adata.obs:
        lib = adata.uns.get(keys.STIMAGE_UNS, {}).get(LIBRARY_ID)
        sample, src = (str(lib), "uns['stimage']['library_id']") if lib else (Path(where).stem, "the file name")
        adata.obs[keys.SAMPLE] = pd.Categorical([sample] * adata.n_obs)
        warnings.warn(f"{where}: no obs[{keys.SAMPLE!r}]; set to {sample!r} from {src}", stacklevel=2)
    elif adata.obs[keys.SAMPLE].isna().any():
        i = int(adata.obs[keys.SAMPLE].isna().to_numpy().argmax())
        raise StimageError(f"{where}: obs[{keys.SAMPLE!r}] is empty at spot {adata.obs_names[i]}")
    return adata


_GEOMETRY_KEYS = (keys.MPP, keys.SPOT_DIAMETER_UM, IMAGE_SCALE)


def _check_number(value, what: str) -> None:
    """A finite positive real number (not a string, bool or array), else one clear error."""
    if isinstance(value, (str, bytes)):
        raise StimageError(f"{what} is the string {value!r}; a number is required")
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
          and np.isfinite(value) and value > 0)
    if not ok:
        raise StimageError(f"{what} is {value!r}; a finite positive number is required")


def validate_geometry(adata: ad.AnnData, where: str = "data") -> ad.AnnData:
    """Check what tiling reads, where present: ``obsm["spatial"]`` finite numbers (n_spots, 2);
    mpp, spot diameter and image scale in ``uns["stimage"]`` and in each
    ``uns["spatial"][lib]["metadata"]`` finite positive numbers (a string is refused, not
    parsed: a file that stores numbers as text was not written by the readers). Returns ``adata``.
    """
    if keys.SPATIAL in adata.obsm:
        xy = np.asarray(adata.obsm[keys.SPATIAL])
        if xy.dtype.kind not in "biuf":
            raise StimageError(f"{where}: obsm['spatial'] holds {xy.dtype} values, not pixel numbers")
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise StimageError(f"{where}: obsm['spatial'] has shape {xy.shape}, expected (n_spots, 2) pixel x, y")
        bad = ~np.isfinite(xy).all(1)
        if bad.any():
            raise StimageError(f"{where}: obsm['spatial'] is not finite at spot {adata.obs_names[int(np.argmax(bad))]}")
    top = adata.uns.get(keys.STIMAGE_UNS, {})
    if isinstance(top, dict):
        for k in _GEOMETRY_KEYS:
            if k in top:
                _check_number(top[k], f"{where}: uns['stimage'][{k!r}]")
    for lib, entry in (adata.uns.get(keys.SPATIAL_UNS, {}) or {}).items():
        meta = entry.get("metadata", {}) if isinstance(entry, dict) else {}
        for k in _GEOMETRY_KEYS:
            if isinstance(meta, dict) and k in meta:
                _check_number(meta[k], f"{where}: uns['spatial'][{lib!r}]['metadata'][{k!r}]")
    return adata


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an .h5ad of raw counts; one clear error if missing, unreadable, not counts, or
    with malformed spot coordinates or geometry (:func:`validate_geometry`)."""
    adata = read_anndata(path)
    return validate_geometry(validate_counts(adata, str(path)), str(path))
