"""Cohort prediction: many slides → one ``cohort.h5ad`` (one row per slide), locally or on
a Dask cluster (NumPy, onnxruntime, anndata, dask.distributed — no JAX for .onnx models).

:func:`~export.cohort.run.predict_cohort` is the library entry; ``python -m export.cohort``
and ``stimage cohort predict`` are its command lines.
"""

from export.cohort.run import AGGREGATES, predict_cohort, read_slide_table

__all__ = ["predict_cohort", "read_slide_table", "AGGREGATES"]
