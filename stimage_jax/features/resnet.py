"""ResNet v1.5 (torchvision layout: stride on the 3×3 conv of a bottleneck).

Attribute names follow torchvision's state dict (``conv1``, ``bn1``, ``layer1..4``,
``downsample``, ``fc``) so imported weights map one to one.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from stimage_jax.features.layers import ConvBN

__all__ = ["ResNet", "Bottleneck", "max_pool_3x3_s2"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def max_pool_3x3_s2(x):
    """(B, H, W, C) → (B, ⌊(H-1)/2⌋+1, ⌊(W-1)/2⌋+1, C): torch MaxPool2d(3, 2, padding=1).

    Padded with -inf by ``jnp.pad`` then pooled "VALID": jax2onnx 0.17.1 exports
    ``max_pool`` with explicit tuple padding silently without the padding, and its patched
    ``max_pool`` takes ``window_shape`` only by keyword.
    """
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, cin, width, stride, *, rngs):
        cout = width * self.expansion
        self.c1 = ConvBN(cin, width, 1, act=nnx.relu, rngs=rngs)
        self.c2 = ConvBN(width, width, 3, stride, act=nnx.relu, rngs=rngs)
        self.c3 = ConvBN(width, cout, 1, rngs=rngs)
        self.downsample = ConvBN(cin, cout, 1, stride, rngs=rngs) if stride != 1 or cin != cout else None

    def __call__(self, x):
        idt = self.downsample(x) if self.downsample is not None else x
        return nnx.relu(self.c3(self.c2(self.c1(x))) + idt)


class ResNet(nnx.Module):
    """uint8/float RGB tiles (B, H, W, 3) in 0..255 → (B, 512·4·width/64) features."""

    def __init__(self, *, rngs: nnx.Rngs, stage_sizes=(3, 4, 6, 3), width: int = 64,
                 num_classes: int | None = None):
        self.stem = ConvBN(3, width, 7, 2, act=nnx.relu, rngs=rngs)
        layers, cin = [], width
        for i, n in enumerate(stage_sizes):
            w = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1, rngs=rngs))
                cin = w * Bottleneck.expansion
            layers.append(nnx.List(blocks))
        self.layers = nnx.List(layers)
        self.num_features = cin
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs) if num_classes else None

    @staticmethod
    def normalize(x):
        """0..255 → ImageNet mean/std normalised (torchvision convention)."""
        x = x.astype(jnp.float32) / 255.0
        return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)

    def features(self, x):
        """Normalised (B, H, W, 3), H, W >= 32 → (B, num_features), global-average-pooled."""
        x = max_pool_3x3_s2(self.stem(x))
        for stage in self.layers:
            for block in stage:
                x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def classify(self, feats):
        return self.fc(feats)

    def __call__(self, tiles):
        return self.features(self.normalize(tiles))
