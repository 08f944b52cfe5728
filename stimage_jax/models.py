"""One loader for every model a user can point a command at.

``load_model(path)`` returns a :class:`~export.runtime.predictor.Predictor`: an exported
``.onnx`` file (onnxruntime, :class:`~export.runtime.onnx_model.OnnxEnsemble`), or a
training workdir / its ``model/`` folder, dispatched on ``model.json``'s ``format``
(the NB ensemble, or the high/low classifier).
"""

from __future__ import annotations

import os
from pathlib import Path

from export.runtime.predictor import read_model_json, resolve_model_dir

__all__ = ["load_model", "is_onnx"]


def is_onnx(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".onnx")


def load_model(path: str | os.PathLike):
    """A Predictor from an ``.onnx`` file, a workdir or a ``model/`` folder."""
    if is_onnx(path):
        from export.runtime.onnx_model import OnnxEnsemble

        return OnnxEnsemble(path)
    from stimage_jax.classify import CLASSIFIER_FORMAT, ClassifierModel
    from stimage_jax.ensemble.model import EnsembleModel

    meta = resolve_model_dir(path) / "model.json"
    if meta.is_file():
        cfg = read_model_json(meta)
        if cfg.get("format") == CLASSIFIER_FORMAT:
            return ClassifierModel.load(meta.parent, cfg)
    return EnsembleModel.load(Path(path))
