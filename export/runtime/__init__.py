"""The JAX-free side: everything needed to run a trained model and assemble its output.

``moments`` (ensemble moments and NB-mixture intervals), ``prediction`` (model outputs →
the prediction AnnData, for spots and whole slides), ``predictor`` (the one protocol every
model implements) and ``onnx_model`` (an exported ensemble in onnxruntime). It imports
NumPy, SciPy, AnnData, OpenCV, onnxruntime and ``data_pipelines`` only — never JAX, Flax
or Optax, and nothing from ``stimage_jax`` (``tests/export/test_runtime_imports.py``
checks the import graph). The JAX models in ``stimage_jax`` implement the same protocol,
so one :func:`~export.runtime.prediction.predict_adata` serves both.
"""

from export.runtime.predictor import CLASSIFY, REGRESS, Predictor, resolve_model_dir

__all__ = ["Predictor", "REGRESS", "CLASSIFY", "resolve_model_dir"]
