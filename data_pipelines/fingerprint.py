"""Content fingerprints: what a cache key or a resumed run must follow, by content not name.

``file_digest`` is the sha256 of a whole file (streamed, memoised per process by path,
size and modification time, so a 2 GB slide is hashed once per run); ``adata_fingerprint``
is the sha256 of everything a trained model learns from in an AnnData: the counts, the
spot and gene names, the sample of each spot, the spot coordinates, the per-sample
geometry (mpp, spot size, scale factors) and the content of each sample's image file.
NumPy only (no JAX), so the ONNX runtime can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_pipelines import keys

__all__ = ["adata_fingerprint", "file_digest"]

_BLOCK = 1 << 20  # bytes read per step: memory stays at 1 MiB whatever the file size
_DIGESTS: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()  # prefetch threads may hash the same slide


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest (64 chars) of the whole file at ``path``.

    Memoised in-process by (real path, size, mtime_ns): an unchanged file is read once; a
    rewritten one (new size or mtime) is read again. Raises OSError if it cannot be read.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _LOCK:
        hit = _DIGESTS.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    digest = h.hexdigest()
    with _LOCK:
        _DIGESTS[key] = digest
    return digest


def _update_array(h, name: str, a: np.ndarray) -> None:
    """Name, dtype, shape and bytes: equal bytes of another shape or type differ."""
    a = np.ascontiguousarray(a)
    h.update(f"|{name}:{a.dtype.str}:{a.shape}|".encode())
    h.update(a.tobytes() if a.dtype != object else "\0".join(map(str, a.ravel())).encode())


def _update_names(h, name: str, names) -> None:
    vals = [str(v) for v in names]
    h.update(f"|{name}:{len(vals)}|".encode())
    h.update("\0".join(vals).encode("utf-8", "surrogatepass"))


def _plain(v):
    """JSON-able copy of a uns value (NumPy scalars and arrays → Python numbers and lists)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, np.generic):
        return v.item()
    return v


_GEOMETRY = (keys.MPP, keys.SPOT_DIAMETER_UM, keys.IMAGE_SCALE)


def _samples(adata) -> list[str]:
    if keys.SAMPLE in adata.obs:
        return sorted({str(s) for s in pd.unique(adata.obs[keys.SAMPLE].astype(str))})
    lib = adata.uns.get(keys.STIMAGE_UNS, {}).get(keys.LIBRARY_ID)
    if lib is None and len(adata.uns.get(keys.SPATIAL_UNS, {})) == 1:
        lib = next(iter(adata.uns[keys.SPATIAL_UNS]))
    return [] if lib is None else [str(lib)]


def _image_identity(adata, lib: str) -> str:
    """``sha256:<digest>`` of the sample's image file, else its recorded path string.

    The path itself is not hashed when the file exists, so moving a data folder keeps
    the fingerprint; a missing image can only be named.
    """
    from data_pipelines.errors import StimageError
    from data_pipelines.tiles import sample_image_path

    try:
        path = sample_image_path(adata, lib)
    except StimageError:
        return "no image recorded"
    if path and Path(path).is_file():
        try:
            return "sha256:" + file_digest(path)
        except OSError:
            pass
    return f"path:{path}"


def adata_fingerprint(adata) -> str:
    """sha256 hex digest (64 chars) of an AnnData's training-relevant content.

    Covers ``X`` (sparse: data, indices, indptr in canonical CSR order, shape and dtype;
    dense: its bytes, shape and dtype), ``obs_names``, ``var_names``, ``obs["sample"]``,
    ``obsm["spatial"]`` (n_spots, 2), the mpp / spot diameter / image scale in
    ``uns["stimage"]`` and in each ``uns["spatial"][lib]`` (its ``scalefactors`` and those
    metadata values; not its paths), and each sample's image file content
    (:func:`file_digest`; a missing image contributes its path string). Labels, QC columns
    and provenance are not part of it.
    """
    h = hashlib.sha256(b"stimage-adata-fingerprint/1")
    x = adata.X
    if x is None:
        h.update(b"|X:none|")
    elif sp.issparse(x):
        m = sp.csr_matrix(x)
        if not m.has_canonical_format:  # the same counts in another order hash alike
            m = m.copy()
            m.sum_duplicates()
        _update_array(h, "X.shape", np.asarray(m.shape, np.int64))
        _update_array(h, "X.data", m.data)
        _update_array(h, "X.indices", m.indices.astype(np.int64, copy=False))
        _update_array(h, "X.indptr", m.indptr.astype(np.int64, copy=False))
    else:
        _update_array(h, "X", np.asarray(x))
    _update_names(h, "obs_names", adata.obs_names)
    _update_names(h, "var_names", adata.var_names)
    if keys.SAMPLE in adata.obs:
        _update_names(h, "sample", adata.obs[keys.SAMPLE].astype(str))
    if keys.SPATIAL in adata.obsm:
        _update_array(h, "spatial", np.asarray(adata.obsm[keys.SPATIAL]))
    top = adata.uns.get(keys.STIMAGE_UNS, {})
    geometry = {"stimage": {k: _plain(top[k]) for k in _GEOMETRY if k in top}, "libraries": {}}
    for lib, entry in adata.uns.get(keys.SPATIAL_UNS, {}).items():
        if not isinstance(entry, dict):
            continue
        meta = entry.get("metadata", {}) or {}
        geometry["libraries"][str(lib)] = {
            "scalefactors": _plain(entry.get("scalefactors", {}) or {}),
            "metadata": {k: _plain(meta[k]) for k in _GEOMETRY if k in meta}}
    h.update(json.dumps(geometry, sort_keys=True, default=str).encode())
    for lib in _samples(adata):
        h.update(f"|image:{lib}:{_image_identity(adata, lib)}|".encode())
    return h.hexdigest()
