"""The NB head's start from data: moments merged chunk by chunk (a streamed dataset, several
processes) equal NumPy's over the whole array, and give the same head."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from stimage_jax.nb.head import NBHead, feature_moments, init_head_from_data, init_head_from_moments, merge_moments


def test_merged_chunk_moments_equal_numpy():
    rng = np.random.default_rng(0)
    # a large offset and a small spread: the case a naive sum of squares gets wrong
    x = 1e4 + rng.normal(0, 1e-2, (1001, 7)) * rng.uniform(0.5, 2, 7)
    cuts = [0, 1, 300, 300, 650, 1001]  # one-row and empty chunks too
    n, mean, m2 = merge_moments([feature_moments(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
    assert n == 1001
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(np.sqrt(m2 / n), x.std(0), rtol=1e-9)
    with pytest.raises(ValueError):
        merge_moments([feature_moments(x[:0])])


def test_head_from_moments_equals_head_from_features():
    rng = np.random.default_rng(1)
    feats = rng.normal(2, 3, (200, 6)).astype(np.float32)
    feats[:, 4] = 1.0  # a dead feature: infinite scale
    counts = rng.poisson(5, (200, 3)).astype(np.float32)
    a, b = (NBHead(6, 3, rngs=nnx.Rngs(0)) for _ in range(2))
    init_head_from_data(a, feats, counts)
    n, mean, m2 = merge_moments([feature_moments(feats[:77]), feature_moments(feats[77:])])
    init_head_from_moments(b, mean, np.sqrt(m2 / n), counts)
    for name in ("feat_mean", "feat_scale"):
        np.testing.assert_allclose(np.asarray(getattr(b, name)[...]), np.asarray(getattr(a, name)[...]), rtol=1e-6)
    assert np.isinf(np.asarray(b.feat_scale[...])[4])
    np.testing.assert_array_equal(np.asarray(b.mu_out.bias[...]), np.asarray(a.mu_out.bias[...]))
