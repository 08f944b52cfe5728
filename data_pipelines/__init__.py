"""Readers, tiling, QC, stain normalisation and input pipelines (NumPy/OpenCV; no JAX)."""

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path, write_h5ad

__all__ = ["StimageError", "atomic_path", "keys", "write_h5ad"]
