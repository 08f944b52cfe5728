"""Building blocks shared by the backbones (export-friendly by construction).

Padding is always explicit numbers applied with ``jnp.pad`` and convolutions/pools run
"VALID": jax2onnx 0.17.1 silently drops explicit tuple padding on ``nnx.max_pool``, and
explicit pads keep PyTorch-ported weights exact (TF "SAME" pads asymmetrically).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

__all__ = ["ConvBN", "same_pads", "max_pool_3x3_s2", "relu6"]


def relu6(x):
    return jnp.clip(x, 0.0, 6.0)


def same_pads(size: int, k: int, s: int, mode: str) -> tuple[int, int]:
    """(before, after) padding of one spatial axis.

    mode "symmetric": PyTorch's ``k // 2`` on both sides; "tf_same": TensorFlow SAME
    (total ``max((ceil(n/s) - 1) s + k - n, 0)``, the extra pixel after).
    """
    if mode == "symmetric":
        return k // 2, k // 2
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class ConvBN(nnx.Module):
    """Conv (no bias) → BatchNorm → optional activation; NHWC."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, *,
                 rngs: nnx.Rngs, act=None, pad_mode: str = "symmetric", bn_eps: float = 1e-5):
        self.k, self.stride, self.pad_mode, self.act = k, stride, pad_mode, act
        self.conv = nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding="VALID",
                             feature_group_count=groups, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=bn_eps, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        if self.k > 1:
            ph = same_pads(x.shape[1], self.k, self.stride, self.pad_mode)
            pw = same_pads(x.shape[2], self.k, self.stride, self.pad_mode)
            x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
        x = self.bn(self.conv(x))
        return self.act(x) if self.act is not None else x


def max_pool_3x3_s2(x):
    """ResNet's 3×3 stride-2 max-pool with padding 1: pad with -inf, then VALID."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
