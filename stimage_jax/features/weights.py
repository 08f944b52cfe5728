"""Import PyTorch state dicts (torchvision/timm ResNet, efficientnet-lite-pytorch) into NNX.

Every tensor of the file must land on exactly one parameter of the model and every
parameter must be set: a partial load is an error, never a silent random layer.
Layouts: conv OIHW → HWIO (depthwise (C,1,k,k) → (k,k,1,C) is the same transpose),
linear (out, in) → (in, out), BatchNorm weight/bias/running_mean/running_var →
scale/bias/mean/var; ``num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.errors import StimageError

__all__ = ["load_weights", "read_state_dict", "torch_key_map"]

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """safetensors (always) or .pth/.pt (only when torch is installed) → numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"weights file {path} not found")
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise StimageError(f"{path} is a PyTorch pickle and torch is not installed; convert it with "
                               "safetensors.torch.save_file or install torch") from None
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        return {k: v.numpy() for k, v in sd.items()}
    try:
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as e:
        raise StimageError(f"weights file {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _conv_bn(prefix_conv: str, prefix_bn: str, path: tuple) -> dict:
    m = {f"{prefix_conv}.weight": (path + ("conv", "kernel"), "conv")}
    m.update({f"{prefix_bn}.{t}": (path + ("bn", j), "vec") for t, j in _BN.items()})
    return m


def _fc(prefix: str, path: tuple = ("fc",)) -> dict:
    return {f"{prefix}.weight": (path + ("kernel",), "linear"), f"{prefix}.bias": (path + ("bias",), "vec")}


def torch_key_map(model) -> dict[str, tuple[tuple, str]]:
    """PyTorch key → (path in the NNX pure state dict, layout kind) for ``model``."""
    from stimage_jax.features.efficientnet_lite import EfficientNetLite
    from stimage_jax.features.resnet import ResNet

    m: dict = {}
    if isinstance(model, EfficientNetLite):
        m.update(_conv_bn("_conv_stem", "_bn0", ("stem",)))
        for i, b in enumerate(model.blocks):
            p = f"_blocks.{i}"
            if b.expand is not None:
                m.update(_conv_bn(f"{p}._expand_conv", f"{p}._bn0", ("blocks", i, "expand")))
            m.update(_conv_bn(f"{p}._depthwise_conv", f"{p}._bn1", ("blocks", i, "depthwise")))
            m.update(_conv_bn(f"{p}._project_conv", f"{p}._bn2", ("blocks", i, "project")))
        m.update(_conv_bn("_conv_head", "_bn1", ("head",)))
        if model.fc is not None:
            m.update(_fc("_fc"))
    elif isinstance(model, ResNet):
        m.update(_conv_bn("conv1", "bn1", ("stem",)))
        for i, stage in enumerate(model.layers):
            for j, blk in enumerate(stage):
                p = f"layer{i + 1}.{j}"
                for k in (1, 2, 3):
                    m.update(_conv_bn(f"{p}.conv{k}", f"{p}.bn{k}", ("layers", i, j, f"c{k}")))
                if blk.downsample is not None:
                    m.update(_conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", ("layers", i, j, "downsample")))
        if model.fc is not None:
            m.update(_fc("fc"))
    else:
        raise StimageError(f"no PyTorch weight mapping for {type(model).__name__}")
    return m


def _convert(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(arr, (2, 3, 1, 0))
    if kind == "linear":
        return arr.T
    return arr


def load_weights(model, path: str | os.PathLike, *, name: str = "") -> nnx.Module:
    """Load a PyTorch state dict file into ``model`` in place; return the model."""
    sd = {k: v for k, v in read_state_dict(path).items() if not k.endswith("num_batches_tracked")}
    kmap = torch_key_map(model)
    has_fc = any(k.split(".")[0] in ("fc", "_fc") for k in kmap)
    if not has_fc:  # a feature extractor ignores the ImageNet classifier in the file
        sd = {k: v for k, v in sd.items() if k.split(".")[0] not in ("fc", "_fc")}
    missing = [k for k in kmap if k not in sd]
    if missing:
        raise StimageError(f"{path}: {len(missing)} weight(s) missing for {name or type(model).__name__}, "
                           f"first {missing[0]!r} (is this the right architecture?)")
    extra = [k for k in sd if k not in kmap]
    if extra:
        raise StimageError(f"{path}: {len(extra)} unexpected weight(s), first {extra[0]!r} "
                           f"(is this the right architecture?)")
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    for key, (p, kind) in kmap.items():
        node = pure
        for part in p[:-1]:
            node = node[part]
        want = node[p[-1]].shape
        got = _convert(np.asarray(sd[key]), kind)
        if got.shape != tuple(want):
            raise StimageError(f"{path}: weight {key!r} has shape {tuple(sd[key].shape)}, "
                               f"expected {tuple(want)} after layout conversion")
        node[p[-1]] = jnp.asarray(got, jnp.float32)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model
