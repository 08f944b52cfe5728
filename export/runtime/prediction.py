"""Model outputs → the prediction AnnData, for spots and whole slides (NumPy only).

Every runtime predicts through :func:`predict_adata` (spots of an AnnData) or
:func:`predict_slide` (a grid over a whole slide) with any
:class:`~export.runtime.predictor.Predictor` — the JAX ensemble, the classifier, an ONNX
session — so their outputs have the same obs, obsm, layers and uns by construction.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.tissue import DEFAULT_MIN_COVERAGE
from export.runtime.moments import ensemble_moments_np, predictive_interval
from export.runtime.predictor import CLASSIFY, REGRESS

__all__ = ["build_prediction", "build_classification", "assemble", "predict_adata", "predict_slide",
           "slide_to_files", "write_heatmaps", "smoothing_for", "smooth_outputs"]


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
    if keep_members:
        out.obsm[keys.MEMBER_MU] = np.ascontiguousarray(np.moveaxis(np.asarray(mu, np.float32), 0, 1))
        out.obsm[keys.MEMBER_R] = np.ascontiguousarray(np.moveaxis(np.asarray(r, np.float32), 0, 1))
    _carry_over(adata, out, {**provenance, "interval": interval})
    return out


def _carry_over(adata: ad.AnnData, out: ad.AnnData, provenance: dict) -> None:
    """Spot positions, the image reference, physical units and provenance from input to output."""
    if keys.SPATIAL in adata.obsm:
        out.obsm[keys.SPATIAL] = np.asarray(adata.obsm[keys.SPATIAL])
    if keys.SPATIAL_UNS in adata.uns:
        out.uns[keys.SPATIAL_UNS] = adata.uns[keys.SPATIAL_UNS]
    src = dict(adata.uns.get(keys.STIMAGE_UNS, {}))
    out.uns[keys.STIMAGE_UNS] = {
        **{k: v for k, v in src.items() if k in (keys.MPP, keys.SPOT_DIAMETER_UM, keys.PLATFORM, keys.LIBRARY_ID)},
        keys.PREDICTION: provenance,
    }


def build_classification(adata: ad.AnnData, p_high: np.ndarray, genes, provenance: dict) -> ad.AnnData:
    """p_high (spots, genes) → AnnData with ``layers["p_high"]`` (and X) = P(high)."""
    p = np.asarray(p_high, np.float32)
    out = ad.AnnData(X=p, obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(list(genes))))
    out.layers[keys.P_HIGH] = p
    _carry_over(adata, out, provenance)
    return out


def smoothing_for(predictor, smooth: float | None = None) -> dict:
    """The spatial smoothing a prediction applies: the model's own record (``predictor.smoothing``,
    off for predictors without one) with ``smooth`` (when given) replacing its weight."""
    from export.runtime.context import check_smoothing

    own = getattr(predictor, "smoothing", None) if predictor.task == REGRESS else None
    sm = check_smoothing(own, "the model")
    if smooth is not None:
        if not 0.0 <= smooth <= 1.0:
            raise StimageError(f"--smooth must lie in [0, 1] (got {smooth})")
        if smooth > 0 and predictor.task != REGRESS:
            raise StimageError("--smooth applies to expression (regression) models, not classifiers")
        sm["alpha"] = float(smooth)
    return sm


def smooth_outputs(adata: ad.AnnData, outputs: dict, smoothing: dict) -> dict:
    """Members' NB means ``mu`` (M, N, G) averaged with the ``k`` nearest spots of the same
    sample (``obsm["spatial"]``, ``obs["sample"]``) with weight ``alpha``
    (:func:`~export.runtime.context.smooth_members`); ``r`` kept, so the mixture moments and
    the interval are recomputed from the smoothed members. Unchanged when alpha is 0."""
    from export.runtime.context import neighbour_index, smooth_members

    if smoothing["alpha"] == 0.0 or "mu" not in outputs or adata.n_obs < 2:
        return outputs
    if keys.SPATIAL not in adata.obsm:
        raise StimageError("spatial smoothing needs spot coordinates (obsm['spatial']); pass --smooth 0")
    samples = (adata.obs[keys.SAMPLE].astype(str).to_numpy() if keys.SAMPLE in adata.obs
               else np.zeros(adata.n_obs, np.int8))
    idx = neighbour_index(np.asarray(adata.obsm[keys.SPATIAL], np.float64)[:, :2], samples, smoothing["k"])
    return {**outputs, "mu": smooth_members(outputs["mu"], idx, smoothing["alpha"])}


def assemble(adata: ad.AnnData, outputs: dict, predictor, *, interval: float = 0.8,
             keep_members: bool = True, smoothing: dict | None = None) -> ad.AnnData:
    """A predictor's ``params`` output for the spots of ``adata`` → the prediction AnnData
    (members' means first smoothed over neighbouring spots as ``smoothing`` says; default:
    the model's own setting, :func:`smoothing_for`)."""
    if predictor.task == CLASSIFY:
        return build_classification(adata, outputs["p_high"], predictor.genes,
                                    {**predictor.provenance, "task": CLASSIFY})
    smoothing = smoothing_for(predictor) if smoothing is None else smoothing
    outputs = smooth_outputs(adata, outputs, smoothing)
    prov = {**predictor.provenance, "task": REGRESS, "smoothing": smoothing,
            "tta": int(getattr(predictor, "tta", 1))}
    return build_prediction(adata, outputs["mu"], outputs["r"], predictor.genes, prov, interval=interval,
                            keep_members=keep_members)


def predict_adata(adata: ad.AnnData, predictor, *, batch_size: int = 32, progress: bool = True,
                  interval: float = 0.8, tiles: np.ndarray | None = None, features: dict | None = None,
                  smooth: float | None = None) -> ad.AnnData:
    """Predict every spot of ``adata`` with any :class:`~export.runtime.predictor.Predictor`.

    Tiles are cut at the predictor's geometry (and stain-normalised towards its reference)
    unless ``tiles`` (N, px, px, 3) uint8 are given or ``features`` (by source name; a
    predictor's ``spot_features(adata)``, such as embeddings, are added) make them
    unnecessary.
    Every spot's tissue coverage is recorded in ``obs["tissue_coverage"]`` whenever the
    model reads tiles: predictions on mostly-glass tiles are extrapolations a user may want
    to mask. ``interval``: the central NB-mixture interval stored as q_lo / q_hi.
    ``smooth``: the weight of the neighbours' means (None: the model's own setting; 0: off).
    """
    if not 0.0 < interval < 1.0:
        raise StimageError(f"--interval must lie strictly between 0 and 1 (got {interval})")
    smoothing = smoothing_for(predictor, smooth)
    if smoothing["alpha"] > 0 and keys.SPATIAL not in adata.obsm and adata.n_obs > 1:
        raise StimageError("spatial smoothing needs spot coordinates (obsm['spatial']); pass --smooth 0")
    # inputs a model reads from the AnnData itself (precomputed embeddings)
    own = predictor.spot_features(adata) if hasattr(predictor, "spot_features") else {}
    features = {**own, **(features or {})} or None
    for name, f in (features or {}).items():
        if np.shape(f)[0] != adata.n_obs:
            raise StimageError(f"features for {name} have {np.shape(f)[0]} rows for {adata.n_obs} spots")
    if predictor.needs_tiles(features):
        if tiles is None:
            from data_pipelines.tiles import spot_tiles

            tiles = spot_tiles(adata, tile_um=predictor.tile_um, tile_px=predictor.tile_px, progress=progress,
                               stain=predictor.stain)
        elif tuple(tiles.shape[1:]) != (predictor.tile_px, predictor.tile_px, 3):
            raise StimageError(f"tiles have shape {tuple(tiles.shape[1:])}, the model expects "
                               f"({predictor.tile_px}, {predictor.tile_px}, 3)")
        if len(tiles) != adata.n_obs:
            raise StimageError(f"{len(tiles)} tiles for {adata.n_obs} spots")
    else:
        tiles = None
    outputs = predictor.params(tiles, batch_size=batch_size, progress=progress, features=features)
    out = assemble(adata, outputs, predictor, interval=interval, smoothing=smoothing)
    if predictor.tile_um is not None and keys.TISSUE_COVERAGE not in out.obs:
        from data_pipelines.tissue import spot_tissue_coverage

        out.obs[keys.TISSUE_COVERAGE] = spot_tissue_coverage(adata, tile_um=predictor.tile_um,
                                                             tile_px=predictor.tile_px)
    return out


def predict_slide(slide, predictor, *, min_coverage: float = DEFAULT_MIN_COVERAGE, batch_size: int = 32,
                  progress: bool = True, interval: float = 0.8, smooth: float | None = None) -> ad.AnnData:
    """Grid-tile a whole slide on tissue and predict every tile, one batch in memory at a time.

    Any :class:`~export.runtime.predictor.Predictor` that reads tiles. One obs per tile;
    ``obsm["spatial"]`` its centre in slide px. Tiles are normalised towards the
    predictor's stain reference, with the slide's own stains estimated once from its
    thumbnail. Members' NB parameters are not kept (size). Smoothing (``smooth``, default the
    model's) averages each tile with its nearest grid tiles once every tile is predicted.
    """
    from tqdm.auto import tqdm

    from data_pipelines.prefetch import prefetch
    from data_pipelines.wsi import grid_adata, iter_grid_tiles, slide_grid

    if predictor.tile_um is None:
        raise StimageError("this model reads precomputed embeddings, not tiles: it cannot predict a slide")
    smoothing = smoothing_for(predictor, smooth)
    stain = predictor.stain
    centres, coverage, crop_px = slide_grid(slide, tile_um=predictor.tile_um, min_coverage=min_coverage)
    skeleton = grid_adata(slide, centres, coverage, crop_px, predictor.tile_um)
    source = None
    if stain is not None:
        from data_pipelines.stain_normalisation import apply_stain, fit_source

        source = fit_source(stain.method, slide.thumbnail()[0])

    def batches():
        for _, tiles in iter_grid_tiles(slide, centres, crop_px, predictor.tile_px, batch_size):
            yield tiles if stain is None else apply_stain(stain, source, tiles)

    parts: dict[str, list] = {}
    # Reading and normalising the next batch overlaps the model's forward pass.
    for tiles in tqdm(prefetch(batches()), total=-(-len(centres) // batch_size), desc="slide",
                      disable=not progress):
        for k, v in predictor.params(tiles, batch_size=batch_size, progress=False).items():
            parts.setdefault(k, []).append(np.asarray(v))
    # members' arrays are (M, b, G): tiles on axis 1; p_high is (b, G)
    outputs = {k: np.concatenate(v, axis=1 if k in ("mu", "r") else 0) for k, v in parts.items()}
    pred = assemble(skeleton, outputs, predictor, interval=interval, keep_members=False, smoothing=smoothing)
    pred.uns[keys.STIMAGE_UNS][keys.PREDICTION].update(
        {"slide": str(slide.path), "slide_mpp": slide.mpp, "min_coverage": min_coverage})
    return pred


def _stem(out) -> str:
    """The output path without its .h5ad / .zarr suffix: heatmaps are <stem>_<gene>.png."""
    return str(out).removesuffix(".h5ad").removesuffix(".zarr")


def heatmap_paths(out, genes) -> list[str]:
    """``<out without .h5ad / .zarr>_<gene>.png`` for each gene."""
    stem = _stem(out)
    return [f"{stem}_{g}.png" for g in genes]


def write_heatmaps(pred: ad.AnnData, genes, out_prefix, *, cell_px: int = 8, overwrite: bool = False) -> list:
    """One PNG per gene: the predicted mean on the tile grid (viridis; white = no tissue).

    Rendered with OpenCV so the ONNX runtime needs no plotting library.
    """
    import cv2

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


def slide_to_files(slide_path, predictor, out, *, mpp: float | None = None, heatmap_genes=(),
                   min_coverage: float = DEFAULT_MIN_COVERAGE, batch_size: int = 32, overwrite: bool = False,
                   progress: bool = True, interval: float = 0.8, zarr_image_px: int | None = None,
                   smooth: float | None = None):
    """The ``--slide`` command for any runtime: predict, write ``out`` (.h5ad) and
    ``<out stem>_<gene>.png`` heatmaps. Unknown genes and every existing output are refused
    before any work, so a failure never leaves a half-written set. ``out`` ending in ``.zarr``
    writes SpatialData (the slide at most ``zarr_image_px`` px long; None = full resolution)."""
    from data_pipelines.io import check_distinct, check_writable
    from data_pipelines.spatialdata_io import check_output, write_output
    from data_pipelines.wsi import open_slide

    bad = [g for g in heatmap_genes if g not in set(predictor.genes)]
    if bad:
        raise StimageError(f"gene(s) not predicted by this model: {', '.join(bad)}")
    maps = heatmap_paths(out, heatmap_genes)
    check_output(out, overwrite, [slide_path])
    for p in maps:
        check_writable(p, overwrite)
        check_distinct(p, slide_path)
    pred = predict_slide(open_slide(slide_path, mpp=mpp), predictor, min_coverage=min_coverage,
                         batch_size=batch_size, progress=progress, interval=interval, smooth=smooth)
    write_output(pred, out, overwrite=overwrite, max_image_px=zarr_image_px)  # .h5ad (scanpy-ready) or .zarr
    return pred, write_heatmaps(pred, heatmap_genes, _stem(out), overwrite=overwrite)
