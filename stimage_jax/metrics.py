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

__all__ = ["pearson_per_gene", "spearman_per_gene", "high_low_scores", "top_genes", "evaluate", "summarise",
           "calibration_table", "prediction_level", "match_prediction", "PER_GENE_OBSM"]

DEFAULT_LEVEL = 0.8  # build_prediction's default interval


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


def high_low_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's high/low task per gene: high = per-sample z-score > 0 (i.e. above the
    sample's mean). pred, truth (N, G) → (AUC of the prediction ranking high spots first,
    F1 of "predicted above its mean" vs "observed above its mean"); NaN where the truth has
    one class only. AUC by the Mann-Whitney rank formula (ties get half credit), equal to
    ``sklearn.metrics.roc_auc_score``.
    """
    p = np.asarray(pred, np.float64)
    t = np.asarray(truth, np.float64)
    y = t > t.mean(0)
    n_pos, n_neg = y.sum(0), (~y).sum(0)
    ranks = rankdata(p, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        yhat = p > p.mean(0)
        tp = (yhat & y).sum(0)
        f1 = 2 * tp / (yhat.sum(0) + n_pos)
    valid = (n_pos > 0) & (n_neg > 0)
    return np.where(valid, auc, np.nan), np.where(valid, f1, np.nan)


def top_genes(table: pd.DataFrame, n: int = 10, by: str = "pcc") -> pd.DataFrame:
    """The ``n`` most predictable genes: mean of ``by`` over samples, best first."""
    agg = table.groupby("gene")[by].agg(["mean", "min", "count"]).rename(columns={"mean": f"mean_{by}",
                                                                                    "min": f"min_{by}",
                                                                                    "count": "samples"})
    return agg.sort_values(f"mean_{by}", ascending=False).head(n).reset_index()


def _dense(x):
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64)


def prediction_level(pred) -> float:
    """The central-interval level the prediction's q_lo/q_hi were made for (provenance
    ``uns["stimage"]["prediction"]["interval"]``), else 0.8."""
    try:
        level = float(pred.uns[keys.STIMAGE_UNS][keys.PREDICTION]["interval"])
    except (KeyError, TypeError, ValueError):
        return DEFAULT_LEVEL
    return level if 0.0 < level < 1.0 else DEFAULT_LEVEL


PER_GENE_OBSM = (keys.MEMBER_MEAN, keys.MEMBER_MU, keys.MEMBER_R)  # obsm (spots, members, genes)


def _duplicates(names) -> list[str]:
    idx = pd.Index(names)
    return list(pd.unique(idx[idx.duplicated()]))


def match_prediction(pred, truth, genes=None):
    """Align a prediction with its truth: the one place spots and genes are matched.

    Spots by ``obs_names`` (the prediction's order), genes by name in the order of
    ``genes`` (default: the prediction's genes). Returns ``(pred, truth, genes, missing)``:
    copies restricted to the shared spots and to ``genes`` minus ``missing`` (the genes
    absent from the truth, skipped), in that gene order; every per-gene array is subset —
    ``X``, layers and the members' ``obsm`` arrays (:data:`PER_GENE_OBSM`, shaped
    (spots, members, genes)) — so no caller can pair gene j of one array with gene k of another.
    A requested gene the prediction lacks, duplicated names, no shared spot or no shared
    gene raise :class:`StimageError`.
    """
    for what, a in (("prediction", pred), ("truth", truth)):
        dup = _duplicates(a.obs_names)
        if dup:
            raise StimageError(f"{what} has duplicate spot ids (obs_names), e.g. {dup[0]!r}")
    dup = _duplicates(pred.var_names)
    if dup:
        raise StimageError(f"prediction has duplicate gene names, e.g. {dup[0]!r}")
    for k in PER_GENE_OBSM:
        if k in pred.obsm and (np.ndim(pred.obsm[k]) != 3 or np.shape(pred.obsm[k])[2] != pred.n_vars):
            raise StimageError(f"prediction obsm[{k!r}] is shaped {np.shape(pred.obsm[k])}, not "
                               f"(spots, members, {pred.n_vars} genes)")
    requested = list(pred.var_names) if genes is None else list(dict.fromkeys(str(g) for g in genes))
    unknown = [g for g in requested if g not in pred.var_names]
    if unknown:
        raise StimageError(f"gene(s) not in the prediction: {', '.join(unknown)}")
    in_truth = set(truth.var_names)
    kept = [g for g in requested if g in in_truth]
    missing = [g for g in requested if g not in in_truth]
    dup = _duplicates(truth.var_names[truth.var_names.isin(kept)])
    if dup:
        raise StimageError(f"truth has duplicate gene names, e.g. {dup[0]!r}")
    if not kept:
        raise StimageError("prediction and truth share no genes")
    pi = pred.obs_names.get_indexer(pred.obs_names.intersection(truth.obs_names, sort=False))
    if len(pi) == 0:
        raise StimageError("prediction and truth share no spot ids (obs_names)")
    ti = truth.obs_names.get_indexer(pred.obs_names[pi])
    pg, tg = pred.var_names.get_indexer(kept), truth.var_names.get_indexer(kept)
    p, t = pred[pi, pg].copy(), truth[ti, tg].copy()
    for k in PER_GENE_OBSM:
        if k in p.obsm:
            p.obsm[k] = np.asarray(p.obsm[k])[:, :, pg]
    return p, t, kept, missing


def _members(p, m=slice(None)):
    """Members' (mu, r) as (M, n, G) float64, or None when absent or not an NB mixture."""
    if keys.MEMBER_MU not in p.obsm or keys.MEMBER_R not in p.obsm:
        return None
    mu = np.moveaxis(np.asarray(p.obsm[keys.MEMBER_MU], np.float64)[m], 1, 0)
    r = np.moveaxis(np.asarray(p.obsm[keys.MEMBER_R], np.float64)[m], 1, 0)
    return mu, r


def _is_counts(t: np.ndarray) -> bool:
    return bool(np.all(t >= 0) and np.all(t == np.round(t)))


def evaluate(pred, truth) -> tuple[pd.DataFrame, list[str]]:
    """Score predicted means against observed counts, per sample and gene.

    Spots are matched by ``obs_names``; genes by name. Returns (table, genes missing from
    the truth). Table columns: sample, gene, n_spots, pcc, spearman, note, ``auc`` and
    ``f1`` of the high/low call (:func:`high_low_scores`), and — when the
    prediction carries them — ``coverage`` (fraction of observed counts inside
    [q_lo, q_hi]) and ``nll`` (mean negative log-likelihood of the counts under the
    members' NB mixture); with the members' NB parameters and integer counts, ``crps``
    (mean CRPS of the mixture, lower is better) and ``pit_coverage`` (non-randomised PIT
    coverage of the central interval at the prediction's level, see
    :func:`prediction_level`; ≈ the level when calibrated); with the variance layers,
    ``ause_epistemic`` and ``ause_total`` (area under the sparsification error of the
    squared error of the mean, ranked by var_epistemic or by var_aleatoric + var_epistemic;
    0 = the uncertainty ranks the errors perfectly, NaN when it is constant); with spot
    coordinates, Moran's I of the observed and predicted
    expression, the bivariate Moran's I of prediction with observation (``moran_bv``), the
    paper's spatial ``iou`` (grid only) and the neighbour rule used (``weights``).
    """
    from stimage_jax.uncertainty_metrics import (
        nb_mixture_crps, nb_mixture_pit, pit_coverage_from_pit, sparsification_error,
    )

    p_all, t_all, genes, missing = match_prediction(pred, truth)
    level = prediction_level(pred)
    if keys.SAMPLE in t_all.obs:
        samples = t_all.obs[keys.SAMPLE].astype(str).to_numpy()
    else:
        samples = np.full(p_all.n_obs, "all")
    rows = []
    for s in pd.unique(samples):
        m = samples == s
        P, T = _dense(p_all.X[m]), _dense(t_all.X[m])
        if not np.all(np.isfinite(T)):
            raise StimageError(f"truth has NaN/inf counts in sample {s}")
        pcc, rho = pearson_per_gene(P, T), spearman_per_gene(P, T)
        const_t, const_p = T.std(0) == 0, P.std(0) == 0
        note = np.where(const_t, "constant in truth", np.where(const_p, "constant prediction", ""))
        auc, f1 = high_low_scores(P, T)
        if keys.P_HIGH in p_all.layers:  # a classifier: its call is P(high) > 0.5
            ph = _dense(p_all.layers[keys.P_HIGH][m])
            y, yhat = T > T.mean(0), ph > 0.5
            with np.errstate(invalid="ignore", divide="ignore"):
                f1 = np.where(np.isnan(auc), np.nan, 2 * (y & yhat).sum(0) / (y.sum(0) + yhat.sum(0)))
        row = {"sample": s, "gene": genes, "n_spots": int(m.sum()), "pcc": pcc, "spearman": rho, "note": note,
               "auc": auc, "f1": f1}
        if keys.Q_LO in p_all.layers and keys.Q_HI in p_all.layers:
            lo, hi = _dense(p_all.layers[keys.Q_LO][m]), _dense(p_all.layers[keys.Q_HI][m])
            row["coverage"] = ((T >= lo) & (T <= hi)).mean(0)
        members = _members(p_all, m)
        if members is not None:
            from export.runtime.moments import mixture_logpmf

            mu, r = members
            if np.isfinite(r).all():  # a point model (r = inf) has no likelihood
                row["nll"] = -mixture_logpmf(T, mu, r).mean(0)
                if np.isfinite(mu).all() and _is_counts(T):
                    row["crps"] = nb_mixture_crps(T, mu, r).mean(0)
                    row["pit_coverage"] = pit_coverage_from_pit(*nb_mixture_pit(T, mu, r), level)
        if keys.VAR_EPISTEMIC in p_all.layers and keys.VAR_ALEATORIC in p_all.layers:
            epi, ale = _dense(p_all.layers[keys.VAR_EPISTEMIC][m]), _dense(p_all.layers[keys.VAR_ALEATORIC][m])
            sq = np.square(P - T)
            if np.isfinite(epi).all() and np.isfinite(ale).all() and np.isfinite(sq).all():
                row["ause_epistemic"] = sparsification_error(sq, epi)["ause"]
                row["ause_total"] = sparsification_error(sq, ale + epi)["ause"]
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


def calibration_table(pred, truth, levels=None) -> pd.DataFrame:
    """Observed vs nominal coverage, pooled over all matched spots and genes.

    Columns: ``level`` (nominal), ``coverage_interval`` (fraction of counts inside the
    inclusive NB-mixture quantile interval at that level, as ``q_lo``/``q_hi``) and
    ``coverage_pit`` (non-randomised PIT coverage, ≈ level when calibrated). Needs the
    members' NB parameters (``obsm["nb_member_mu"]``/``["nb_member_r"]``) and integer
    counts. ``levels`` default: 0.1 … 0.9 by 0.1, and 0.95.
    """
    from stimage_jax.uncertainty_metrics import DEFAULT_LEVELS, interval_coverage_curve

    p_all, t_all, _, _ = match_prediction(pred, truth)
    members = _members(p_all)
    if members is None:
        raise StimageError("calibration needs the members' NB parameters (obsm['nb_member_mu'], "
                           "obsm['nb_member_r']); slide predictions do not keep them")
    mu, r = members
    if not (np.isfinite(r).all() and np.isfinite(mu).all()):
        raise StimageError("calibration needs an NB model; this prediction is a point model (r = inf)")
    T = _dense(t_all.X)
    if not _is_counts(T):
        raise StimageError("calibration needs non-negative integer counts in the truth")
    levels = DEFAULT_LEVELS if levels is None else tuple(levels)
    try:
        curve = interval_coverage_curve(T, mu, r, levels)
    except ValueError as e:
        raise StimageError(str(e)) from None
    return pd.DataFrame({"level": curve["level"], "coverage_interval": curve["interval"].mean(1),
                         "coverage_pit": curve["pit"].mean(1)})


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def summarise(table: pd.DataFrame) -> dict:
    """Mean/median PCC over (sample, gene) rows and the count of genes with PCC > 0, plus the
    mean of each uncertainty and spatial column present (NaN rows skipped)."""
    pcc = table["pcc"]
    extra = {k: _nanmean(table[k]) for k in ("coverage", "nll", "crps", "pit_coverage", "ause_epistemic",
                                             "ause_total", "moran_bv", "iou", "auc", "f1") if k in table}
    return {**extra, "rows": int(len(table)), "mean_pcc": float(np.nanmean(pcc)) if pcc.notna().any() else float("nan"),
            "median_pcc": float(np.nanmedian(pcc)) if pcc.notna().any() else float("nan"),
            "mean_spearman": float(np.nanmean(table["spearman"])) if table["spearman"].notna().any() else float("nan"),
            "n_pcc_positive": int((pcc > 0).sum()), "n_nan": int(pcc.isna().sum())}
