"""Backbone registry: model sizes as ``functools.partial`` (as the Flax ImageNet example)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from flax import nnx

from data_pipelines.errors import StimageError
from data_pipelines.paths import shared_dir
from stimage_jax.features.efficientnet_lite import EfficientNetLite
from stimage_jax.features.resnet import ResNet
from stimage_jax.features.tiny import TinyCNN
from stimage_jax.features.weights import load_weights

__all__ = ["BACKBONES", "DEFAULT_WEIGHTS", "create_backbone", "shared_dir"]

BACKBONES: dict[str, Callable[..., nnx.Module]] = {
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)),
    "resnet_tiny": functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=4),
    "efficientnet_lite0": EfficientNetLite,
    "tiny": TinyCNN,
}


def _default_weights() -> dict[str, Path | None]:
    # The path is given even when the file is absent, so a run without ``shared/`` fails
    # with "weights file ... not found" instead of silently using random features.
    return {"efficientnet_lite0": shared_dir() / "weights" / "efficientnet_lite0_imagenet.safetensors",
            "resnet50": None,  # ImageNet ResNet50 weights are not shipped: the user passes a file
            "resnet_tiny": None, "tiny": None}


DEFAULT_WEIGHTS = _default_weights()


def create_backbone(name: str, *, rngs: nnx.Rngs, weights: str | os.PathLike | None = None,
                    num_classes: int | None = None) -> nnx.Module:
    """Build backbone ``name`` in eval mode, loading a PyTorch state dict if given.

    With ``weights`` the model is built abstractly (``nnx.eval_shape``) and every array
    comes from the file (``load_weights`` is strict both ways): random initialisation
    costs seconds of XLA compilation per distinct kernel shape on CPU and would be
    overwritten anyway. ``rngs`` is then unused.
    """
    if name not in BACKBONES:
        raise StimageError(f"unknown backbone {name!r}; choose from {', '.join(sorted(BACKBONES))}")
    build = functools.partial(BACKBONES[name], num_classes=num_classes)
    if weights is None:
        model = build(rngs=rngs)
    else:
        model = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
        load_weights(model, weights, name=name)
    model.eval()
    return model
