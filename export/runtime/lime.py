"""LIME over segmented nuclei for any :class:`~export.runtime.predictor.Predictor` (NumPy,
the ``lime`` package and the classical segmenter; no JAX).

Segments are the tile's nuclei (:func:`export.runtime.nuclei.segment_nuclei`) plus one
background segment; LIME (Ribeiro et al. 2016) hides random subsets of segments (each hidden
segment painted with its own mean colour, lime's default) and fits a weighted linear model
of the explained output — the ensemble's NB mean for the gene, or P(high) for a
classification model — on which segments were visible. Perturbed tiles go through the
model in fixed-size batches (a JAX model compiles once). ``stimage explain`` and
``stimage view`` both explain through :func:`explain_tile`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from data_pipelines.errors import StimageError
from export.runtime.predictor import CLASSIFY

__all__ = ["lime_weights", "gene_forward_fn", "nucleus_segments", "explain_tile", "weight_image", "TABLE_COLUMNS"]

TABLE_COLUMNS = ["nucleus", "area_px", "area_um2", "centroid_x", "centroid_y", "weight"]


def _as_uint8(tiles) -> np.ndarray:
    t = np.asarray(tiles)
    return t if t.dtype == np.uint8 else np.clip(np.rint(t), 0, 255).astype(np.uint8)


def gene_forward_fn(model, gene: str) -> Callable:
    """Forward only (LIME), for any predictor (JAX or ONNX): tiles (B, H, W, 3), rounded to
    uint8 as a tile file would be → (B,) NumPy outputs — the members' mean NB mean of
    ``gene``, or P(high) for a classifier — through the model's batch path."""
    if gene not in model.genes:
        raise StimageError(f"gene {gene!r} is not predicted by this model")
    if getattr(model, "embedding_sources", lambda: [])():
        raise StimageError("explanations need a model that reads tiles; this one reads precomputed embeddings")
    g = list(model.genes).index(gene)

    def fn(tiles):
        t = _as_uint8(tiles)
        out = model.params(t, batch_size=len(t), progress=False)
        return out["p_high"][:, g] if model.task == CLASSIFY else np.asarray(out["mu"])[:, :, g].mean(0)
    return fn


def lime_weights(fn, tile: np.ndarray, segments: np.ndarray, *, num_samples: int = 1000, seed: int = 0,
                 batch_size: int = 50, progress: bool = True,
                 on_batch: Callable[[int, int], None] | None = None) -> tuple[dict[int, float], float, float]:
    """fn: float tiles (B, H, W, 3) → (B,) outputs; segments: (H, W) int labels 0..S-1.

    ``on_batch(done, total)`` is called after every batch of perturbations (``total`` is
    ``num_samples`` + 1: lime also scores the unperturbed tile).
    Returns ({segment: weight}, the local model's intercept, its R² score).
    """
    from lime import lime_image

    done = [0]

    def classifier_fn(images: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(images), batch_size):
            b = np.asarray(images[s:s + batch_size])
            n = len(b)
            if n < batch_size:  # pad: one compiled shape
                b = np.concatenate([b, np.repeat(b[-1:], batch_size - n, 0)])
            out.append(np.asarray(fn(b))[:n])
            done[0] += n
            if on_batch is not None:
                on_batch(done[0], num_samples + 1)
        return np.concatenate(out)[:, None].astype(np.float64)

    explainer = lime_image.LimeImageExplainer(random_state=seed)
    # uint8 in, uint8 perturbations out (hidden segments get their mean colour, rounded as a
    # tile file would store it): 8x less memory traffic than lime's float64 copies.
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


