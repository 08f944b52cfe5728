"""A tiny CNN for tests: fast at 32×32, same interface as the real backbones."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from stimage_jax.features.layers import ConvBN

__all__ = ["TinyCNN"]


class TinyCNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, widths=(8, 16), num_classes: int | None = None):
        convs, cin = [], 3
        for w in widths:
            convs.append(ConvBN(cin, w, 3, 2, act=nnx.relu, rngs=rngs))
            cin = w
        self.convs = nnx.List(convs)
        self.num_features = cin
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs) if num_classes else None

    @staticmethod
    def normalize(x):
        return x.astype(jnp.float32) / 255.0

    def features(self, x):
        for c in self.convs:
            x = c(x)
        return jnp.mean(x, axis=(1, 2))

    def classify(self, feats):
        return self.fc(feats)

    def __call__(self, tiles):
        return self.features(self.normalize(tiles))
