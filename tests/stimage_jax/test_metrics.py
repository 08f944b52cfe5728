"""Per-gene metrics against scipy, and their bad-input behaviour."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr, spearmanr

from data_pipelines.errors import StimageError
from stimage_jax.metrics import evaluate, pearson_per_gene, spearman_per_gene, summarise


def test_correlations_match_scipy(rng):
    p = rng.normal(size=(50, 6))
    t = p * 0.5 + rng.normal(size=(50, 6))
    t[:, 3] = rng.poisson(1.0, size=50)  # ties for Spearman
    for j in range(6):
        assert pearson_per_gene(p, t)[j] == pytest.approx(pearsonr(p[:, j], t[:, j])[0], abs=1e-12)
        assert spearman_per_gene(p, t)[j] == pytest.approx(spearmanr(p[:, j], t[:, j])[0], abs=1e-12)


def test_constant_gene_is_nan_not_crash(rng):
    p = rng.normal(size=(10, 2))
    t = np.c_[np.zeros(10), rng.normal(size=10)]
    r = pearson_per_gene(p, t)
    assert np.isnan(r[0]) and np.isfinite(r[1])


def _ad(x, spots, genes, sample):
    a = ad.AnnData(np.asarray(x, np.float32), obs=pd.DataFrame({"sample": sample}, index=spots),
                   var=pd.DataFrame(index=genes))
    return a


def test_evaluate_per_sample_and_missing_genes(rng):
    spots = [f"s{i}" for i in range(40)]
    truth = _ad(rng.poisson(3, size=(40, 3)), spots, ["A", "B", "C"], ["x"] * 20 + ["y"] * 20)
    pred = _ad(np.asarray(truth.X) + rng.normal(size=(40, 3)), spots, ["A", "B", "Z"], ["x"] * 40)
    table, missing = evaluate(pred, truth)
    assert missing == ["Z"]
    assert set(table["sample"]) == {"x", "y"} and len(table) == 4
    row = table[(table["sample"] == "y") & (table["gene"] == "B")].iloc[0]
    assert row["pcc"] == pytest.approx(pearsonr(pred.X[20:, 1], truth.X[20:, 1])[0], abs=1e-6)
    s = summarise(table)
    assert s["rows"] == 4 and s["n_nan"] == 0


def test_evaluate_no_common_spots():
    a = _ad(np.ones((2, 1)), ["a", "b"], ["G"], ["x", "x"])
    b = _ad(np.ones((2, 1)), ["c", "d"], ["G"], ["x", "x"])
    with pytest.raises(StimageError, match="no spot"):
        evaluate(a, b)


def test_uncertainty_columns_coverage_and_mixture_nll(rng):
    from scipy.stats import nbinom

    from data_pipelines import keys
    from export.prediction import build_prediction

    n, m = 300, 3
    mu = rng.gamma(3.0, 2.0, size=(m, n, 2))
    r = np.full((m, n, 2), 2.0)
    truth_counts = nbinom.rvs(2.0, 2.0 / (2.0 + mu[0]), random_state=1)  # drawn from member 0
    spots = [f"s{i}" for i in range(n)]
    truth = _ad(truth_counts, spots, ["A", "B"], ["x"] * n)
    pred = build_prediction(truth, mu, r, ["A", "B"], {"test": True}, interval=0.8)
    table, _ = evaluate(pred, truth)
    lo, hi = pred.layers["q_lo"], pred.layers["q_hi"]
    np.testing.assert_allclose(table["coverage"], ((truth_counts >= lo) & (truth_counts <= hi)).mean(0))
    ref = -np.log(nbinom.pmf(truth_counts[None], r, r / (r + mu)).mean(0)).mean(0)
    np.testing.assert_allclose(table["nll"], ref, rtol=1e-6)
    assert 0.7 < table["coverage"].mean() < 0.97  # counts drawn from a mixture member: roughly nominal
    assert pred.obsm[keys.MEMBER_MU].shape == (n, m, 2)


def _nb_prediction(rng, n=120, m=3, interval=0.8, r_value=None):
    from scipy.stats import nbinom

    from export.prediction import build_prediction

    mu = rng.gamma(3.0, 2.0, size=(m, n, 2))
    r = rng.uniform(1.0, 4.0, size=(m, n, 2)) if r_value is None else np.full((m, n, 2), r_value)
    counts = nbinom.rvs(2.0, 2.0 / (2.0 + mu[0]), random_state=3)
    spots = [f"s{i}" for i in range(n)]
    truth = _ad(counts, spots, ["A", "B"], ["x"] * (n // 2) + ["y"] * (n - n // 2))
    return build_prediction(truth, mu, r, ["A", "B"], {"test": True}, interval=interval), truth, mu, r, counts


def test_evaluate_uncertainty_columns_match_direct_calls(rng):
    from stimage_jax.uncertainty_metrics import nb_mixture_crps, pit_coverage, sparsification_error

    pred, truth, mu, r, counts = _nb_prediction(rng, interval=0.9)
    table, _ = evaluate(pred, truth)
    mu32, r32 = mu.astype(np.float32).astype(np.float64), r.astype(np.float32).astype(np.float64)
    for s, sl in (("x", slice(0, 60)), ("y", slice(60, 120))):
        rows = table[table["sample"] == s]
        y = counts[sl].astype(np.float64)
        np.testing.assert_allclose(rows["crps"], nb_mixture_crps(y, mu32[:, sl], r32[:, sl]).mean(0), rtol=1e-10)
        np.testing.assert_allclose(rows["pit_coverage"], pit_coverage(y, mu32[:, sl], r32[:, sl], 0.9), rtol=1e-10)
        sq = np.square(np.asarray(pred.X[sl], np.float64) - y)
        epi = np.asarray(pred.layers["var_epistemic"][sl], np.float64)
        ale = np.asarray(pred.layers["var_aleatoric"][sl], np.float64)
        np.testing.assert_allclose(rows["ause_epistemic"], sparsification_error(sq, epi)["ause"], rtol=1e-10)
        np.testing.assert_allclose(rows["ause_total"], sparsification_error(sq, ale + epi)["ause"], rtol=1e-10)
    s = summarise(table)
    for k in ("crps", "pit_coverage", "ause_epistemic", "ause_total"):
        assert s[k] == pytest.approx(table[k].mean())


def test_evaluate_point_model_has_ause_but_no_count_scores(rng):
    pred, truth, *_ = _nb_prediction(rng, r_value=np.inf)
    table, _ = evaluate(pred, truth)
    assert not {"nll", "crps", "pit_coverage"} & set(table.columns)
    assert np.isfinite(table["ause_epistemic"]).all()  # the members' spread still ranks the errors
    np.testing.assert_allclose(table["ause_total"], table["ause_epistemic"])  # no aleatoric variance
    assert "crps" not in summarise(table)


def test_calibration_table_pools_spots_and_genes(rng):
    from stimage_jax.metrics import calibration_table
    from stimage_jax.uncertainty_metrics import interval_coverage_curve

    pred, truth, mu, r, counts = _nb_prediction(rng)
    cal = calibration_table(pred, truth)
    assert list(cal.columns) == ["level", "coverage_interval", "coverage_pit"]
    assert list(cal["level"]) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    ref = interval_coverage_curve(counts.astype(np.float64), mu.astype(np.float32).astype(np.float64),
                                  r.astype(np.float32).astype(np.float64), cal["level"])
    np.testing.assert_allclose(cal["coverage_pit"], ref["pit"].mean(1))
    np.testing.assert_allclose(cal["coverage_interval"], ref["interval"].mean(1))
    assert cal["coverage_interval"].is_monotonic_increasing
    del pred.obsm["nb_member_mu"]
    with pytest.raises(StimageError, match="members' NB parameters"):
        calibration_table(pred, truth)


def test_high_low_auc_and_f1_match_sklearn(rng):
    from sklearn.metrics import f1_score, roc_auc_score

    from stimage_jax.metrics import high_low_scores

    truth = rng.poisson(3.0, size=(80, 4)).astype(float)
    pred = truth + rng.normal(0, 2.0, size=truth.shape)
    pred[:, 3] = np.round(pred[:, 3])  # ties in the prediction
    truth[:, 2] = 5.0  # one class only → NaN
    auc, f1 = high_low_scores(pred, truth)
    for g in (0, 1, 3):
        y = truth[:, g] > truth[:, g].mean()
        assert auc[g] == pytest.approx(roc_auc_score(y, pred[:, g]), abs=1e-12)
        assert f1[g] == pytest.approx(f1_score(y, pred[:, g] > pred[:, g].mean()), abs=1e-12)
    assert np.isnan(auc[2]) and np.isnan(f1[2])


def test_top_genes_ranks_by_mean_over_samples():
    import pandas as pd

    from stimage_jax.metrics import top_genes

    t = pd.DataFrame({"sample": ["a", "a", "b", "b"], "gene": ["X", "Y", "X", "Y"], "pcc": [0.1, 0.5, 0.3, 0.2]})
    top = top_genes(t, n=1)
    assert list(top["gene"]) == ["Y"] and top["mean_pcc"].iloc[0] == pytest.approx(0.35)
