"""LIME over segmented nuclei (STimage's explanation): which nuclei raise a gene's prediction.

Segments are the tile's nuclei (``stimage_jax.cells.nuclei.segment_nuclei``) plus one
background segment; LIME (Ribeiro et al. 2016, the ``lime`` package) hides random subsets
of segments (each hidden segment painted with its own mean colour, lime's default) and fits
a weighted linear model of the explained output — the ensemble's NB mean for the gene, or
P(high) for a classification model — on which segments were visible. Perturbed tiles go
through the jitted model in fixed-size batches, so it compiles once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipelines.io import atomic_path

__all__ = ["lime_weights", "explain_lime"]


def lime_weights(fn, tile: np.ndarray, segments: np.ndarray, *, num_samples: int = 1000, seed: int = 0,
                 batch_size: int = 50, progress: bool = True) -> tuple[dict[int, float], float, float]:
    """fn: float tiles (B, H, W, 3) → (B,) outputs; segments: (H, W) int labels 0..S-1.

    Returns ({segment: weight}, the local model's intercept, its R² score).
    """
    from lime import lime_image

    def classifier_fn(images: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(images), batch_size):
            b = np.asarray(images[s:s + batch_size])
            n = len(b)
            if n < batch_size:  # pad: one compiled shape
                b = np.concatenate([b, np.repeat(b[-1:], batch_size - n, 0)])
            out.append(np.asarray(fn(b))[:n])
        return np.concatenate(out)[:, None].astype(np.float64)

    explainer = lime_image.LimeImageExplainer(random_state=seed)
    # uint8 in, uint8 perturbations out (hidden segments get their mean colour, rounded as a
    # tile file would store it): 8x less memory traffic than lime's float64 copies.
    import functools

    saved = lime_image.tqdm  # lime 0.2 draws its own tqdm bar and has no switch for it
    if not progress:
        lime_image.tqdm = functools.partial(saved, disable=True)
    try:
        exp = explainer.explain_instance(np.asarray(tile, np.uint8), classifier_fn, labels=(0,), top_labels=None,
                                         hide_color=None, num_features=int(segments.max()) + 1,
                                         num_samples=num_samples, batch_size=batch_size,
                                         segmentation_fn=lambda _img: segments, random_seed=seed)
    finally:
        lime_image.tqdm = saved
    return dict(exp.local_exp[0]), float(exp.intercept[0]), float(exp.score)


def _overlay(tile, instances, weights_by_id, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = np.full(instances.shape, np.nan)
    for i, w in weights_by_id.items():
        heat[instances == i] = w
    lim = float(np.nanmax(np.abs(heat))) if np.isfinite(heat).any() else 1.0
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.9))
    ax[0].imshow(tile)
    ax[0].set_title("tile", fontsize=9)
    ax[1].imshow(tile)
    im = ax[1].imshow(heat, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.75)
    fig.colorbar(im, ax=ax[1], shrink=0.8, label="LIME weight")
    ax[1].set_title(title, fontsize=9)
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def explain_lime(model, tile: np.ndarray, gene: str, out_dir: str | os.PathLike, *, name: str, seed: int = 0,
                 num_samples: int = 1000, batch_size: int = 50, progress: bool = True) -> dict:
    """Segment, explain, write ``<name>_<gene>_lime.csv`` (one row per nucleus: id, area
    in px and µm², centroid x/y px, LIME weight) and ``<name>_<gene>_lime.png``."""
    import pandas as pd
    from skimage.measure import regionprops

    from stimage_jax.cells.nuclei import segment_nuclei
    from stimage_jax.explain.saliency import gene_forward_fn

    fn = gene_forward_fn(model, gene)
    from stimage_jax.explain.spot import tile_geometry_of

    um, px = tile_geometry_of(model)
    mpp = um / px
    instances = np.asarray(segment_nuclei(tile, mpp=mpp), np.int32)
    ids = np.unique(instances[instances > 0])
    # LIME features: 0 = background, k = the k-th nucleus.
    segments = np.zeros(instances.shape, np.int32)
    for k, i in enumerate(ids, start=1):
        segments[instances == i] = k
    # through the same padded batch shape as the perturbations: no second compilation
    value = float(np.asarray(fn(np.repeat(np.asarray(tile, np.float32)[None], batch_size, 0)))[0])
    note = ""
    if len(ids) == 0:
        note = "no nuclei found: the background alone is explained; "
    weights, intercept, score = lime_weights(fn, tile, segments, num_samples=num_samples, seed=seed, progress=progress,
                                             batch_size=batch_size)
    rows = []
    props = {p.label: p for p in regionprops(instances)}
    for k, i in enumerate(ids, start=1):
        p = props[int(i)]
        rows.append({"nucleus": int(i), "area_px": int(p.area), "area_um2": float(p.area) * mpp * mpp,
                     "centroid_x": float(p.centroid[1]), "centroid_y": float(p.centroid[0]),
                     "weight": float(weights.get(k, 0.0))})
    table = pd.DataFrame(rows, columns=["nucleus", "area_px", "area_um2", "centroid_x", "centroid_y", "weight"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / f"{name}_{gene}_lime.csv", out / f"{name}_{gene}_lime.png"
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    by_id = {int(i): float(weights.get(k, 0.0)) for k, i in enumerate(ids, start=1)}
    _overlay(tile, instances, by_id, png, f"{gene}: LIME weight per nucleus (R² {score:.2f})")
    return {"csv": csv, "png": png, "table": table, "background_weight": float(weights.get(0, 0.0)),
            "intercept": intercept, "score": score, "value": value, "n_nuclei": int(len(ids)), "note": note}
