"""Shared pieces of the readers: counts validation, unique gene names, image size."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.keys import DROPPED, IMAGE_SCALE, LIBRARY_ID, PLATFORM  # re-exported for the readers

__all__ = ["as_count_matrix", "unique_names", "image_size", "library_metadata",
           "IMAGE_SCALE", "LIBRARY_ID", "PLATFORM", "DROPPED"]



def library_metadata(image_path: str, mpp: float, spot_diameter_um: float, image_scale: float,
                     source: str) -> dict:
    """``uns["spatial"][library_id]["metadata"]``: the per-sample facts tiling needs.

    mpp / spot size / image scale are repeated here (not only in ``uns["stimage"]``) because
    ``anndata.concat(..., uns_merge="unique")`` keeps each library's entry but drops the
    top-level values that differ between samples; tiling then still has them per sample.
    """
    return {keys.IMAGE_PATH: image_path, keys.MPP: float(mpp), keys.SPOT_DIAMETER_UM: float(spot_diameter_um),
            IMAGE_SCALE: float(image_scale), "source": source}


def as_count_matrix(x, where: str, obs_names=None, var_names=None) -> sp.csr_matrix:
    """Validate raw counts (finite, >= 0, integer) and return int32 CSR.

    The error names the first offending spot and gene, so a user can find it.
    """
    m = sp.csr_matrix(x)
    data = m.data
    bad = ~np.isfinite(data) | (data < 0) | (data != np.round(data))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(m.indptr, i, side="right") - 1)
        col = int(m.indices[i])
        spot = obs_names[row] if obs_names is not None else row
        gene = var_names[col] if var_names is not None else col
        kind = "NaN/inf" if not np.isfinite(data[i]) else ("negative" if data[i] < 0 else "non-integer")
        raise StimageError(f"{where}: {kind} count {float(data[i])} at spot {spot}, gene {gene} "
                           f"({int(bad.sum())} bad value(s)); raw integer counts are required")
    if m.nnz and data.max() > np.iinfo(np.int32).max:
        raise StimageError(f"{where}: counts exceed int32")
    return m.astype(np.int32)


def unique_names(names, where: str) -> list[str]:
    """Make gene symbols unique the scanpy way (``GENE``, ``GENE-1``, ...) and say so."""
    names = [str(n) for n in names]
    seen: dict[str, int] = {}
    out = []
    dup = 0
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
            dup += 1
        else:
            seen[n] = 0
            out.append(n)
    if dup:
        warnings.warn(f"{where}: {dup} duplicated gene symbol(s) made unique with -1, -2 suffixes",
                      stacklevel=3)
    return out


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file without decoding its pixels."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # whole-slide H&E routinely exceed PIL's bomb limit
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise StimageError(f"image {path} not found") from None
    except Exception as e:
        raise StimageError(f"image {path} is unreadable ({type(e).__name__}: {e})") from None
