"""Drug response: an RBF-kernel SVM (scikit-learn) under nested stratified 5-fold CV — an
inner grid search over C and gamma by ROC AUC inside each outer training fold, AUC on each
outer held-out fold. Standardisation is a pipeline step, so it is fitted on training folds only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipelines.errors import StimageError

__all__ = ["nested_svm", "run_response", "C_GRID", "GAMMA_GRID", "make_search"]

C_GRID = (0.1, 1.0, 10.0)
GAMMA_GRID = ("scale", 0.01, 0.001)


def make_search(seed: int = 0, inner: int = 5):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    pipe = make_pipeline(StandardScaler(), SVC(kernel="rbf"))
    return GridSearchCV(pipe, {"svc__C": list(C_GRID), "svc__gamma": list(GAMMA_GRID)}, scoring="roc_auc",
                        cv=StratifiedKFold(inner, shuffle=True, random_state=seed), n_jobs=1)


def nested_svm(X: np.ndarray, y: np.ndarray, *, outer: int = 5, inner: int = 5, seed: int = 0) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y, int)
    if min(np.bincount(y, minlength=2)) < outer:
        raise StimageError(f"each class needs at least {outer} samples for {outer}-fold CV "
                           f"(have {np.bincount(y, minlength=2).tolist()})")
    aucs, curves, params = [], [], []
    for tr, te in StratifiedKFold(outer, shuffle=True, random_state=seed).split(X, y):
        s = make_search(seed, inner).fit(X[tr], y[tr])
        score = s.decision_function(X[te])
        aucs.append(float(roc_auc_score(y[te], score)))
        fpr, tpr, _ = roc_curve(y[te], score)
        curves.append((fpr, tpr))
        params.append({k.removeprefix("svc__"): v for k, v in s.best_params_.items()})
    return {"auc_mean": float(np.mean(aucs)), "auc_sd": float(np.std(aucs, ddof=1)), "auc_folds": aucs,
            "best_params": params, "curves": curves}


def run_response(expr, labels, label: str, positive: str, out, *, transform: str = "auto", seed: int = 0,
                 outer: int = 5, inner: int = 5) -> dict:
    from data_pipelines.io import atomic_path
    from export.clinical.tables import align, normalise, plt, read_expr, read_table

    X, kind = read_expr(expr)
    L = read_table(labels, "label table")
    if label not in L.columns:
        raise StimageError(f"label table has no column {label!r}")
    L = L.dropna(subset=[label])
    X, L = align(X, L)
    X, used = normalise(X, transform, kind)
    X = X.loc[:, X.std(axis=0) > 0]
    vals = L[label].astype(str).str.strip()
    if str(positive) not in set(vals):
        raise StimageError(f"no sample has {label} = {positive!r} (values: {', '.join(sorted(set(vals))[:8])})")
    y = (vals == str(positive)).to_numpy(int)
    r = nested_svm(X.to_numpy(), y, outer=outer, inner=inner, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(4.5, 4.5))
    for i, (fpr, tpr) in enumerate(r.pop("curves")):
        ax.plot(fpr, tpr, lw=1, alpha=0.7, label=f"fold {i + 1} AUC {r['auc_folds'][i]:.2f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"RBF SVM, nested {outer}-fold CV: AUC {r['auc_mean']:.2f} ± {r['auc_sd']:.2f}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(out / "roc.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    pyplot.close(fig)
    summary = {**r, "n_samples": int(len(y)), "n_positive": int(y.sum()), "label": label, "positive": str(positive),
               "transform": used, "n_genes": int(X.shape[1]), "outer_folds": outer, "inner_folds": inner,
               "grid": {"C": list(C_GRID), "gamma": list(GAMMA_GRID)}, "seed": seed}
    with atomic_path(out / "response.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary
