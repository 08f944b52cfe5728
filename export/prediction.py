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

__all__ = ["build_prediction"]


def build_prediction(adata: ad.AnnData, mu: np.ndarray, r: np.ndarray, genes, provenance: dict,
                     *, interval: float = 0.8) -> ad.AnnData:
    """mu, r: (members, spots, genes) → AnnData with X = mean and the uncertainty layers.

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
    if keys.SPATIAL_UNS in adata.uns:
        out.uns[keys.SPATIAL_UNS] = adata.uns[keys.SPATIAL_UNS]
    src = dict(adata.uns.get(keys.STIMAGE_UNS, {}))
    out.uns[keys.STIMAGE_UNS] = {
        **{k: v for k, v in src.items() if k in (keys.MPP, keys.SPOT_DIAMETER_UM, keys.PLATFORM, keys.LIBRARY_ID)},
        keys.PREDICTION: {**provenance, "interval": interval},
    }
    return out
