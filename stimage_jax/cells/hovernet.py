"""HoVer-Net-style nucleus segmentation and classification in Flax NNX (Graham et al. 2019).

Network: a pretrained image encoder (EfficientNet-Lite0 by default, ResNet50, or a tiny
CNN for tests) gives feature maps at strides 2, 4, 8, 16 and 32; three U-Net decoders
(nearest ×2 upsampling, concatenation with the skip at that stride, 3×3 ConvBN+ReLU) turn
them into full-resolution maps:

- NP (nucleus pixels): (B, H, W, 2) logits, background / nucleus;
- HV: (B, H, W, 2) horizontal (x) and vertical (y) distance of a nucleus pixel to its
  nucleus's centre of mass, each normalised to [-1, 1] per nucleus (``tanh`` output);
- TC (type classes): (B, H, W, K) logits, K = ``num_types`` (default 5: background,
  immune, stromal, cancer epithelial, endothelial); ``num_types=0`` leaves the branch out
  (MoNuSeg has no types: a decoder trained on nothing would only cost time).

The encoder reuses the backbone modules of ``stimage_jax.features`` (their submodules are
called one by one to read the intermediate maps; the backbone files are unchanged), so
``create_backbone``'s pretrained weights load as they do for spot features. Inputs are
uint8/float RGB 0..255, (B, H, W, 3) with H and W multiples of 32; each backbone's own
input scaling runs inside the model (as in the exported graph).

Differences from HoVer-Net, on purpose: the original's encoder is a pre-activation
ResNet50 and its decoders use dense blocks and valid convolutions (270² in, 80² out);
here the decoders are narrow same-padded U-Net levels (whole patch in, whole patch out),
affordable on a CPU. HV outputs pass through ``tanh`` (the targets lie in [-1, 1]).

Losses follow HoVer-Net's ``models/hovernet/utils.py`` (all weights 1): NP and TC cross
entropy + soft Dice (smooth 1e-3, summed over channels), HV MSE + MSGE (the squared error
of 5×5 Sobel-like gradients, ∂/∂x of the horizontal map and ∂/∂y of the vertical one,
averaged over nucleus pixels). One departure: HoVer-Net's PyTorch port builds its kernels
with ``torch.meshgrid`` ("ij" indexing), which differentiates the horizontal map along
rows; the original TensorFlow code (NumPy "xy" meshgrid) differentiates it along columns,
as the paper describes, and so does this module.

``export_cells_onnx`` writes the network as ONNX with jax2onnx (the traps of
``export/to_onnx.py`` apply: grouped depthwise convolutions, ``value_info`` cleared).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.cell_patches import CELL_TYPES
from data_pipelines.errors import StimageError
from stimage_jax.features.efficientnet_lite import EfficientNetLite
from stimage_jax.features.layers import ConvBN
from stimage_jax.features.registry import DEFAULT_WEIGHTS, create_backbone
from stimage_jax.features.resnet import ResNet, max_pool_3x3_s2
from stimage_jax.features.tiny import TinyCNN

__all__ = ["TYPE_NAMES", "STRIDE", "HoverOutput", "MultiScaleEncoder", "Decoder", "HoVerNet",
           "hovernet_lite0", "hovernet_resnet50", "hovernet_tiny", "PRESETS", "create_hovernet", "init_random",
           "sobel_kernels", "hv_gradient", "xentropy_loss", "dice_loss", "mse_loss", "msge_loss",
           "LOSS_WEIGHTS", "hovernet_loss", "probabilities", "export_cells_onnx", "cells_onnx_proto",
           "set_depthwise_impl"]

# Default type classes (index = class id in TC maps and tables); 0 is background. Defined
# once, beside the type tables that use the same ids.
TYPE_NAMES: tuple[str, ...] = CELL_TYPES
STRIDE = 32  # the encoder's total downsampling: input sides must be multiples of it
# The tiny preset's encoder: five stride-2 ConvBN (TinyCNN's widths), so strides 2..32 exist.
TINY_ENCODER_WIDTHS = (8, 16, 16, 32, 32)


class HoverOutput(NamedTuple):
    """The three branches' raw outputs; ``tc`` is None when the model has no TC branch."""

    np: jax.Array            # (B, H, W, 2) logits
    hv: jax.Array            # (B, H, W, 2) in [-1, 1]: x (horizontal), y (vertical)
    tc: jax.Array | None     # (B, H, W, K) logits


