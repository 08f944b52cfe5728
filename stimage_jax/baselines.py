"""Baselines fitted on the same features and folds as the NB head.

Ridge follows the HEST-Benchmark protocol: StandardScaler → PCA(256) → Ridge with
``alpha = 100 / (d · g)`` (d the PCA dimension, g the number of genes), fitted to
log1p counts; predictions are mapped back with ``expm1`` so every method is scored
against the same raw counts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["RidgeReference", "fit_ridge", "apply_ridge"]


@dataclasses.dataclass
class RidgeReference:
    pipeline: Pipeline
    genes: list[str]


def fit_ridge(feats: np.ndarray, counts: np.ndarray, genes, *, n_components: int = 256,
              seed: int = 0) -> RidgeReference:
    """feats (N, D), counts (N, G) → fitted reference."""
    d = min(n_components, feats.shape[0], feats.shape[1])
    alpha = 100.0 / (d * counts.shape[1])
    pipe = make_pipeline(StandardScaler(), PCA(d, random_state=seed), Ridge(alpha=alpha, random_state=seed))
    pipe.fit(feats, np.log1p(counts))
    return RidgeReference(pipe, list(genes))


def apply_ridge(ref: RidgeReference, feats: np.ndarray) -> np.ndarray:
    """(N, D) → predicted counts (N, G), clipped at 0."""
    return np.clip(np.expm1(ref.pipeline.predict(feats)), 0.0, None)
