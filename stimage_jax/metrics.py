"""Per-gene evaluation metrics (pure NumPy, vectorised over genes).

Correlations are computed per gene *per sample* (pooling spots of different slides
inflates PCC with between-slide differences); a summary across samples is labelled as
such. A gene constant in a sample has no correlation: NaN, with the reason recorded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from data_pipelines import keys
from data_pipelines.errors import StimageError

__all__ = ["pearson_per_gene", "spearman_per_gene", "evaluate", "summarise"]


def pearson_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """pred, truth: (N, G) → (G,) Pearson r; NaN where either column is constant."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(truth, np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise StimageError(f"prediction {p.shape} and truth {t.shape} must both be (spots, genes)")
    p = p - p.mean(0)
    t = t - t.mean(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def spearman_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman rho per gene: Pearson of average ranks (ties share their mean rank)."""
    return pearson_per_gene(rankdata(pred, axis=0), rankdata(truth, axis=0))


def _dense(x):
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64)


def evaluate(pred, truth) -> tuple[pd.DataFrame, list[str]]:
    """Score predicted means against observed counts, per sample and gene.

    Spots are matched by ``obs_names``; genes by name. Returns (table, genes missing from
    the truth). Table columns: sample, gene, n_spots, pcc, spearman, note, and — when the
    prediction carries them — ``coverage`` (fraction of observed counts inside
    [q_lo, q_hi]) and ``nll`` (mean negative log-likelihood of the counts under the
    members' NB mixture); with spot coordinates, Moran's I of the observed and predicted
    expression, the bivariate Moran's I of prediction with observation (``moran_bv``), the
    paper's spatial ``iou`` (grid only) and the neighbour rule used (``weights``).
    """
    spots = pred.obs_names.intersection(truth.obs_names)
    if len(spots) == 0:
        raise StimageError("prediction and truth share no spot ids (obs_names)")
    genes = [g for g in pred.var_names if g in set(truth.var_names)]
    missing = [g for g in pred.var_names if g not in set(truth.var_names)]
    if not genes:
        raise StimageError("prediction and truth share no genes")
    p_all = pred[spots, genes]
    t_all = truth[spots, genes]
    if keys.SAMPLE in t_all.obs:
        samples = t_all.obs[keys.SAMPLE].astype(str).to_numpy()
    else:
        samples = np.full(len(spots), "all")
    rows = []
    for s in pd.unique(samples):
        m = samples == s
        P, T = _dense(p_all.X[m]), _dense(t_all.X[m])
        if not np.all(np.isfinite(T)):
            raise StimageError(f"truth has NaN/inf counts in sample {s}")
        pcc, rho = pearson_per_gene(P, T), spearman_per_gene(P, T)
        const_t, const_p = T.std(0) == 0, P.std(0) == 0
        note = np.where(const_t, "constant in truth", np.where(const_p, "constant prediction", ""))
        row = {"sample": s, "gene": genes, "n_spots": int(m.sum()), "pcc": pcc, "spearman": rho, "note": note}
        if keys.Q_LO in p_all.layers and keys.Q_HI in p_all.layers:
            lo, hi = _dense(p_all.layers[keys.Q_LO][m]), _dense(p_all.layers[keys.Q_HI][m])
            row["coverage"] = ((T >= lo) & (T <= hi)).mean(0)
        if keys.MEMBER_MU in p_all.obsm and keys.MEMBER_R in p_all.obsm:
            from export.moments import mixture_logpmf

            mu = np.moveaxis(np.asarray(p_all.obsm[keys.MEMBER_MU])[m], 1, 0)
            r = np.moveaxis(np.asarray(p_all.obsm[keys.MEMBER_R])[m], 1, 0)
            if np.isfinite(r).all():  # a point model (r = inf) has no likelihood
                row["nll"] = -mixture_logpmf(T, mu, r).mean(0)
        if keys.ARRAY_ROW in t_all.obs or keys.SPATIAL in t_all.obsm:
            from stimage_jax.spatial_metrics import morans_i, morans_i_bv, spatial_iou, spatial_weights

            w, rule = spatial_weights(t_all[m])
            row.update(moran_i_obs=morans_i(T, w), moran_i_pred=morans_i(P, w),
                       moran_bv=morans_i_bv(P, T, w), weights=rule)
            if keys.ARRAY_ROW in t_all.obs:
                obs_m = t_all.obs[m]
                row["iou"] = spatial_iou(P, T, obs_m[keys.ARRAY_ROW].to_numpy(), obs_m[keys.ARRAY_COL].to_numpy())
        rows.append(pd.DataFrame(row))
    return pd.concat(rows, ignore_index=True), missing


def summarise(table: pd.DataFrame) -> dict:
    """Mean/median PCC over (sample, gene) rows and the count of genes with PCC > 0."""
    pcc = table["pcc"]
    extra = {k: float(np.nanmean(table[k])) for k in ("coverage", "nll", "moran_bv", "iou") if k in table}
    return {**extra, "rows": int(len(table)), "mean_pcc": float(np.nanmean(pcc)) if pcc.notna().any() else float("nan"),
            "median_pcc": float(np.nanmedian(pcc)) if pcc.notna().any() else float("nan"),
            "mean_spearman": float(np.nanmean(table["spearman"])) if table["spearman"].notna().any() else float("nan"),
            "n_pcc_positive": int((pcc > 0).sum()), "n_nan": int(pcc.isna().sum())}
