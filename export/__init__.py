"""Deployment. ``export.to_onnx`` (needs JAX) turns a trained ensemble into one ONNX file;
everything else here is the JAX-free side: ``export.runtime`` (the predictor protocol,
ONNX sessions, ensemble moments, prediction assembly) and ``python -m export.predict``."""

__all__: list[str] = []
