"""PNG figures a user can open: observed vs predicted spatial maps, uncertainty maps and
a coverage calibration curve.

Each ``*_figure`` builds a matplotlib Figure and writes nothing (so a command can build
every figure, and meet every error, before writing any file); ``plot_*`` writes one PNG
atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from data_pipelines import keys  # noqa: E402
from data_pipelines.errors import StimageError  # noqa: E402
from data_pipelines.io import atomic_path  # noqa: E402

__all__ = ["plot_spatial_genes", "plot_uncertainty_maps", "plot_calibration", "spatial_genes_figure",
           "uncertainty_maps_figure", "calibration_figure", "he_overlay_figure", "he_thumbnail", "png_bytes"]


def _col(a, g):
    x = a[:, g].X
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64).ravel()


def spatial_genes_figure(pred, truth, genes) -> Figure:
    """Top row observed counts, bottom row predicted mean, one column per gene (a Figure;
    nothing written).

    Spots and genes are aligned by :func:`stimage_jax.metrics.match_prediction`; a gene the
    truth lacks cannot be drawn and is an error (named), not a blank panel.
    """
    from stimage_jax.metrics import match_prediction

    if keys.SPATIAL not in truth.obsm:
        raise StimageError("truth has no obsm['spatial'] coordinates to plot")
    genes = list(genes)
    if not genes:
        raise StimageError("no genes to plot")
    pred, truth, genes, missing = match_prediction(pred, truth, genes)
    if missing:
        raise StimageError(f"cannot plot gene(s) absent from the truth: {', '.join(missing)}")
    xy = np.asarray(truth.obsm[keys.SPATIAL])
    fig, axes = plt.subplots(2, len(genes), figsize=(4 * len(genes), 7.5), squeeze=False,
                             sharex=True, sharey=True)
    for j, g in enumerate(genes):
        for i, (label, a) in enumerate((("observed", truth), ("predicted", pred))):
            v = _col(a, g)
            ax = axes[i, j]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=28, marker="s", cmap="viridis")
            ax.set_title(f"{g} {label}")
            ax.set_aspect("equal")
            ax.set_xticks([]), ax.set_yticks([])
            fig.colorbar(sc, ax=ax, shrink=0.7)
    axes[0, 0].invert_yaxis()  # image rows grow downwards; axes are shared, so invert once
    fig.tight_layout()
    return fig


def plot_spatial_genes(pred, truth, genes, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """:func:`spatial_genes_figure` written atomically as a PNG."""
    return _save(spatial_genes_figure(pred, truth, genes), path, overwrite)


def png_bytes(fig: Figure) -> bytes:
    """Render ``fig`` as PNG bytes and close it, so a caller can render every figure of a
    command before writing any file."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _save(fig, path, overwrite: bool) -> Path:
    data = png_bytes(fig)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def uncertainty_maps_figure(pred, gene: str, *, truth=None) -> Figure:
    """``gene`` at the spot coordinates: observed counts (when ``truth`` is given),
    predicted mean, aleatoric SD (√var_aleatoric) and epistemic SD (√var_epistemic).

    Coordinates are ``pred.obsm["spatial"]``, else the truth's; with a truth only the
    spots both share are drawn.
    """
    if gene not in set(pred.var_names):
        raise StimageError(f"gene {gene!r} is not in the prediction")
    need = [k for k in (keys.VAR_ALEATORIC, keys.VAR_EPISTEMIC) if k not in pred.layers]
    if need:
        raise StimageError(f"prediction has no layer(s) {', '.join(need)} (not written by stimage predict?)")
    if truth is not None:
        from stimage_jax.metrics import match_prediction

        if gene not in set(truth.var_names):
            raise StimageError(f"gene {gene!r} is not in the truth")
        pred, truth, _, _ = match_prediction(pred, truth, [gene])  # shared spots, this gene only
    if keys.SPATIAL in pred.obsm:
        xy = np.asarray(pred.obsm[keys.SPATIAL], np.float64)
    elif truth is not None and keys.SPATIAL in truth.obsm:
        xy = np.asarray(truth.obsm[keys.SPATIAL], np.float64)
    else:
        raise StimageError("no obsm['spatial'] coordinates to plot (neither prediction nor truth)")
    p = pred[:, gene]
    panels = [("observed", _col(truth, gene))] if truth is not None else []
    panels += [("predicted mean", _col(pred, gene)),
               ("aleatoric SD", np.sqrt(np.clip(_layer(p, keys.VAR_ALEATORIC), 0, None))),
               ("epistemic SD", np.sqrt(np.clip(_layer(p, keys.VAR_EPISTEMIC), 0, None)))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False,
                             sharex=True, sharey=True)
    for ax, (label, v) in zip(axes[0], panels):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=28, marker="s", cmap="viridis")
        ax.set_title(f"{gene} {label}")
        ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(sc, ax=ax, shrink=0.7)
    axes[0, 0].invert_yaxis()  # image rows grow downwards; axes are shared, so invert once
    fig.tight_layout()
    return fig


