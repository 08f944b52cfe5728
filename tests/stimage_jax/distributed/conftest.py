"""Tiny features-only studies for multi-process tests: spots with an 8-dim embedding in obsm
that drives three genes' NB counts (no tiles, so a run is all training)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data_pipelines import keys


def write_feature_study(folder, n_samples: int = 3, spots: int = 48, dim: int = 8, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.6, (dim, 3))
    paths = []
    for k in range(n_samples):
        emb = rng.normal(0, 1, (spots, dim)).astype(np.float32)
        mu = np.exp(1.5 + emb @ w)
        counts = rng.negative_binomial(5.0, 5.0 / (5.0 + mu)).astype(np.float32)
        name = f"f{k}"
        obs = pd.DataFrame({keys.SAMPLE: name}, index=[f"{name}_{i}" for i in range(spots)])
        a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=["A", "B", "C"]))
        a.obsm["emb"] = emb
        a.obsm[keys.SPATIAL] = np.stack([np.arange(spots) % 8, np.arange(spots) // 8], 1).astype(np.float64)
        p = folder / f"{name}.h5ad"
        a.write_h5ad(p)
        paths.append(p)
    return paths


@pytest.fixture
def feature_study(tmp_path):
    return write_feature_study(tmp_path)
