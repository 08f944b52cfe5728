"""ONNX export (needs JAX, in ``export.to_onnx``) and the onnxruntime predictor (no JAX)."""

__all__: list[str] = []