def plot_uncertainty_maps(pred, gene: str, path: str | os.PathLike, *, truth=None,
                          overwrite: bool = True) -> Path:
    """:func:`uncertainty_maps_figure` written atomically as a PNG."""
    return _save(uncertainty_maps_figure(pred, gene, truth=truth), path, overwrite)


def _layer(a, key):
    x = a.layers[key]
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64).ravel()


def calibration_figure(table) -> Figure:
    """Observed against nominal coverage with the diagonal: the inclusive quantile interval
    and the PIT coverage (``table`` from :func:`stimage_jax.metrics.calibration_table`)."""
    cols = ("level", "coverage_interval", "coverage_pit")
    if any(c not in table for c in cols):
        raise StimageError(f"calibration table needs columns {', '.join(cols)}")
    level = np.asarray(table["level"], np.float64)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="ideal")
    ax.plot(level, table["coverage_interval"], "o-", label="interval [q_lo, q_hi]")
    ax.plot(level, table["coverage_pit"], "s-", label="PIT")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("observed coverage")
    ax.set_title("central-interval calibration")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_calibration(table, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """:func:`calibration_figure` written atomically as a PNG."""
    return _save(calibration_figure(table), path, overwrite)


def he_thumbnail(adata, max_side: int = 1600) -> tuple[np.ndarray, float]:
    """The sample's H&E as an RGB array of at most ``max_side`` px and the scale from the
    AnnData's full-resolution pixels (``obsm["spatial"]``) to it.

    The image is the one ``uns["spatial"][lib]["metadata"]["image_path"]`` names, opened
    lazily (a whole-slide TIFF is read at a pyramid level, never whole).
    """
    from data_pipelines.wsi import open_slide

    libs = adata.uns.get(keys.SPATIAL_UNS, {})
    if len(libs) != 1:
        raise StimageError(f"an H&E overlay needs one sample's image, found {len(libs)} in uns['spatial']")
    meta = next(iter(libs.values())).get("metadata", {})
    path = meta.get(keys.IMAGE_PATH)
    if not path:
        raise StimageError("no H&E image path in uns['spatial'][lib]['metadata']")
    slide = open_slide(path, mpp=float(meta.get(keys.MPP, 1.0)))
    img, thumb_scale = slide.thumbnail(max_side)
    return img, float(meta.get(keys.IMAGE_SCALE, 1.0)) * thumb_scale


def he_overlay_figure(pred, truth, genes, image: np.ndarray, scale: float, *, alpha: float = 0.75) -> Figure:
    """One row per gene over the H&E: observed counts, predicted mean (ensemble) and
    epistemic SD (√var_epistemic: where the members disagree), each spot a disc of its real
    diameter. ``image`` RGB (h, w, 3) and ``scale`` = image px per full-resolution px
    (:func:`he_thumbnail`). Spots and genes are aligned by ``match_prediction``.
    """
    from matplotlib.collections import EllipseCollection

    from stimage_jax.metrics import match_prediction

    genes = list(genes)
    if keys.VAR_EPISTEMIC not in pred.layers:
        raise StimageError("prediction has no var_epistemic layer (an ensemble prediction from stimage predict?)")
    pred, truth, genes, missing = match_prediction(pred, truth, genes)
    if missing:
        raise StimageError(f"cannot plot gene(s) absent from the truth: {', '.join(missing)}")
    xy = np.asarray(truth.obsm[keys.SPATIAL], np.float64) * scale
    lib = next(iter(truth.uns.get(keys.SPATIAL_UNS, {"": {}}).values()), {})
    diameter = float(lib.get("scalefactors", {}).get(keys.SPOT_DIAMETER_FULLRES, 20.0 / max(scale, 1e-9))) * scale
    pad = diameter * 1.5
    x0, x1 = max(xy[:, 0].min() - pad, 0), min(xy[:, 0].max() + pad, image.shape[1])
    y0, y1 = max(xy[:, 1].min() - pad, 0), min(xy[:, 1].max() + pad, image.shape[0])
    fig, axes = plt.subplots(len(genes), 3, figsize=(12, 4.2 * len(genes)), squeeze=False)
    for i, g in enumerate(genes):
        p = pred[:, g]
        panels = (("observed counts", _col(truth, g), "viridis"), ("predicted mean", _col(pred, g), "viridis"),
                  ("epistemic SD", np.sqrt(np.clip(_layer(p, keys.VAR_EPISTEMIC), 0, None)), "magma"))
        for ax, (label, v, cmap) in zip(axes[i], panels):
            ax.imshow(image)
            coll = EllipseCollection(diameter, diameter, 0.0, units="xy", offsets=xy, offset_transform=ax.transData,
                                     cmap=cmap, alpha=alpha, edgecolors="none")
            coll.set_array(v)
            ax.add_collection(coll)
            ax.set_xlim(x0, x1), ax.set_ylim(y1, y0)
            ax.set_title(f"{g} {label}")
            ax.set_xticks([]), ax.set_yticks([])
            fig.colorbar(coll, ax=ax, shrink=0.7)
    fig.tight_layout()
    return fig
