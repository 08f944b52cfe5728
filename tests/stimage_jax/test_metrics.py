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
    from export.runtime.prediction import build_prediction

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

    from export.runtime.prediction import build_prediction

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


# --- real HER2ST sections: genes differ between sections (issue 13 item 1) -------------------
# C5 and C6 list different genes; a model's gene list can hold a gene C5 has and C6 lacks.
# The prediction below is for C6 with fake NB members; every score is checked against an
# independent scipy computation on the truth column *of the same name*.

@pytest.fixture(scope="module")
def c5_c6(her2st_root):
    import warnings

    from data_pipelines.slides import read_her2st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropped-spot notes
        return read_her2st(her2st_root, "C5"), read_her2st(her2st_root, "C6")


def _real_genes(c5, c6):
    """(4 genes both sections have, moderately expressed in C6; 1 gene C5 has and C6 lacks)."""
    only_c5 = sorted(set(c5.var_names) - set(c6.var_names))
    tot5 = np.asarray(c5[:, only_c5].X.sum(0)).ravel()
    absent = only_c5[int(np.argmax(tot5))]  # the most expressed one: a plausible HVG
    shared = sorted(set(c5.var_names) & set(c6.var_names))
    mean6 = np.asarray(c6[:, shared].X.mean(0)).ravel()
    return [g for g, m in zip(shared, mean6) if 2.0 < m < 8.0][:4], absent


def _fake_prediction(truth, genes, rng, m=3, absent_truth=None):
    """Prediction AnnData for ``truth``'s spots: member NB means near the observed counts
    (noisy), dispersions in [1, 4]; X the mixture mean; variance layers from the members.
    ``absent_truth`` supplies counts for genes ``truth`` lacks (any section having them)."""
    cols = []
    for g in genes:
        src = truth if g in set(truth.var_names) else absent_truth
        x = np.asarray(src[:, g].X.toarray()).ravel()[: truth.n_obs]
        cols.append(np.resize(x, truth.n_obs))
    y = np.stack(cols, 1).astype(np.float64)
    mu = (y[None] + 0.5) * rng.lognormal(0.0, 0.4, size=(m, *y.shape))
    r = rng.uniform(1.0, 4.0, size=mu.shape)
    pred = ad.AnnData(mu.mean(0).astype(np.float32), obs=pd.DataFrame(index=truth.obs_names.copy()),
                      var=pd.DataFrame(index=list(genes)))
    pred.layers["var_aleatoric"] = (mu + mu**2 / r).mean(0).astype(np.float32)
    pred.layers["var_epistemic"] = mu.var(0).astype(np.float32)
    pred.obsm["nb_member_mu"] = np.moveaxis(mu, 0, 1).astype(np.float32)  # (spots, members, genes)
    pred.obsm["nb_member_r"] = np.moveaxis(r, 0, 1).astype(np.float32)
    return pred


def _reference_scores(pred, truth, gene):
    """Scores of one gene computed independently: scipy pmf/cdf sums, hand-built rook grid."""
    from scipy.stats import nbinom

    j = list(pred.var_names).index(gene)
    spots = truth.obs_names
    p = pred[spots]
    y = np.asarray(truth[:, gene].X.toarray()).ravel().astype(np.float64)
    xhat = np.asarray(p.X[:, j], np.float64)
    mu = np.asarray(p.obsm["nb_member_mu"][:, :, j], np.float64).T  # (M, n)
    r = np.asarray(p.obsm["nb_member_r"][:, :, j], np.float64).T
    nll = -np.log(nbinom.pmf(y[None], r, r / (r + mu)).mean(0)).mean()
    k = np.arange(0, int(y.max()) * 4 + 400)[:, None, None]
    cdf = nbinom.cdf(k, r[None], r[None] / (r[None] + mu[None])).mean(1)  # (K, n)
    crps = ((cdf - (y[None] <= k[:, 0])) ** 2).sum(0).mean()
    rows, cols = truth.obs["array_row"].to_numpy(), truth.obs["array_col"].to_numpy()
    w = ((np.abs(rows[:, None] - rows[None]) + np.abs(cols[:, None] - cols[None])) == 1).astype(float)
    w /= np.maximum(w.sum(1, keepdims=True), 1)
    z = y - y.mean()
    moran = len(y) / w.sum() * (z @ w @ z) / (z @ z)
    return {"pcc": pearsonr(xhat, y)[0], "spearman": spearmanr(xhat, y)[0], "nll": nll, "crps": crps,
            "moran_i_obs": moran}