# --- encoder -----------------------------------------------------------------------------------

def _backbone_kind(backbone: nnx.Module) -> str:
    for cls, kind in ((EfficientNetLite, "efficientnet"), (ResNet, "resnet"), (TinyCNN, "tiny")):
        if isinstance(backbone, cls):
            return kind
    raise StimageError(f"no multi-scale encoder for backbone type {type(backbone).__name__}")


class MultiScaleEncoder(nnx.Module):
    """A backbone's submodules, called in its own order, keeping the last map of each stride.

    (B, H, W, 3) 0..255 → [f2, f4, f8, f16, f32], f_s of shape (B, H/s, W/s, channels[i]).
    Only the submodules the maps need are kept (EfficientNet's 1280-channel head and every
    classifier are dropped), so the optimiser holds no parameter without a gradient.
    """

    def __init__(self, backbone: nnx.Module):
        self.kind = _backbone_kind(backbone)
        if self.kind == "efficientnet":
            self.stem, self.blocks = backbone.stem, backbone.blocks
            # A map is complete just before the next stride-2 block (and after the last).
            strides = [b.depthwise.stride for b in self.blocks]
            self.taps = tuple(i for i in range(len(strides)) if i + 1 == len(strides) or strides[i + 1] == 2)
            self.channels = tuple(self.blocks[i].project.conv.out_features for i in self.taps)
        elif self.kind == "resnet":
            self.stem, self.layers = backbone.stem, backbone.layers
            self.channels = (self.stem.conv.out_features,
                             *(stage[-1].c3.conv.out_features for stage in self.layers))
        else:
            self.convs = backbone.convs
            self.channels = tuple(c.conv.out_features for c in self.convs)
        if len(self.channels) != 5:
            raise StimageError(f"{type(backbone).__name__} gives {len(self.channels)} strides, the decoder needs 5 "
                               "(2, 4, 8, 16, 32)")

    def normalize(self, x: jax.Array) -> jax.Array:
        """0..255 → the scaling the backbone's weights expect."""
        cls = {"efficientnet": EfficientNetLite, "resnet": ResNet, "tiny": TinyCNN}[self.kind]
        return cls.normalize(x)

    def __call__(self, tiles: jax.Array, frozen_levels: int = 0) -> list[jax.Array]:
        """``frozen_levels`` k: no gradient flows into the layers producing f2..f_(2^k).

        On CPU the backward pass through the high-resolution stages costs most of a
        training step (EfficientNet-Lite0 at 256²: ~3 of ~4 s); their ImageNet filters
        (edges, colour blobs) need the least adaptation.
        """
        out: list[jax.Array] = []

        def tap(x):
            x = jax.lax.stop_gradient(x) if len(out) < frozen_levels else x
            out.append(x)
            return x

        x = self.normalize(tiles)
        if self.kind == "efficientnet":
            x = self.stem(x)
            for i, b in enumerate(self.blocks):
                x = b(x)
                if i in self.taps:
                    x = tap(x)
            return out
        if self.kind == "resnet":
            x = max_pool_3x3_s2(tap(self.stem(x)))
            for stage in self.layers:
                for block in stage:
                    x = block(x)
                x = tap(x)
            return out
        for c in self.convs:
            x = tap(c(x))
        return out


# --- decoders ----------------------------------------------------------------------------------

def upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour ×2 of (B, H, W, C) → (B, 2H, 2W, C).

    ``jnp.repeat`` rather than ``jax.image.resize``: the latter does not export with a
    symbolic batch (jax2onnx 0.17.1), and nearest ×2 followed by a 3×3 conv is all a
    decoder level needs.
    """
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Decoder(nnx.Module):
    """U-Net decoder: [f2, f4, f8, f16, f32] (+ the scaled image) → (B, H, W, out) at stride 1.

    Level s (16, 8, 4, 2): upsample ×2, concatenate f_s, ``convs`` 3×3 ConvBN+ReLU of
    ``widths``; the last level (stride 1) concatenates the scaled input image instead of a
    skip (sharp nucleus borders need full-resolution evidence), then a 1×1 conv with bias.
    """

    def __init__(self, enc_channels: Sequence[int], widths: Sequence[int], out: int, *,
                 convs: Sequence[int], rngs: nnx.Rngs):
        if len(widths) != 5 or len(convs) != 5:
            raise StimageError(f"decoder widths and convs need 5 levels (16, 8, 4, 2, 1), got {widths}, {convs}")
        skips = (*enc_channels[3::-1], 3)   # f16, f8, f4, f2, image
        levels, cin = [], enc_channels[4]
        for w, n, skip in zip(widths, convs, skips):
            layers = []
            for j in range(n):
                layers.append(ConvBN(cin + skip if j == 0 else w, w, 3, act=nnx.relu, rngs=rngs))
            levels.append(nnx.List(layers))
            cin = w
        self.levels = nnx.List(levels)
        self.out = nnx.Conv(cin, out, (1, 1), rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], image: jax.Array) -> jax.Array:
        x = feats[4]
        for level, skip in zip(self.levels, (*feats[3::-1], image)):
            x = jnp.concatenate([upsample2(x), skip], axis=-1)
            for conv in level:
                x = conv(x)
        return self.out(x)


class HoVerNet(nnx.Module):
    """uint8/float RGB (B, H, W, 3) in 0..255, H, W multiples of 32 → :class:`HoverOutput`.

    ``backbone``: a name of the registry (``efficientnet_lite0``, ``resnet50``, ``tiny``:
    TinyCNN of :data:`TINY_ENCODER_WIDTHS`); ``weights``: None (random), ``"default"``
    (the registry's ``DEFAULT_WEIGHTS``) or a file. The encoder is always created in eval
    mode by the registry; training decides which parts run in train mode.
    """

    def __init__(self, *, rngs: nnx.Rngs, backbone: str = "efficientnet_lite0",
                 weights: str | os.PathLike | None = None, num_types: int = len(TYPE_NAMES),
                 decoder_widths: Sequence[int] = (96, 64, 32, 24, 16),
                 decoder_convs: Sequence[int] = (1, 1, 1, 1, 1)):
        if num_types == 1 or num_types < 0:
            raise StimageError(f"num_types must be 0 (no TC branch) or >= 2 (background + types), got {num_types}")
        if backbone == "tiny":
            if weights not in (None, "none"):
                raise StimageError("the tiny encoder has no pretrained weights")
            bb = TinyCNN(rngs=rngs, widths=TINY_ENCODER_WIDTHS)
        else:
            w = DEFAULT_WEIGHTS.get(backbone) if weights == "default" else (None if weights == "none" else weights)
            if weights == "default" and w is None:
                raise StimageError(f"backbone {backbone} has no default weights; pass a weights file or none")
            bb = create_backbone(backbone, rngs=rngs, weights=w)
        self.encoder = MultiScaleEncoder(bb)
        self.num_types = int(num_types)
        ch = self.encoder.channels
        kw = dict(convs=tuple(decoder_convs), rngs=rngs)
        self.np_decoder = Decoder(ch, decoder_widths, 2, **kw)
        self.hv_decoder = Decoder(ch, decoder_widths, 2, **kw)
        self.tc_decoder = Decoder(ch, decoder_widths, num_types, **kw) if num_types else None

    def __call__(self, tiles: jax.Array, frozen_levels: int = 0) -> HoverOutput:
        """``frozen_levels``: see :meth:`MultiScaleEncoder.__call__` (training only)."""
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise StimageError(f"HoVerNet expects RGB (B, H, W, 3), got shape {tuple(tiles.shape)}")
        h, w = tiles.shape[1], tiles.shape[2]
        if isinstance(h, int) and isinstance(w, int) and (h % STRIDE or w % STRIDE):
            raise StimageError(f"HoVerNet input sides must be multiples of {STRIDE}, got {h}×{w} (pad the image)")
        feats = self.encoder(tiles, frozen_levels)
        image = self.encoder.normalize(tiles)
        np_logits = self.np_decoder(feats, image)
        hv = jnp.tanh(self.hv_decoder(feats, image))
        tc = self.tc_decoder(feats, image) if self.tc_decoder is not None else None
        return HoverOutput(np_logits, hv, tc)


# Sizes as ``functools.partial`` presets (the registry's convention). Lite0: ~5 M encoder
# parameters at ImageNet weights, three narrow decoders; tiny: a few thousand parameters,
# for tests at 64×64.
hovernet_lite0 = functools.partial(HoVerNet, backbone="efficientnet_lite0",
                                   decoder_widths=(96, 64, 32, 24, 16))
hovernet_resnet50 = functools.partial(HoVerNet, backbone="resnet50", decoder_widths=(128, 96, 64, 32, 16))
hovernet_tiny = functools.partial(HoVerNet, backbone="tiny", decoder_widths=(16, 16, 8, 8, 8))
PRESETS: dict[str, Callable[..., HoVerNet]] = {"efficientnet_lite0": hovernet_lite0, "resnet50": hovernet_resnet50,
                                               "tiny": hovernet_tiny}


def init_random(module: nnx.Module, seed: int = 0) -> None:
    """Fill every array of ``module`` (possibly abstract, from ``nnx.eval_shape``) in NumPy.

    Flax's own initialisers: kernels LeCun normal (truncated at 2σ, variance 1/fan_in,
    fan_in = every axis but the last), biases 0, BatchNorm scale 1, bias 0, mean 0, var 1.
    Drawn in NumPy because on CPU each JAX ``random`` call compiles once per parameter
    shape: a fresh HoVer-Net took 20–30 s to initialise on 2 busy cores, NumPy ~0.1 s.
    """
    rng = np.random.default_rng(seed)
    state = nnx.state(module)
    pure = nnx.to_pure_dict(state)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if name == "kernel":
            std = 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1)) / 0.87962566103423978
            return jnp.asarray(np.clip(rng.standard_normal(shape), -2, 2) * std, dtype)
        if name in ("scale", "var"):
            return jnp.ones(shape, dtype)
        return jnp.zeros(shape, dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, pure))
    nnx.update(module, state)


def create_hovernet(backbone: str = "efficientnet_lite0", *, seed: int = 0, weights: str | os.PathLike | None = None,
                    num_types: int = len(TYPE_NAMES)) -> HoVerNet:
    """The preset of ``backbone`` (efficientnet_lite0 | resnet50 | tiny), in eval mode.

    ``weights``: None/"none" (random), "default" (the registry's ImageNet weights) or a
    file; they fill the encoder, everything else is drawn by :func:`init_random`.
    """
    if backbone not in PRESETS:
        raise StimageError(f"unknown cells backbone {backbone!r}; choose from {', '.join(PRESETS)}")
    if weights == "none":
        weights = None
    if backbone == "tiny" and weights is not None:
        raise StimageError("the tiny encoder has no pretrained weights")
    if weights == "default":
        weights = DEFAULT_WEIGHTS.get(backbone)
        if weights is None:
            raise StimageError(f"backbone {backbone} has no default weights; pass a weights file or none")
    net = nnx.eval_shape(lambda: PRESETS[backbone](rngs=nnx.Rngs(0), weights=None, num_types=num_types))
    init_random(net, seed)
    if weights is not None:
        # create_backbone builds abstractly and loads every array from the file (strict).
        enc = MultiScaleEncoder(create_backbone(backbone, rngs=nnx.Rngs(0), weights=weights))
        nnx.update(net.encoder, nnx.state(enc))
    net.eval()
    return net


def probabilities(out: HoverOutput) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(np (B, H, W) nucleus probability, hv (B, H, W, 2), tc (B, H, W, K) softmax or None)."""
    p_np = jax.nn.softmax(out.np, axis=-1)[..., 1]
    p_tc = jax.nn.softmax(out.tc, axis=-1) if out.tc is not None else None
    return p_np, out.hv, p_tc


# --- losses (pure functions) -----------------------------------------------------------------------

def xentropy_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross entropy of (..., C) logits against (...) int labels over ``mask`` pixels.

    HoVer-Net's ``xentropy_loss`` (−Σ_c t_c log p_c, averaged over pixels), computed from
    log-softmax rather than a clamped softmax. ``mask`` (...) of 0/1 leaves pixels out
    (labels there may be anything, e.g. −1 for unknown types).
    """
    c = logits.shape[-1]
    onehot = jax.nn.one_hot(jnp.clip(labels, 0, c - 1), c, dtype=logits.dtype)
    nll = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    if mask is None:
        return jnp.mean(nll)
    m = mask.astype(logits.dtype)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def dice_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
              smooth: float = 1e-3) -> jax.Array:
    """Soft Dice loss, HoVer-Net's ``dice_loss``: Σ_c 1 − (2 Σ p t + s) / (Σ p + Σ t + s).

    (B, H, W, C) logits (softmaxed here) against (B, H, W) int labels; sums run over batch
    and pixels (within ``mask``), the result is summed over the C channels.
    """
    c = logits.shape[-1]
    p = jax.nn.softmax(logits, axis=-1)
    t = jax.nn.one_hot(jnp.clip(labels, 0, c - 1), c, dtype=p.dtype)
    if mask is not None:
        m = mask.astype(p.dtype)[..., None]
        p, t = p * m, t * m
    axes = tuple(range(p.ndim - 1))
    inter = jnp.sum(p * t, axis=axes)
    return jnp.sum(1.0 - (2.0 * inter + smooth) / (jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes) + smooth))


def mse_loss(pred: jax.Array, true: jax.Array) -> jax.Array:
    """Mean squared error over every element (HoVer-Net's HV ``mse_loss``)."""
    return jnp.mean(jnp.square(pred - true))


def sobel_kernels(size: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(kx, ky), each (size, size) float32: HoVer-Net's gradient kernels h/(h²+v²), v/(h²+v²).

    Row index = y, column index = x; ``kx`` increases along columns. Applied as a
    correlation, a map increasing by 1 per column gives the same positive response
    Σ h²/(h²+v²) everywhere inside (not 1: the kernels are not normalised, as in HoVer-Net).
    """
    if size % 2 != 1 or size < 3:
        raise StimageError(f"Sobel kernel size must be odd and >= 3, got {size}")
    r = np.arange(-(size // 2), size // 2 + 1, dtype=np.float32)
    h, v = np.meshgrid(r, r)  # "xy": h varies along columns (x), v along rows (y)
    denom = h * h + v * v + 1e-15
    return (h / denom).astype(np.float32), (v / denom).astype(np.float32)


def hv_gradient(hv: jax.Array, size: int = 5) -> jax.Array:
    """(B, H, W, 2) HV maps → (B, H, W, 2): ∂x of the horizontal map, ∂y of the vertical one.

    Correlation with :func:`sobel_kernels`, zero padding ``size // 2`` (HoVer-Net's
    ``F.conv2d(..., padding=2)``).
    """
    kx, ky = sobel_kernels(size)
    # One depthwise convolution: channel 0 (x map) with kx, channel 1 (y map) with ky.
    kernel = jnp.asarray(np.stack([kx, ky], axis=-1)[:, :, None, :])  # (k, k, 1, 2) HWIO
    pad = size // 2
    return jax.lax.conv_general_dilated(hv, kernel.astype(hv.dtype), (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)


def msge_loss(pred: jax.Array, true: jax.Array, focus: jax.Array, size: int = 5) -> jax.Array:
    """Mean squared gradient error within nuclei (HoVer-Net's ``msge_loss``).

    pred, true (B, H, W, 2); focus (B, H, W) nucleus mask. Σ focus·(∇pred − ∇true)² over
    both channels / (2 Σ focus + 1e-8) (HoVer-Net stacks the mask on both channels).
    """
    f = jnp.broadcast_to(focus.astype(pred.dtype)[..., None], pred.shape)
    diff = hv_gradient(pred, size) - hv_gradient(true, size)
    return jnp.sum(f * jnp.square(diff)) / (jnp.sum(f) + 1e-8)


# HoVer-Net's defaults (``opt.py``): every term weighted 1.
LOSS_WEIGHTS: dict[str, float] = {"np_ce": 1.0, "np_dice": 1.0, "hv_mse": 1.0, "hv_msge": 1.0,
                                  "tc_ce": 1.0, "tc_dice": 1.0}


def hovernet_loss(out: HoverOutput, np_t: jax.Array, hv_t: jax.Array, tc_t: jax.Array | None = None,
                  weights: dict[str, float] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total weighted loss and its terms.

    np_t (B, H, W) int {0, 1}; hv_t (B, H, W, 2) float; tc_t (B, H, W) int, −1 = unknown type
    (left out of TC's cross entropy and Dice), None or a model without TC → no TC terms.
    """
    w = LOSS_WEIGHTS if weights is None else {**LOSS_WEIGHTS, **weights}
    terms = {"np_ce": xentropy_loss(out.np, np_t), "np_dice": dice_loss(out.np, np_t),
             "hv_mse": mse_loss(out.hv, hv_t), "hv_msge": msge_loss(out.hv, hv_t, np_t)}
    if out.tc is not None and tc_t is not None:
        known = tc_t >= 0
        terms["tc_ce"] = xentropy_loss(out.tc, tc_t, known)
        terms["tc_dice"] = dice_loss(out.tc, tc_t, known)
    total = sum(w[k] * v for k, v in terms.items())
    return total, terms


# --- ONNX export -------------------------------------------------------------------------------------

def set_depthwise_impl(module: nnx.Module, impl: str) -> None:
    """Set every ConvBN's depthwise path ("auto" | "shift" | "conv"), as export/to_onnx does."""
    for _, sub in nnx.iter_graph(module):
        if hasattr(sub, "depthwise_impl"):
            sub.depthwise_impl = impl


def cells_onnx_proto(model: HoVerNet, *, size: int = 256, metadata: dict | None = None, opset: int = 23):
    """``model`` as an ONNX ModelProto: ``tiles`` uint8 (B, size, size, 3), dynamic B →
    ``np`` (B, size, size) nucleus probability, ``hv`` (B, size, size, 2) and, with a TC
    branch, ``tc`` (B, size, size, K) type probabilities.

    Post-processing (:mod:`stimage_jax.cells.postprocess`) is NumPy and stays outside the
    graph. ``metadata`` (JSON-able values) goes to ``metadata_props`` with the type names.
    """
    import onnx
    from jax2onnx import to_onnx

    if size <= 0 or size % STRIDE:
        raise StimageError(f"ONNX input size must be a positive multiple of {STRIDE}, got {size}")
    model.eval()

    def fn(tiles):
        p_np, hv, p_tc = probabilities(model(tiles))
        return (p_np, hv, p_tc) if p_tc is not None else (p_np, hv)

    names = ["np", "hv", "tc"] if model.num_types else ["np", "hv"]
    spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("B")[0], size, size, 3), jnp.uint8)
    set_depthwise_impl(model, "conv")  # ONNX runtimes have fast grouped convolutions
    try:
        proto = to_onnx(fn, [spec], model_name="stimage_cells", opset=opset, input_names=["tiles"],
                        output_names=names)
    finally:
        set_depthwise_impl(model, "auto")
    del proto.graph.value_info[:]  # jax2onnx leaves stale shapes on residual nets
    # jax2onnx writes relu as Max(x, 0), which onnxruntime neither fuses into the convolution
    # nor quantises with it; the spot exporter's rewrite applies unchanged
    from export.to_onnx import max0_to_relu

    max0_to_relu(proto)
    meta = {"format": "stimage-jax-cells-onnx/1", "size": size, "num_types": model.num_types,
            "type_names": list(TYPE_NAMES[:model.num_types]), **(metadata or {})}
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
    onnx.checker.check_model(proto)
    return proto


def export_cells_onnx(model: HoVerNet, path: str | os.PathLike, *, size: int = 256, overwrite: bool = False,
                      metadata: dict | None = None, opset: int = 23) -> Path:
    """Write :func:`cells_onnx_proto` of ``model`` to ``path`` (atomically); returns the path."""
    import onnx

    from data_pipelines.io import atomic_path, check_writable

    path = Path(path)
    check_writable(path, overwrite)
    proto = cells_onnx_proto(model, size=size, metadata=metadata, opset=opset)
    with atomic_path(path, overwrite=overwrite) as tmp:
        onnx.save_model(proto, tmp)
    return path
