"""Global context of a spot (issue 21; TRIPLEX's global branch): a larger field of view
around each spot — e.g. 300 or 500 µm instead of the 100 µm tile — cut from the section's
image and resized to the backbone's input, i.e. a lower-magnification view of the tissue
around the spot (the gland, the stroma). Its frozen features are combined with the tile's
own:

- ``concat``: ``[own, global]`` (N, 2D);
- ``mean``: ``(own + global) / 2`` (N, D) — no extra input width for the head to overfit;
- ``pca``: ``[own, PCA_k(global)]`` (N, D + k), the projection fitted on the training
  samples' global features only.

Field tiles are cut by :func:`data_pipelines.tiles.spot_tiles` (the same centring, white
padding past the image edge and resizing as the spot tiles) and cached by the image's
content and the geometry; their features are cached by the field tiles' content digest
and the weights' hash, like the spot features. Nothing reads expression.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["GLOBAL_MODES", "DEFAULT_PCA_DIM", "field_tiles", "global_features", "fit_pca", "apply_pca",
           "combine_global"]

GLOBAL_MODES = ("concat", "mean", "pca")
DEFAULT_PCA_DIM = 64


def field_tiles(adata, field_um: float, tile_px: int, *, cache_dir: Path | None = None, stain=None,
                progress: bool = True) -> np.ndarray:
    """(N, tile_px, tile_px, 3) uint8: the ``field_um`` µm square centred on each spot,
    resized to ``tile_px`` (a lower-magnification view when ``field_um`` exceeds the spot
    tile's side). ``adata.obs`` is left untouched (the spot tiles' border fraction stays)."""
    from data_pipelines.tiles import spot_tiles

    if not (np.isfinite(field_um) and field_um > 0):
        raise StimageError(f"global context field must be a positive size in µm, got {field_um}")
    view = adata if adata.is_view else adata[:]  # spot_tiles records obs["tile_border_frac"] only on non-views
    return spot_tiles(view, tile_um=float(field_um), tile_px=tile_px, cache_dir=cache_dir, progress=progress,
                      stain=stain)


def global_features(backbone, adata, field_um: float, tile_px: int, *, sample: str, backbone_name: str,
                    weights_fp: str, cache: Path | None, views: int = 1, stain=None,
                    progress: bool = True) -> np.ndarray:
    """(N, D) frozen features of each spot's ``field_um`` field (mean over ``views``
    dihedral views: 1, 4 or 8). Field tiles cached under ``cache/tiles``, features under
    ``cache/features`` named by the field tiles' content digest and the weights' hash."""
    from stimage_jax.features.tta import tta_features
    from stimage_jax.pipeline import tiles_digest

    tiles = field_tiles(adata, field_um, tile_px, cache_dir=None if cache is None else cache / "tiles", stain=stain,
                        progress=progress)
    stem = None if cache is None else cache / "features" / (
        f"{sample}__{backbone_name}__{weights_fp}__g{field_um:g}um__{tiles_digest(tiles)}")
    return tta_features(backbone, tiles, views, stem, progress=progress, desc=f"global {field_um:g} µm {sample}")


def fit_pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of (N, D) rows (scikit-learn, full SVD) → (mean (D,), components (k', D)),
    k' = min(k, N, D), components orthonormal, ordered by explained variance, each signed so
    its largest-|loading| entry is positive (deterministic across SVD implementations)."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise StimageError(f"PCA needs an (N >= 2, D) feature matrix, got shape {x.shape}")
    if k < 1:
        raise StimageError(f"PCA needs k >= 1 components, got {k}")
    pca = PCA(n_components=min(k, *x.shape), svd_solver="full").fit(x)
    comp = pca.components_
    sign = np.sign(comp[np.arange(len(comp)), np.abs(comp).argmax(1)])
    return pca.mean_.astype(np.float32), (comp * sign[:, None]).astype(np.float32)


def apply_pca(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(N, D) → (N, k) scores ``(x − mean) · componentsᵀ``."""
    return ((np.asarray(x, np.float64) - mean) @ np.asarray(components, np.float64).T).astype(np.float32)


def combine_global(own: np.ndarray, glob: np.ndarray, mode: str,
                   pca: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Own (N, D) and global (N, D) features → the head's input: ``concat`` (N, 2D),
    ``mean`` (N, D) or ``pca`` (N, D + k) with ``pca = (mean, components)`` from
    :func:`fit_pca` on training samples."""
    own, glob = np.asarray(own, np.float32), np.asarray(glob, np.float32)
    if own.shape != glob.shape or own.ndim != 2:
        raise StimageError(f"own and global features must be equal (N, D) arrays, got {own.shape} and {glob.shape}")
    if mode == "concat":
        return np.concatenate([own, glob], axis=1)
    if mode == "mean":
        return (0.5 * (own + glob)).astype(np.float32)
    if mode == "pca":
        if pca is None:
            raise StimageError("global context mode 'pca' needs a fitted projection (fit_pca on training samples)")
        return np.concatenate([own, apply_pca(glob, *pca)], axis=1)
    raise StimageError(f"unknown global context mode {mode!r}; choose from {', '.join(GLOBAL_MODES)}")
