"""Building blocks shared by the backbones (export-friendly by construction).

Padding is always explicit numbers applied with ``jnp.pad`` and convolutions/pools run
"VALID" (see ``resnet.max_pool_3x3_s2`` for the jax2onnx max-pool trap); explicit pads
keep PyTorch-ported weights exact (TF "SAME" pads asymmetrically).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ConvBN", "same_pads", "relu6", "depthwise_shift_add"]


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


def depthwise_shift_add(x, kernel, stride: int):
    """Depthwise conv of padded x (B, H, W, C) with kernel (k, k, 1, C), "VALID", as a sum of
    k² strided slices times per-channel weights.

    XLA's CPU backend runs grouped convolutions 5–13× slower than this (measured per layer
    of EfficientNet-Lite0); on GPU/TPU and in ONNX the native grouped convolution is
    better, so :class:`ConvBN` picks by backend.
    """
    k = kernel.shape[0]
    h = (x.shape[1] - k) // stride + 1
    w = (x.shape[2] - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            term = x[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class ConvBN(nnx.Module):
    """Conv (no bias) → BatchNorm → optional activation; NHWC.

    ``depthwise_impl`` ("auto" | "shift" | "conv") chooses how a depthwise layer runs:
    "auto" uses :func:`depthwise_shift_add` on CPU and the grouped convolution elsewhere
    (the ONNX exporter sets "conv"). The parameters are the same either way.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, *,
                 rngs: nnx.Rngs, act=None, pad_mode: str = "symmetric", bn_eps: float = 1e-5):
        self.k, self.stride, self.pad_mode, self.act = k, stride, pad_mode, act
        self.depthwise = groups > 1 and groups == cin == cout
        self.depthwise_impl = "auto"
        self.conv = nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding="VALID",
                             feature_group_count=groups, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=bn_eps, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        if self.k > 1:
            ph = same_pads(x.shape[1], self.k, self.stride, self.pad_mode)
            pw = same_pads(x.shape[2], self.k, self.stride, self.pad_mode)
            x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
        impl = self.depthwise_impl
        if impl == "auto":
            impl = "shift" if jax.default_backend() == "cpu" else "conv"
        if self.depthwise and impl == "shift":
            x = depthwise_shift_add(x, self.conv.kernel[...], self.stride)
        else:
            x = self.conv(x)
        x = self.bn(x)
        return self.act(x) if self.act is not None else x
