"""PNG figures a user can open: observed vs predicted spatial maps."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines import keys  # noqa: E402
from data_pipelines.errors import StimageError  # noqa: E402
from data_pipelines.io import atomic_path  # noqa: E402

__all__ = ["plot_spatial_genes"]


def _col(a, g):
    x = a[:, g].X
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64).ravel()


def plot_spatial_genes(pred, truth, genes, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Top row observed counts, bottom row predicted mean, one column per gene."""
    spots = pred.obs_names.intersection(truth.obs_names)
    if keys.SPATIAL not in truth.obsm:
        raise StimageError("truth has no obsm['spatial'] coordinates to plot")
    xy = np.asarray(truth[spots].obsm[keys.SPATIAL])
    fig, axes = plt.subplots(2, len(genes), figsize=(4 * len(genes), 7.5), squeeze=False,
                             sharex=True, sharey=True)
    for j, g in enumerate(genes):
        for i, (label, a) in enumerate((("observed", truth), ("predicted", pred))):
            v = _col(a[spots], g)
            ax = axes[i, j]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=28, marker="s", cmap="viridis")
            ax.set_title(f"{g} {label}")
            ax.set_aspect("equal")
            ax.set_xticks([]), ax.set_yticks([])
            fig.colorbar(sc, ax=ax, shrink=0.7)
    axes[0, 0].invert_yaxis()  # image rows grow downwards; axes are shared, so invert once
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
