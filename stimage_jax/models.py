"""One loader for every model a user can point a command at.

``load_model(path)`` returns a :class:`~export.runtime.predictor.Predictor`: an exported
``.onnx`` file (onnxruntime, :class:`~export.runtime.onnx_model.OnnxEnsemble`), or a
training workdir / its ``model/`` folder, dispatched on ``model.json``'s ``format``
(the NB ensemble, or the high/low classifier).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipelines.errors import StimageError
from export.runtime.predictor import resolve_model_dir

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
        try:
            cfg = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StimageError(f"{meta} is corrupt: {e}") from None
        if not isinstance(cfg, dict):
            raise StimageError(f"{meta} is corrupt: not a JSON object")
        if cfg.get("format") == CLASSIFIER_FORMAT:
            return ClassifierModel.load(meta.parent, cfg)
    return EnsembleModel.load(Path(path))
