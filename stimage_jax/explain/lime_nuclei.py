"""LIME over segmented nuclei (STimage's explanation): which nuclei raise a gene's prediction.

Segments are the tile's nuclei (``export.runtime.nuclei.segment_nuclei``) plus one
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
from export.runtime.lime import explain_tile, lime_weights  # the JAX-free core (also used by `stimage view`)

__all__ = ["lime_weights", "explain_lime"]


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
                 num_samples: int = 1000, batch_size: int = 50, progress: bool = True, segment=None) -> dict:
    """Segment (``segment(tile, mpp)``, the classical segmenter when None), explain, write
    ``<name>_<gene>_lime.csv`` (one row per nucleus: id, area in px and µm², centroid x/y
    px, LIME weight) and ``<name>_<gene>_lime.png``."""
    res = explain_tile(model, tile, gene, num_samples=num_samples, seed=seed, batch_size=batch_size,
                       progress=progress, segment=segment)
    table, instances, by_id, score = res["table"], res["instances"], res["weights_by_id"], res["score"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / f"{name}_{gene}_lime.csv", out / f"{name}_{gene}_lime.png"
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    _overlay(tile, instances, by_id, png, f"{gene}: LIME weight per nucleus (R² {score:.2f})")
    return {"csv": csv, "png": png, "table": table, "background_weight": res["background_weight"],
            "intercept": res["intercept"], "score": score, "value": res["value"], "n_nuclei": res["n_nuclei"],
            "note": res["note"]}
