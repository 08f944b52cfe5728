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
    """safetensors (always) or .pth/.pt/.bin (only when torch is installed) → {key: array}."""
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"weights file {path} not found")
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise StimageError(f"{path} is a PyTorch pickle and torch is not installed; convert it with "
                               "safetensors.torch.save_file or install torch") from None
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise StimageError(f"weights file {path} is not a readable PyTorch checkpoint "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        for wrapper in ("state_dict", "model"):  # training checkpoints nest the state dict
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
        sd = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
              for k, v in sd.items() if hasattr(v, "numpy")}
    else:
        try:
            from safetensors.numpy import load_file

            sd = load_file(str(path))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise StimageError(f"weights file {path} is not a readable safetensors file "
                               f"({type(e).__name__}: {msg})") from None
    # nn.DataParallel / DistributedDataParallel save every key under "module."
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


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


_NDIM = {"conv": 4, "linear": 2, "vec": 1}


def _convert(arr: np.ndarray, kind: str) -> np.ndarray:
    """PyTorch layout → Flax layout.

    conv (O, I/groups, kh, kw) → (kh, kw, I/groups, O): also right for depthwise
    (C, 1, k, k) → (k, k, 1, C), Flax's ``feature_group_count`` kernel layout;
    linear (out, in) → (in, out); vectors unchanged.
    """
    if kind == "conv":
        return np.transpose(arr, (2, 3, 1, 0))
    if kind == "linear":
        return arr.T
    return arr


def _torch_shape(flax_shape: tuple, kind: str) -> tuple:
    """Inverse of :func:`_convert` on shapes, for error messages in the file's layout."""
    if kind == "conv":
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    return tuple(reversed(flax_shape)) if kind == "linear" else tuple(flax_shape)


def load_weights(model, path: str | os.PathLike, *, name: str = "") -> nnx.Module:
    """Load a PyTorch state dict file into ``model`` in place; return the model.

    Strict both ways: every model array must come from the file (so an abstract model
    from ``nnx.eval_shape`` is fully materialised) and every file tensor must be used,
    except the ImageNet classifier (``fc``/``_fc``) when the model has none.
    """
    arch = name or type(model).__name__
    sd = {k: v for k, v in read_state_dict(path).items() if not k.endswith("num_batches_tracked")}
    kmap = torch_key_map(model)
    has_fc = any(k.split(".")[0] in ("fc", "_fc") for k in kmap)
    if not has_fc:  # a feature extractor ignores the ImageNet classifier in the file
        sd = {k: v for k, v in sd.items() if k.split(".")[0] not in ("fc", "_fc")}
    missing = [k for k in kmap if k not in sd]
    if missing:
        raise StimageError(f"{path}: {len(missing)} weight(s) missing for {arch}, "
                           f"first {missing[0]!r} (is this the right architecture?)")
    extra = [k for k in sd if k not in kmap]
    if extra:
        raise StimageError(f"{path}: {len(extra)} unexpected weight(s) for {arch}, first {extra[0]!r} "
                           f"(is this the right architecture?)")
    state = nnx.state(model)
    targets = {p for p, _ in kmap.values()}
    unmapped = [p for p, _ in nnx.to_flat_state(state) if tuple(p) not in targets]
    if unmapped:  # a bug in the key map, not in the file: never leave a layer random
        raise StimageError(f"{arch}: model array {'.'.join(map(str, unmapped[0]))} has no PyTorch key "
                           f"({len(unmapped)} in all)")
    pure = nnx.to_pure_dict(state)
    for key, (p, kind) in kmap.items():
        node = pure
        for part in p[:-1]:
            node = node[part]
        want = tuple(node[p[-1]].shape)
        arr = np.asarray(sd[key])
        if arr.ndim != _NDIM[kind] or _convert(arr, kind).shape != want:
            raise StimageError(f"{path}: weight {key!r} has shape {tuple(arr.shape)}, "
                               f"expected {_torch_shape(want, kind)} (PyTorch layout)")
        if not np.issubdtype(arr.dtype, np.floating):
            raise StimageError(f"{path}: weight {key!r} has dtype {arr.dtype}, expected floating point")
        node[p[-1]] = jnp.asarray(_convert(arr, kind), jnp.float32)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model
