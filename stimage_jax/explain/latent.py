"""The latent space: PCA of backbone features, coloured by expression and labels (PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipelines.io import atomic_path

__all__ = ["pca_2d", "plot_latent"]


def pca_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) → ((N, 2) coordinates on the first two principal components of the
    standardised features, (2,) explained variance ratios)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(np.asarray(features, np.float64))
    z = np.nan_to_num(z)  # constant features standardise to NaN; they carry nothing
    pca = PCA(2, random_state=seed).fit(z)
    return pca.transform(z), pca.explained_variance_ratio_


def plot_latent(features: np.ndarray, panels: dict[str, np.ndarray], path: str | os.PathLike, *,
                title: str = "") -> Path:
    """One scatter of the 2-D PCA per panel: numeric arrays get a colour bar, strings
    (e.g. pathologist labels) a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy, ratio = pca_2d(features)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, v) in zip(axes[0], panels.items()):
        v = np.asarray(v)
        if v.dtype.kind in "OUS":
            for i, lab in enumerate(sorted(set(v.tolist()))):
                m = v == lab
                ax.scatter(xy[m, 0], xy[m, 1], s=8, label=str(lab), color=plt.get_cmap("tab10")(i % 10))
            ax.legend(fontsize=6, frameon=False, markerscale=1.5)
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=8, cmap="viridis")
            fig.colorbar(sc, ax=ax, shrink=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%})")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