def nucleus_segments(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance map (H, W) → (nucleus ids (S,), LIME segments (H, W): 0 = background,
    k = the k-th nucleus)."""
    ids = np.unique(instances[instances > 0])
    lut = np.zeros(int(instances.max()) + 1 if instances.size else 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return ids, lut[instances]


def explain_tile(model, tile: np.ndarray, gene: str, *, num_samples: int = 1000, seed: int = 0,
                 batch_size: int = 50, progress: bool = True,
                 on_batch: Callable[[int, int], None] | None = None,
                 segment: Callable[[np.ndarray, float], np.ndarray] | None = None) -> dict:
    """Segment the tile's nuclei and explain ``gene``'s prediction over them.

    ``segment(tile, mpp) -> (H, W) instances`` is the nucleus segmenter
    (:func:`export.runtime.segmenters.make_segmenter`; the classical one when None).

    tile: (tile_px, tile_px, 3) uint8, as the model reads it. Returns ``table`` (a DataFrame,
    one row per nucleus: :data:`TABLE_COLUMNS`, areas in µm² from the model's
    tile_um / tile_px), ``instances`` (H, W) int32, ``weights_by_id`` {nucleus id: weight},
    ``background_weight``, ``intercept``, ``score`` (the local model's R²), ``value`` (the
    explained output on the intact tile), ``n_nuclei``, ``mpp`` and ``note``.
    """
    import pandas as pd
    from skimage.measure import regionprops

    from export.runtime.nuclei import segment_nuclei

    fn = gene_forward_fn(model, gene)
    mpp = float(model.tile_um) / int(model.tile_px)
    instances = np.asarray(segment(tile, mpp) if segment is not None else segment_nuclei(tile, mpp=mpp), np.int32)
    ids, segments = nucleus_segments(instances)
    # through the same padded batch shape as the perturbations: no second compilation
    value = float(np.asarray(fn(np.repeat(np.asarray(tile, np.float32)[None], batch_size, 0)))[0])
    note = "" if len(ids) else "no nuclei found: the background alone is explained; "
    weights, intercept, score = lime_weights(fn, tile, segments, num_samples=num_samples, seed=seed,
                                             progress=progress, batch_size=batch_size, on_batch=on_batch)
    props = {p.label: p for p in regionprops(instances)}
    rows = [{"nucleus": int(i), "area_px": int(props[int(i)].area), "area_um2": float(props[int(i)].area) * mpp * mpp,
             "centroid_x": float(props[int(i)].centroid[1]), "centroid_y": float(props[int(i)].centroid[0]),
             "weight": float(weights.get(k, 0.0))} for k, i in enumerate(ids, start=1)]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return {"table": table, "instances": instances,
            "weights_by_id": {int(i): float(weights.get(k, 0.0)) for k, i in enumerate(ids, start=1)},
            "background_weight": float(weights.get(0, 0.0)), "intercept": intercept, "score": score,
            "value": value, "n_nuclei": int(len(ids)), "mpp": mpp, "note": note}


def weight_image(tile: np.ndarray, instances: np.ndarray, weights_by_id: dict[int, float], *,
                 scale: int = 1, alpha: float = 0.7) -> np.ndarray:
    """The tile with each nucleus painted by its weight on a diverging scale (blue < 0 <
    red, white = 0, symmetric around 0 at the largest |weight|) and outlined; RGB uint8
    (H·scale, W·scale, 3). OpenCV only (no plotting library)."""
    import cv2

    rgb = np.asarray(tile, np.uint8)
    lim = max((abs(w) for w in weights_by_id.values()), default=0.0) or 1.0
    colours = np.zeros((int(instances.max()) + 1 if instances.size else 1, 3), np.float32)
    for i, w in weights_by_id.items():
        t = float(np.clip(w / lim, -1, 1))
        # white → red (5, 48, 97 ... RdBu ends): linear from white to the end colour
        end = np.array([178, 24, 43], np.float32) if t > 0 else np.array([33, 102, 172], np.float32)
        colours[i] = 255 + (end - 255) * abs(t)
    painted = colours[instances]
    inside = (instances > 0)[..., None]
    out = np.where(inside, (1 - alpha) * rgb + alpha * painted, rgb).astype(np.uint8)
    if scale > 1:
        out = cv2.resize(out, (out.shape[1] * scale, out.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
        lab = cv2.resize(instances.astype(np.int32), (out.shape[1], out.shape[0]), interpolation=cv2.INTER_NEAREST)
    else:
        lab = instances
    edge = np.zeros(lab.shape, bool)  # outlines: a label differs from its right or lower neighbour
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    out[edge] = (20, 20, 20)
    return np.ascontiguousarray(out)
