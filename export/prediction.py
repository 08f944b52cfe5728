"""Member NB parameters → the prediction AnnData (NumPy only: shared by JAX and ONNX paths).

Both runtimes call :func:`build_prediction`, so their outputs have the same keys, dtypes
and provenance layout by construction.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from data_pipelines import keys
from export.moments import ensemble_moments_np, predictive_interval

__all__ = ["build_prediction", "predict_slide", "slide_to_files", "write_heatmaps"]


def build_prediction(adata: ad.AnnData, mu: np.ndarray, r: np.ndarray, genes, provenance: dict,
                     *, interval: float = 0.8, keep_members: bool = True) -> ad.AnnData:
    """mu, r: (members, spots, genes) → AnnData with X = mean and the uncertainty layers.

    ``keep_members`` stores the members' NB parameters in ``obsm`` (spots, members, genes),
    which ``stimage evaluate`` needs for the mixture likelihood; slides skip it (size).

    Same obs, obsm["spatial"] and uns["spatial"] as ``adata``; ``r = inf`` everywhere marks
    a point-prediction model (no aleatoric variance, degenerate interval).
    """
    mom = {k: v.astype(np.float32) for k, v in ensemble_moments_np(mu, r).items()}
    if np.isinf(r).all():
        mom["var_aleatoric"][:] = 0.0
        q_lo = q_hi = mom["mean"]
    else:
        q_lo, q_hi = predictive_interval(mu, r, interval)
    out = ad.AnnData(X=mom["mean"], obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(list(genes))))
    out.layers[keys.VAR_ALEATORIC] = mom["var_aleatoric"]
    out.layers[keys.VAR_EPISTEMIC] = mom["var_epistemic"]
    out.layers[keys.Q_LO] = np.asarray(q_lo, np.float32)
    out.layers[keys.Q_HI] = np.asarray(q_hi, np.float32)
    if keys.SPATIAL in adata.obsm:
        out.obsm[keys.SPATIAL] = np.asarray(adata.obsm[keys.SPATIAL])
    if keep_members:
        out.obsm[keys.MEMBER_MU] = np.ascontiguousarray(np.moveaxis(np.asarray(mu, np.float32), 0, 1))
        out.obsm[keys.MEMBER_R] = np.ascontiguousarray(np.moveaxis(np.asarray(r, np.float32), 0, 1))
    if keys.SPATIAL_UNS in adata.uns:
        out.uns[keys.SPATIAL_UNS] = adata.uns[keys.SPATIAL_UNS]
    src = dict(adata.uns.get(keys.STIMAGE_UNS, {}))
    out.uns[keys.STIMAGE_UNS] = {
        **{k: v for k, v in src.items() if k in (keys.MPP, keys.SPOT_DIAMETER_UM, keys.PLATFORM, keys.LIBRARY_ID)},
        keys.PREDICTION: {**provenance, "interval": interval},
    }
    return out


def predict_slide(slide, params_fn, genes, provenance: dict, *, tile_um: float, tile_px: int,
                  min_coverage: float = 0.7, batch_size: int = 32, progress: bool = True,
                  interval: float = 0.8, stain=None) -> ad.AnnData:
    """Grid-tile a whole slide on tissue and predict every tile, one batch in memory at a time.

    ``params_fn(tiles uint8 (b, px, px, 3)) -> (mu, r)`` each (members, b, genes): the JAX
    model or the ONNX session. One obs per tile; ``obsm["spatial"]`` its centre in slide px.
    stain: the model's stain reference (None: raw tiles); the slide's own stains are
    estimated once from its thumbnail.
    """
    from tqdm.auto import tqdm

    from data_pipelines.wsi import grid_adata, iter_grid_tiles, slide_grid

    centres, coverage, crop_px = slide_grid(slide, tile_um=tile_um, min_coverage=min_coverage)
    skeleton = grid_adata(slide, centres, coverage, crop_px, tile_um)
    mus, rs = [], []
    source = None
    if stain is not None:
        from data_pipelines.stain_normalisation import apply_stain, fit_source

        source = fit_source(stain.method, slide.thumbnail()[0])
    from data_pipelines.prefetch import prefetch

    def batches():
        for _, tiles in iter_grid_tiles(slide, centres, crop_px, tile_px, batch_size):
            yield tiles if stain is None else apply_stain(stain, source, tiles)

    # Reading and normalising the next batch overlaps the model's forward pass.
    for tiles in tqdm(prefetch(batches()), total=-(-len(centres) // batch_size), desc="slide",
                      disable=not progress):
        mu, r = params_fn(tiles)
        mus.append(np.asarray(mu))
        rs.append(np.asarray(r))
    mu, r = np.concatenate(mus, axis=1), np.concatenate(rs, axis=1)
    prov = {**provenance, "slide": str(slide.path), "slide_mpp": slide.mpp, "min_coverage": min_coverage}
    return build_prediction(skeleton, mu, r, genes, prov, interval=interval, keep_members=False)


def write_heatmaps(pred: ad.AnnData, genes, out_prefix, *, cell_px: int = 8, overwrite: bool = False) -> list:
    """One PNG per gene: the predicted mean on the tile grid (viridis; white = no tissue).

    Rendered with OpenCV so the ONNX runtime needs no plotting library.
    """
    import cv2

    from data_pipelines.errors import StimageError
    from data_pipelines.io import atomic_path

    missing = [g for g in genes if g not in set(pred.var_names)]
    if missing:
        raise StimageError(f"gene(s) not predicted by this model: {', '.join(missing)}")
    rows = pred.obs[keys.ARRAY_ROW].to_numpy()
    cols = pred.obs[keys.ARRAY_COL].to_numpy()
    r0, c0 = rows.min(), cols.min()
    shape = (rows.max() - r0 + 1, cols.max() - c0 + 1)
    paths = []
    for g in genes:
        v = np.asarray(pred[:, g].X).ravel().astype(np.float64)
        lo, hi = np.percentile(v, [1, 99])
        scaled = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        grid = np.zeros(shape, np.uint8)
        grid[rows - r0, cols - c0] = np.round(scaled * 255).astype(np.uint8)
        img = cv2.applyColorMap(grid, cv2.COLORMAP_VIRIDIS)
        empty = np.ones(shape, bool)
        empty[rows - r0, cols - c0] = False
        img[empty] = 255
        img = cv2.resize(img, (shape[1] * cell_px, shape[0] * cell_px), interpolation=cv2.INTER_NEAREST)
        path = f"{out_prefix}_{g}.png"
        with atomic_path(path, overwrite=overwrite) as tmp:
            if not cv2.imwrite(str(tmp), img):  # the temporary name ends in .png too
                raise StimageError(f"could not write {path}")
        paths.append(path)
    return paths


def slide_to_files(slide_path, params_fn, genes, provenance: dict, out, *, tile_um: float, tile_px: int,
                   mpp: float | None = None, heatmap_genes=(), min_coverage: float = 0.7,
                   batch_size: int = 32, overwrite: bool = False, progress: bool = True, stain=None):
    """The ``--slide`` command for either runtime: predict, write ``out`` (.h5ad) and
    ``<out stem>_<gene>.png`` heatmaps. Unknown heatmap genes fail before any work."""
    from data_pipelines.errors import StimageError
    from data_pipelines.io import check_writable, write_h5ad
    from data_pipelines.wsi import open_slide

    bad = [g for g in heatmap_genes if g not in set(genes)]
    if bad:
        raise StimageError(f"gene(s) not predicted by this model: {', '.join(bad)}")
    check_writable(out, overwrite)
    pred = predict_slide(open_slide(slide_path, mpp=mpp), params_fn, genes, provenance, tile_um=tile_um,
                         tile_px=tile_px, min_coverage=min_coverage, batch_size=batch_size, progress=progress,
                         stain=stain)
    write_h5ad(pred, out, overwrite=overwrite)
    return pred, write_heatmaps(pred, heatmap_genes, str(out).removesuffix(".h5ad"), overwrite=overwrite)