def test_evaluate_real_sections_skips_gene_the_truth_lacks(c5_c6, rng):
    c5, c6 = c5_c6
    shared, absent = _real_genes(c5, c6)
    assert absent in set(c5.var_names) and absent not in set(c6.var_names) and len(shared) == 4
    genes = [shared[0], absent, *shared[1:]]
    pred = _fake_prediction(c6, genes, rng, absent_truth=c5)
    table, missing = evaluate(pred, c6)  # crashed with a broadcast ValueError before
    assert missing == [absent]
    assert list(table["gene"]) == shared and set(table["sample"]) == {"C6"}
    assert (table["n_spots"] == c6.n_obs).all()
    for g in shared:
        row = table.set_index("gene").loc[g]
        ref = _reference_scores(pred, c6, g)
        for k, v in ref.items():
            assert row[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (g, k)
    assert np.isfinite(table[["pit_coverage", "ause_epistemic", "ause_total", "iou"]].to_numpy()).all()


def test_evaluate_real_section_prediction_genes_in_another_order(c5_c6, rng):
    _, c6 = c5_c6
    shared, _ = _real_genes(*c5_c6)
    in_truth = [g for g in c6.var_names if g in set(shared)]
    order = in_truth[::-1]  # the prediction lists them in the reverse of C6's column order
    assert order != in_truth
    pred = _fake_prediction(c6, order, rng)
    table, missing = evaluate(pred, c6)
    assert missing == [] and list(table["gene"]) == order
    for g in order:
        row = table.set_index("gene").loc[g]
        for k, v in _reference_scores(pred, c6, g).items():
            assert row[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (g, k)
    # the same prediction with its genes (and member arrays) permuted scores identically
    perm = [2, 0, 3, 1]
    shuffled = pred[:, perm].copy()
    for key in ("nb_member_mu", "nb_member_r"):
        shuffled.obsm[key] = pred.obsm[key][:, :, perm]
    again, _ = evaluate(shuffled, c6)
    cols = ["pcc", "spearman", "auc", "nll", "crps", "pit_coverage", "ause_total", "moran_i_pred", "iou"]
    pd.testing.assert_frame_equal(again.set_index("gene").loc[order, cols], table.set_index("gene")[cols])


def test_calibration_table_real_sections_skips_missing_gene(c5_c6, rng):
    from scipy.stats import nbinom

    from stimage_jax.metrics import calibration_table

    c5, c6 = c5_c6
    shared, absent = _real_genes(c5, c6)
    pred = _fake_prediction(c6, [absent, *shared], rng, absent_truth=c5)
    levels = (0.5, 0.8)
    cal = calibration_table(pred, c6, levels)
    # reference: y inside the mixture's inclusive central interval ⇔ F(y) ≥ a and F(y−1) < b
    y = np.asarray(c6[pred.obs_names, shared].X.toarray(), np.float64)
    mu = np.moveaxis(np.asarray(pred.obsm["nb_member_mu"][:, :, 1:], np.float64), 1, 0)
    r = np.moveaxis(np.asarray(pred.obsm["nb_member_r"][:, :, 1:], np.float64), 1, 0)
    f_hi = nbinom.cdf(y[None], r, r / (r + mu)).mean(0)
    f_lo = nbinom.cdf(y[None] - 1, r, r / (r + mu)).mean(0)
    for level, got in zip(levels, cal["coverage_interval"]):
        a, b = (1 - level) / 2, (1 + level) / 2
        assert got == pytest.approx(((f_hi >= a) & (f_lo < b)).mean(), abs=1e-12)


def test_match_prediction_subsets_member_arrays_and_refuses_bad_input(rng):
    from stimage_jax.metrics import match_prediction

    spots = [f"s{i}" for i in range(6)]
    truth = _ad(rng.poisson(3, size=(6, 3)), spots, ["A", "B", "C"], ["x"] * 6)
    pred = _ad(rng.normal(size=(5, 3)), spots[::-1][:5], ["C", "Z", "A"], ["x"] * 5)
    mu = rng.uniform(1, 5, size=(5, 2, 3))
    pred.obsm["nb_member_mu"], pred.obsm["nb_member_r"] = mu, mu + 1
    p, t, genes, missing = match_prediction(pred, truth)
    assert genes == ["C", "A"] and missing == ["Z"]
    assert list(p.obs_names) == list(t.obs_names) == spots[::-1][:5]
    np.testing.assert_array_equal(p.obsm["nb_member_mu"], mu[:, :, [0, 2]])
    np.testing.assert_array_equal(p.X, np.asarray(pred.X)[:, [0, 2]])
    np.testing.assert_array_equal(t.X, np.asarray(truth.X)[::-1][:5][:, [2, 0]])
    assert match_prediction(pred, truth, ["A"])[2] == ["A"]
    with pytest.raises(StimageError, match="not in the prediction: B"):
        match_prediction(pred, truth, ["A", "B"])
    bad = pred.copy()
    bad.obsm["nb_member_r"] = mu[:, :, :2]
    with pytest.raises(StimageError, match=r"obsm\['nb_member_r'\] is shaped \(5, 2, 2\)"):
        match_prediction(bad, truth)
    with pytest.raises(StimageError, match="share no genes"):
        match_prediction(_ad(np.ones((5, 1)), spots[:5], ["Z"], ["x"] * 5), truth)
