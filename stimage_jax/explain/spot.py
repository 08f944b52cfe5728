"""Explain one spot (or one tile image) end to end: find its tile, run an explainer,
write the overlay PNG and the numbers next to it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path

__all__ = ["spot_tile", "read_tile", "write_overlay", "explain_saliency", "latent_figure"]


def spot_tile(adata, model, spot: str) -> np.ndarray:
    """The (px, px, 3) uint8 tile the model sees for ``spot`` (stain-normalised as it was)."""
    from data_pipelines.tiles import spot_tiles

    if spot not in adata.obs_names:
        raise StimageError(f"spot {spot!r} is not in the data ({adata.n_obs} spots, e.g. {adata.obs_names[0]})")
    one = adata[[spot]].copy()
    um, px = tile_geometry_of(model)
    return np.asarray(spot_tiles(one, tile_um=um, tile_px=px, progress=False, stain=model.stain))[0]


def tile_geometry_of(model) -> tuple[float, int]:
    """(tile_um, tile_px) of any predictor (JAX model or ONNX session)."""
    return float(model.tile_um), int(model.tile_px)


def read_tile(path: str | os.PathLike, tile_px: int) -> np.ndarray:
    """A tile image file → (px, px, 3) uint8; it must already have the model's size."""
    from data_pipelines.tiles import load_image

    img = load_image(path)
    if img.shape[:2] != (tile_px, tile_px):
        raise StimageError(f"tile {path} is {img.shape[1]}x{img.shape[0]} px; the model reads {tile_px}x{tile_px}")
    return img


def write_overlay(tile: np.ndarray, heat: np.ndarray, path: str | os.PathLike, *, title: str = "",
                  cmap: str = "inferno", signed: bool = False) -> Path:
    """Tile | heat map | overlay, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(10.5, 3.6))
    ax[0].imshow(tile)
    ax[0].set_title("tile", fontsize=9)
    lim = float(np.abs(heat).max()) or 1.0
    kw = dict(cmap="RdBu_r", vmin=-lim, vmax=lim) if signed else dict(cmap=cmap)
    im = ax[1].imshow(heat, **kw)
    fig.colorbar(im, ax=ax[1], shrink=0.8)
    ax[1].set_title(title, fontsize=9)
    ax[2].imshow(tile)
    ax[2].imshow(heat, alpha=0.5, **kw)
    ax[2].set_title("overlay", fontsize=9)
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def explain_saliency(model, tile: np.ndarray, gene: str, out_dir: str | os.PathLike, *, name: str,
                     seed: int = 0, n_samples: int = 25) -> dict:
    """SmoothGrad map of ``gene``'s mean → ``<name>_<gene>_saliency.png`` and ``.npy``."""
    import jax

    from stimage_jax.explain.saliency import gene_mean_fn, smoothgrad

    fn = gene_mean_fn(model, gene)
    sal = smoothgrad(fn, tile, key=jax.random.key(seed), n_samples=n_samples)
    mean = float(jax.jit(fn)(np.asarray(tile, np.float32)[None])[0])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = write_overlay(tile, sal, out / f"{name}_{gene}_saliency.png",
                        title=f"SmoothGrad |d mean {gene} / d pixel| (mean {mean:.2f})")
    with atomic_path(out / f"{name}_{gene}_saliency.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, sal)
    return {"png": png, "npy": out / f"{name}_{gene}_saliency.npy", "mean": mean}


def latent_figure(adata, model, genes: list[str], path: str | os.PathLike, *, batch_size: int = 32,
                  progress: bool = True) -> Path:
    """PCA of the model's backbone features for every spot of ``adata``, coloured by each
    gene's observed counts (when present) and predicted mean, and by pathologist labels."""
    from data_pipelines import keys
    from data_pipelines.tiles import spot_tiles
    from stimage_jax.explain.latent import plot_latent

    if getattr(model, "sources", None) is None or model.backbone is None:
        raise StimageError("the latent view needs a regression model with one frozen backbone")
    bad = [g for g in genes if g not in model.genes]
    if bad:
        raise StimageError(f"gene(s) not predicted by this model: {', '.join(bad)}")
    cfg = model.config
    tiles = spot_tiles(adata, tile_um=cfg["tile_um"], tile_px=cfg["tile_px"], progress=progress, stain=model.stain)
    feats = model.source_features(tiles, batch_size=batch_size, progress=progress)[model.sources[0]["name"]]
    mu, _ = model.member_params(None, features={model.sources[0]["name"]: feats}, progress=False)
    mean = np.asarray(mu).mean(0)
    panels = {}
    for g in genes:
        if g in adata.var_names:
            x = adata[:, g].X
            panels[f"{g} observed"] = np.asarray(x.toarray() if hasattr(x, "toarray") else x).ravel()
        panels[f"{g} predicted"] = mean[:, model.genes.index(g)]
    if keys.LABEL in adata.obs:
        panels["pathologist label"] = adata.obs[keys.LABEL].astype(str).to_numpy()
    return plot_latent(feats, panels, path, title=f"{adata.n_obs} spots, {cfg['backbone']} features")
