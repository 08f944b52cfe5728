"""Clinical analyses on real data: survival and response on GSE7390 (scikit-survival's
breast-cancer cohort: 198 patients, 76 genes, distant metastasis), checked against
scikit-survival and scikit-learn computed independently here; bulk agreement on HER2ST
sections' pseudo-bulk."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stimage_jax.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def gse7390(tmp_path_factory):
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    genes = X.select_dtypes("number").drop(columns=["age", "size"])
    ids = [f"P{i:03d}" for i in range(len(genes))]
    genes.index = ids
    d = tmp_path_factory.mktemp("gse7390")
    genes.to_csv(d / "expr.csv", index_label="sample")
    clin = pd.DataFrame({"time": y["t.tdm"], "event": y["e.tdm"].astype(int), "er": X["er"].astype(str).to_numpy(),
                         "grade": X["grade"].astype(str).to_numpy()}, index=pd.Index(ids, name="sample"))
    clin.to_csv(d / "clinical.csv")
    return {"dir": d, "genes": genes, "y": y, "clin": clin}


def test_survival_matches_scikit_survival_and_writes_the_reports(gse7390, tmp_path, capsys):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.metrics import concordance_index_censored

    d, out = gse7390["dir"], tmp_path / "surv"
    assert main(["clinical", "survival", "--expr", str(d / "expr.csv"), "--clinical", str(d / "clinical.csv"),
                 "--time", "time", "--event", "event", "--out", str(out), "--genes", "16", "--top", "3",
                 "--folds", "3", "--repeats", "2", "--by", "er"]) == 0
    assert "held-out c-index" in capsys.readouterr().out
    uni = pd.read_csv(out / "univariate.csv")
    assert list(uni.columns) == ["group", "gene", "hr", "hr_lo", "hr_hi", "p", "c_index"]
    assert set(uni["group"]) == {"all", "negative", "positive"}
    allg = uni[uni.group == "all"].set_index("gene")
    assert len(allg) == 16  # the 16 most variable genes
    y, G = gse7390["y"], gse7390["genes"]
    for g in allg.index:
        z = ((G[g] - G[g].mean()) / G[g].std()).to_numpy()[:, None]  # HR per SD
        m = CoxPHSurvivalAnalysis(alpha=0, ties="efron").fit(z, y)
        assert allg.loc[g, "hr"] == pytest.approx(np.exp(m.coef_[0]), rel=1e-4)
        c = concordance_index_censored(y["e.tdm"], y["t.tdm"], m.predict(z))[0]
        assert allg.loc[g, "c_index"] == pytest.approx(c, abs=1e-9)
        # Wald: p < 0.05 exactly when the 95 % CI excludes 1
        assert allg.loc[g, "hr_lo"] < allg.loc[g, "hr"] < allg.loc[g, "hr_hi"]
        assert (allg.loc[g, "p"] < 0.05) == (allg.loc[g, "hr_lo"] > 1 or allg.loc[g, "hr_hi"] < 1)
    mv = json.loads((out / "multivariate.json").read_text())
    assert mv["genes"] == allg.sort_values("c_index", ascending=False).index[:3].tolist()
    assert (mv["folds"], mv["repeats"], len(mv["c_index_folds"])) == (3, 2, 6)
    assert 0.55 < mv["c_index_mean"] < 0.8 and mv["c_index_sd"] > 0  # GSE7390's signal is modest but real
    assert mv["n_samples"] == 198 and mv["n_events"] == int(y["e.tdm"].sum()) and mv["n_high"] + mv["n_low"] == 198
    # the cross-validated KM groups' log-rank p, recomputed with scikit-survival
    from sksurv.compare import compare_survival

    groups = pd.read_csv(out / "risk_groups.csv", index_col=0)["risk"]
    assert list(groups.index) == list(gse7390["clin"].index) and set(groups) == {"high", "low"}
    assert mv["logrank_p"] == pytest.approx(compare_survival(y, groups.to_numpy())[1], rel=1e-6)
    assert (out / "km.png").read_bytes()[:4] == b"\x89PNG"


def test_cv_gene_choice_does_not_leak(gse7390):
    """Pure-noise genes: chosen inside each training fold, their held-out c-index is ~0.5
    (choosing them on all samples would inflate it)."""
    from export.clinical.survival import cv_multivariate

    y = gse7390["y"]
    noise = pd.DataFrame(np.random.default_rng(0).normal(size=(len(y), 40)), columns=[f"n{i}" for i in range(40)])
    r = cv_multivariate(noise, y["t.tdm"], y["e.tdm"].astype(int), top=3, folds=3, repeats=4)
    assert abs(r["c_index_mean"] - 0.5) < 0.05


def test_response_auc_equals_scikit_learn_nested_cv(gse7390, tmp_path, capsys):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    d, out = gse7390["dir"], tmp_path / "resp"
    assert main(["clinical", "response", "--expr", str(d / "expr.csv"), "--labels", str(d / "clinical.csv"),
                 "--label", "er", "--positive", "positive", "--out", str(out)]) == 0
    r = json.loads((out / "response.json").read_text())
    assert len(r["auc_folds"]) == 5 and r["auc_mean"] == pytest.approx(np.mean(r["auc_folds"]))
    # the same nested CV written directly with scikit-learn
    X, y = gse7390["genes"].to_numpy(), (gse7390["clin"]["er"] == "positive").to_numpy(int)
    inner = GridSearchCV(make_pipeline(StandardScaler(), SVC(kernel="rbf")),
                         {"svc__C": [0.1, 1.0, 10.0], "svc__gamma": ["scale", 0.01, 0.001]}, scoring="roc_auc",
                         cv=StratifiedKFold(5, shuffle=True, random_state=0))
    ref = cross_val_score(inner, X, y, scoring="roc_auc", cv=StratifiedKFold(5, shuffle=True, random_state=0))
    np.testing.assert_allclose(r["auc_folds"], ref, rtol=1e-12)
    assert r["auc_mean"] > 0.8  # ER status is visible in these genes
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_bulk_on_her2st_pseudobulk_matches_scipy(her2st_root, tmp_path, capsys):
    """Six HER2ST C sections: the mean of half the spots (a stand-in for a slide's predicted
    pseudo-bulk) against the total counts of the other half (the 'bulk')."""
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    pred, bulk = {}, {}
    for s in ("C1", "C2", "C3", "C4", "C5", "C6"):
        c = pd.read_csv(her2st_root / "data" / "ST-cnts" / f"{s}.tsv.gz", sep="\t", index_col=0)
        half = rng.permutation(len(c)) < len(c) // 2
        pred[s], bulk[s] = c[half].mean(), c[~half].sum()
    P, B = pd.DataFrame(pred).T.fillna(0), pd.DataFrame(bulk).T.fillna(0)
    genes = B.sum().sort_values(ascending=False).index[:200]
    P[genes].to_csv(tmp_path / "pred.csv", index_label="sample")
    B[genes[::-1]].round().astype(int).to_csv(tmp_path / "bulk.csv", index_label="sample")  # other column order
    assert main(["clinical", "bulk", "--pred", str(tmp_path / "pred.csv"), "--pred-transform", "log",
                 "--bulk", str(tmp_path / "bulk.csv"), "--out", str(tmp_path / "b")]) == 0
    g = pd.read_csv(tmp_path / "b" / "bulk_genes.csv").set_index("gene")
    s = pd.read_csv(tmp_path / "b" / "bulk_samples.csv").set_index("sample")
    lp = np.log1p(P[genes])
    Bi = B[genes].round()
    lb = np.log1p(Bi.div(Bi.sum(axis=1), axis=0) * 1e6)  # CPM of the integer counts
    for gene in genes[:20]:
        assert g.loc[gene, "pcc"] == pytest.approx(pearsonr(lp[gene], lb[gene])[0], abs=1e-5)
        assert g.loc[gene, "spearman"] == pytest.approx(spearmanr(lp[gene], lb[gene])[0], abs=1e-5)
    for smp in s.index:
        assert s.loc[smp, "pcc"] == pytest.approx(pearsonr(lp.loc[smp], lb.loc[smp])[0], abs=1e-5)
    assert (s["pcc"] > 0.9).all()  # two halves of one section agree across genes
    assert (tmp_path / "b" / "bulk_genes.png").read_bytes()[:4] == b"\x89PNG"


def test_clinical_bad_input_is_one_line(gse7390, tmp_path, capsys):
    d = gse7390["dir"]
    assert main(["clinical", "survival", "--expr", str(d / "expr.csv"), "--clinical", str(d / "clinical.csv"),
                 "--time", "months", "--event", "event", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stimage: error: clinical table has no column 'months'") and err.count("\n") == 1
    assert main(["clinical", "response", "--expr", str(d / "expr.csv"), "--labels", str(d / "clinical.csv"),
                 "--label", "er", "--positive", "yes", "--out", str(tmp_path / "y")]) == 2
    assert "no sample has er = 'yes'" in capsys.readouterr().err
