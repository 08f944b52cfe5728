"""Survival: univariate Cox per gene, cross-validated multivariate Cox of the top genes,
and a median-risk Kaplan–Meier split — all with lifelines.

lifelines (not scikit-survival) fits the models because its ``CoxPHFitter`` reports what
the output needs — hazard ratio, Wald 95 % CI, p-value and Harrell's c-index — and its
``KaplanMeierFitter``/``logrank_test``/``add_at_risk_counts`` draw the KM figure with
numbers at risk; scikit-survival's Cox gives coefficients only. The tests check HR and
c-index against scikit-survival independently.

Genes are z-scored (over the samples analysed, or over the training fold inside CV), so a
hazard ratio is per standard deviation of the gene.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipelines.errors import StimageError

__all__ = ["univariate_cox", "cv_multivariate", "km_split", "run_survival", "gene_cindex"]

_T, _E = "__time", "__event"


def _event(col: pd.Series) -> np.ndarray:
    v = col.to_numpy()
    if v.dtype == bool:
        return v.astype(int)
    s = pd.Series(v).astype(str).str.strip().str.lower()
    mapping = {"1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0, "yes": 1, "no": 0,
               "dead": 1, "alive": 0, "deceased": 1, "living": 0}
    out = s.map(mapping)
    if out.isna().any():
        raise StimageError(f"event column has values that are not 0/1/true/false: {s[out.isna()].iloc[0]!r}")
    return out.to_numpy(int)


def _z(df: pd.DataFrame, ref: pd.DataFrame | None = None) -> pd.DataFrame:
    ref = df if ref is None else ref
    sd = ref.std(axis=0, ddof=1).replace(0, np.nan)
    return (df - ref.mean(axis=0)) / sd


def _fit(X: pd.DataFrame, t: np.ndarray, e: np.ndarray, penalizer: float = 0.0):
    from lifelines import CoxPHFitter

    d = X.copy()
    d[_T], d[_E] = t, e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter(penalizer=penalizer).fit(d, duration_col=_T, event_col=_E)


def gene_cindex(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> float:
    """Harrell's c of one gene as a risk score in its better direction (≥ 0.5)."""
    from lifelines.utils import concordance_index

    c = concordance_index(t, -x, e)
    return max(c, 1.0 - c)


def univariate_cox(X: pd.DataFrame, t, e) -> pd.DataFrame:
    """gene, hr, hr_lo, hr_hi, p, c_index (Harrell's c of the fitted model), in column order."""
    Z = _z(X)
    rows = []
    for g in Z.columns:
        if Z[g].isna().all():
            continue
        m = _fit(Z[[g]], t, e)
        s = m.summary.loc[g]
        rows.append({"gene": g, "hr": float(s["exp(coef)"]), "hr_lo": float(s["exp(coef) lower 95%"]),
                     "hr_hi": float(s["exp(coef) upper 95%"]), "p": float(s["p"]),
                     "c_index": float(m.concordance_index_)})
    return pd.DataFrame(rows, columns=["gene", "hr", "hr_lo", "hr_hi", "p", "c_index"])


def cv_multivariate(X: pd.DataFrame, t, e, *, top: int = 5, folds: int = 3, repeats: int = 100, seed: int = 0,
                    penalizer: float = 0.1) -> dict:
    """Repeated stratified k-fold: in each training fold the ``top`` genes by univariate
    c-index are chosen and a multivariate Cox is fitted; its c-index on the held-out fold is
    kept. No information from the held-out fold reaches gene choice or scaling."""
    from lifelines.utils import concordance_index
    from sklearn.model_selection import RepeatedStratifiedKFold

    t, e = np.asarray(t, float), np.asarray(e, int)
    if min(np.bincount(e, minlength=2)) < folds:
        raise StimageError(f"too few events or censored samples for {folds}-fold CV")
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    scores, chosen = [], {}
    high = np.zeros(len(t), bool)  # first repeat: held-out sample above its training fold's median risk
    for k, (tr, te) in enumerate(cv.split(X, e)):
        Xtr, Xte = X.iloc[tr], X.iloc[te]
        ok = Xtr.columns[Xtr.std(axis=0, ddof=1) > 0]
        cs = {g: gene_cindex(Xtr[g].to_numpy(), t[tr], e[tr]) for g in ok}
        genes = sorted(cs, key=lambda g: (-cs[g], g))[:top]
        for g in genes:
            chosen[g] = chosen.get(g, 0) + 1
        m = _fit(_z(Xtr[genes]), t[tr], e[tr], penalizer)
        risk = np.asarray(m.predict_partial_hazard(_z(Xte[genes], Xtr[genes]))).ravel()
        scores.append(float(concordance_index(t[te], -risk, e[te])))
        if k < folds:
            train_risk = np.asarray(m.predict_partial_hazard(_z(Xtr[genes]))).ravel()
            high[te] = risk > np.median(train_risk)
    return {"c_index_mean": float(np.mean(scores)), "c_index_sd": float(np.std(scores, ddof=1)) if len(scores) > 1
            else 0.0, "c_index_folds": scores, "folds": folds, "repeats": repeats, "penalizer": penalizer,
            "times_chosen": dict(sorted(chosen.items(), key=lambda kv: -kv[1])), "cv_high_risk": high}


