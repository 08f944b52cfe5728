"""Image feature extractors (Flax NNX) and PyTorch weight import."""

from stimage_jax.features.registry import BACKBONES, DEFAULT_WEIGHTS, create_backbone
from stimage_jax.features.weights import load_weights

__all__ = ["BACKBONES", "DEFAULT_WEIGHTS", "create_backbone", "load_weights"]
