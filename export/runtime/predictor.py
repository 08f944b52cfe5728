"""The one interface every spot predictor offers (JAX ensemble, classifier, ONNX session,
and the inference server's client), so prediction, explanation, serving and viewing are
written once.

A predictor maps uint8 RGB tiles ``(N, tile_px, tile_px, 3)`` cut at ``tile_um`` µm (and
stain-normalised towards ``stain``) to named arrays:

- task ``"regress"``: ``{"mu": (M, N, G), "r": (M, N, G)}`` — every member's NB mean and
  dispersion (``r = inf`` marks a point prediction);
- task ``"classify"``: ``{"p_high": (N, G)}`` — probability that the spot is above the
  gene's within-sample mean.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Predictor", "REGRESS", "CLASSIFY", "TASKS", "resolve_model_dir", "read_model_json", "outputs_of"]

REGRESS = "regress"
CLASSIFY = "classify"
TASKS = (REGRESS, CLASSIFY)


@runtime_checkable
class Predictor(Protocol):
    """What :func:`~export.runtime.prediction.predict_adata`, ``stimage explain``, the
    server and the viewer need of a model."""

    task: str            # REGRESS | CLASSIFY: which arrays :meth:`params` returns
    genes: list[str]     # output columns, in order
    tile_um: float | None  # tile side in µm; None for a model that reads no tiles
    tile_px: int | None  # tile side in px the model reads
    stain: object | None  # data_pipelines.stain_normalisation.Reference, or None (raw tiles)
    provenance: dict     # recorded in a prediction's uns["stimage"]["prediction"]

    def needs_tiles(self, features: dict | None = None) -> bool:
        """Whether :meth:`params` needs tiles given these precomputed features."""
        ...

    def params(self, tiles: np.ndarray | None, *, batch_size: int = 32, progress: bool = False,
               features: dict | None = None) -> dict[str, np.ndarray]:
        """uint8 tiles (N, px, px, 3) (and/or precomputed features by source) → named arrays."""
        ...


def outputs_of(task: str) -> tuple[str, ...]:
    """The arrays :meth:`Predictor.params` returns for ``task``."""
    return ("mu", "r") if task == REGRESS else ("p_high",)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A training workdir or its ``model/`` folder → the folder holding ``model.json``
    (returned unchanged when neither holds one, so the caller's error names it)."""
    p = Path(path)
    return p / "model" if (p / "model" / "model.json").is_file() else p


def read_model_json(meta: Path) -> dict:
    """A model folder's ``model.json`` as a dict; one StimageError line when it is not UTF-8
    JSON holding an object."""
    import json

    from data_pipelines.errors import StimageError

    try:
        cfg = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StimageError(f"{meta} is corrupt: {e}") from None
    if not isinstance(cfg, dict):
        raise StimageError(f"{meta} is corrupt: not a JSON object")
    return cfg