def km_split(t, e, high, out_png, *, title: str = "") -> dict:
    """Kaplan–Meier curves of the high / low risk groups with the log-rank p and numbers at
    risk. ``high`` comes from the cross-validation (Simon et al. 2011): each sample is
    labelled by a model that never saw it, against its training fold's median risk."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts
    from lifelines.statistics import logrank_test

    from data_pipelines.io import atomic_path
    from export.clinical.tables import plt

    t, e, high = np.asarray(t, float), np.asarray(e, int), np.asarray(high, bool)
    if high.all() or not high.any():
        raise StimageError("the cross-validated risk split left one group empty")
    lr = logrank_test(t[high], t[~high], e[high], e[~high])
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4.5))
    fits = []
    for name, mask in (("low risk", ~high), ("high risk", high)):
        k = KaplanMeierFitter(label=f"{name} (n={mask.sum()})").fit(t[mask], e[mask])
        k.plot_survival_function(ax=ax, ci_show=True)
        fits.append(k)
    add_at_risk_counts(*fits, ax=ax)
    ax.set_title(f"{title}cross-validated split at the training folds' median Cox risk\n"
                 f"log-rank p = {lr.p_value:.3g}", fontsize=9)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    pyplot.close(fig)
    return {"logrank_p": float(lr.p_value), "n_high": int(high.sum()), "n_low": int((~high).sum())}


def run_survival(expr, clinical, time_col: str, event_col: str, out, *, n_genes: int | None = None, top: int = 5,
                 folds: int = 3, repeats: int = 100, by: str | None = None, transform: str = "auto",
                 seed: int = 0, penalizer: float = 0.1) -> dict:
    """The ``stimage clinical survival`` run: univariate.csv, multivariate.json, km.png in ``out``."""
    from data_pipelines.io import atomic_path
    from export.clinical.tables import align, normalise, read_expr, read_table, top_variable

    X, kind = read_expr(expr)
    C = read_table(clinical, "clinical table")
    for c in (time_col, event_col, *([by] if by else [])):
        if c not in C.columns:
            raise StimageError(f"clinical table has no column {c!r} (columns: {', '.join(map(str, C.columns[:10]))})")
    C = C.dropna(subset=[time_col, event_col])
    X, C = align(X, C)
    X, used = normalise(X, transform, kind)
    X = top_variable(X.loc[:, X.std(axis=0) > 0], n_genes)
    t = pd.to_numeric(C[time_col], errors="coerce").to_numpy(float)
    if np.isnan(t).any() or (t < 0).any():
        raise StimageError(f"time column {time_col!r} must hold non-negative numbers")
    e = _event(C[event_col])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    uni = univariate_cox(X, t, e)
    uni.insert(0, "group", "all")
    parts = [uni]
    if by:
        for level, idx in C.groupby(by, observed=True).groups.items():
            m = C.index.isin(idx)
            if m.sum() >= 10 and e[m].sum() >= 2:
                u = univariate_cox(X.loc[m], t[m], e[m])
                u.insert(0, "group", str(level))
                parts.append(u)
    table = pd.concat(parts, ignore_index=True)
    with atomic_path(out / "univariate.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g")
    best = uni.sort_values(["c_index", "gene"], ascending=[False, True])["gene"].tolist()[:top]
    res = cv_multivariate(X, t, e, top=top, folds=folds, repeats=repeats, seed=seed, penalizer=penalizer)
    high = res.pop("cv_high_risk")
    km = km_split(t, e, high, out / "km.png")
    with atomic_path(out / "risk_groups.csv") as tmp:
        pd.DataFrame({"risk": np.where(high, "high", "low")}, index=pd.Index(X.index, name="sample")).to_csv(tmp)
    summary = {"genes": best, **res, **km, "n_samples": int(len(t)), "n_events": int(e.sum()),
               "transform": used, "genes_tested": int(X.shape[1])}
    with atomic_path(out / "multivariate.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary
