"""evaluate_files: the ``stimage evaluate`` job as a library call — scores, messages, and an
output set that is checked whole before anything is written (issue 13 items 1, 8, 9)."""

from __future__ import annotations

import os
import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import nbinom, pearsonr, spearmanr

from data_pipelines import keys
from data_pipelines.errors import StimageError
from stimage_jax.evaluation import EvaluationReport, evaluate_files, uncertainty_plot_path

PNG = b"\x89PNG\r\n\x1a\n"


def _truth(rng, genes=("A", "B", "C"), grid=8, sample="s0") -> ad.AnnData:
    """grid × grid legacy-ST-like section, NB counts with a spatial trend per gene."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    mean = 2.0 + 6.0 * (r / grid)[:, None] * np.arange(1, len(genes) + 1)[None] / len(genes)
    counts = rng.negative_binomial(3.0, 3.0 / (3.0 + mean)).astype(np.int32)
    obs = pd.DataFrame({keys.SAMPLE: pd.Categorical([sample] * len(r)), keys.ARRAY_ROW: r, keys.ARRAY_COL: c},
                       index=[f"{sample}_{i}x{j}" for i, j in zip(c, r)])
    a = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=list(genes)))
    a.obsm[keys.SPATIAL] = np.c_[c * 50.0 + 100, r * 50.0 + 100]
    return a


def _pred(truth, genes, rng, m=3, r_value=None, extra_counts=None) -> ad.AnnData:
    """Fake NB members around the observed counts of ``genes`` (``extra_counts`` for genes
    the truth lacks); X the mixture mean and the variance layers stimage predict writes."""
    y = np.stack([np.asarray(truth[:, g].X.toarray()).ravel() if g in set(truth.var_names)
                  else extra_counts for g in genes], 1).astype(np.float64)
    mu = (y[None] + 0.5) * rng.lognormal(0.0, 0.4, size=(m, *y.shape))
    r = rng.uniform(1.0, 4.0, size=mu.shape) if r_value is None else np.full(mu.shape, r_value)
    p = ad.AnnData(mu.mean(0).astype(np.float32), obs=pd.DataFrame(index=truth.obs_names.copy()),
                   var=pd.DataFrame(index=list(genes)))
    p.layers[keys.VAR_ALEATORIC] = (mu + mu**2 / r).mean(0).astype(np.float32)
    p.layers[keys.VAR_EPISTEMIC] = mu.var(0).astype(np.float32)
    p.obsm[keys.MEMBER_MU] = np.moveaxis(mu, 0, 1).astype(np.float32)
    p.obsm[keys.MEMBER_R] = np.moveaxis(r, 0, 1).astype(np.float32)
    p.obsm[keys.SPATIAL] = truth.obsm[keys.SPATIAL].copy()
    return p


@pytest.fixture
def files(tmp_path, rng):
    """(pred path, truth path, pred AnnData, truth AnnData) of a tiny synthetic section."""
    truth = _truth(rng)
    pred = _pred(truth, ["B", "A", "C"], rng)  # not the truth's gene order
    tp, pp = tmp_path / "truth.h5ad", tmp_path / "pred.h5ad"
    truth.write_h5ad(tp)
    pred.write_h5ad(pp)
    return pp, tp, pred, truth


def _png_wh(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG
    h, w = mpimg.imread(path).shape[:2]
    return w, h


def _listing(d):
    return sorted(p.name for p in d.rglob("*"))


def test_scores_messages_and_every_output(files, tmp_path):
    pp, tp, pred, truth = files
    out, maps, cal = tmp_path / "res" / "m.csv", tmp_path / "res" / "maps.png", tmp_path / "res" / "cal.png"
    rep = evaluate_files(pp, tp, out, plot=maps, uncertainty_genes=["A"], calibration=cal)
    assert isinstance(rep, EvaluationReport) and rep.missing == []
    unc = tmp_path / "res" / "m_uncertainty_A.png"
    assert rep.written == [out, maps, unc, cal]
    table = pd.read_csv(out)
    assert list(table["gene"]) == ["B", "A", "C"]
    for g in ("A", "B", "C"):
        y = np.asarray(truth[:, g].X.toarray()).ravel()
        x = np.asarray(pred[:, g].X).ravel()
        row = table.set_index("gene").loc[g]
        assert row["pcc"] == pytest.approx(pearsonr(x, y)[0], abs=1e-9)
        assert row["spearman"] == pytest.approx(spearmanr(x, y)[0], abs=1e-9)
        mu = np.asarray(pred[:, g].obsm[keys.MEMBER_MU][:, :, list(pred.var_names).index(g)], np.float64).T
        r = np.asarray(pred.obsm[keys.MEMBER_R][:, :, list(pred.var_names).index(g)], np.float64).T
        nll = -np.log(nbinom.pmf(y[None], r, r / (r + mu)).mean(0)).mean()
        assert row["nll"] == pytest.approx(nll, rel=1e-6)
    assert list(table.columns) == list(rep.table.columns)
    num = table.select_dtypes("number").columns.drop("note")  # all-empty notes read back as NaN
    np.testing.assert_allclose(table[num].to_numpy(float), rep.table[num].to_numpy(float), rtol=1e-12)
    assert list(table["note"].fillna("")) == list(rep.table["note"]) == ["", "", ""]
    pccs = [pearsonr(np.asarray(pred[:, g].X).ravel(), np.asarray(truth[:, g].X.toarray()).ravel())[0]
            for g in ("B", "A", "C")]
    lines = rep.lines()
    assert len(lines) == 4
    assert lines[0].startswith(f"3 sample x gene rows: mean PCC {np.mean(pccs):.3f}, "
                               f"median PCC {np.median(pccs):.3f}, mean Spearman ")
    assert re.search(r", NB-mixture NLL \d+\.\d{3}, CRPS \d+\.\d{3}, PIT coverage 0\.\d{3} \(nominal 0\.8\) -> "
                     + re.escape(str(out)) + "$", lines[0]), lines[0]
    best2 = [g for _, g in sorted(zip(pccs, ["B", "A", "C"]), reverse=True)[:2]]
    assert lines[1] == f"spatial maps of {', '.join(best2)} -> {maps}"
    assert lines[2] == f"mean, aleatoric and epistemic SD maps of A -> {unc}"
    assert lines[3] == f"coverage calibration over 10 nominal levels -> {cal}"
    w, h = _png_wh(maps)
    assert 0.8 < w / h < 1.4  # two genes: a 2 × 2 grid of maps
    w, h = _png_wh(unc)
    assert w > 2.5 * h  # observed, mean, aleatoric, epistemic side by side
    _png_wh(cal)
    assert _listing(tmp_path / "res") == ["cal.png", "m.csv", "m_uncertainty_A.png", "maps.png"]  # no temporaries


def test_real_sections_missing_gene_listed_and_skipped(her2st_root, tmp_path, rng):
    """Issue 13 item 1 end to end on HER2ST: a model gene C5 has and C6 lacks."""
    from data_pipelines.io import write_h5ad
    from data_pipelines.slides import read_her2st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c5, c6 = read_her2st(her2st_root, "C5"), read_her2st(her2st_root, "C6")
    only_c5 = sorted(set(c5.var_names) - set(c6.var_names))
    absent = only_c5[int(np.argmax(np.asarray(c5[:, only_c5].X.sum(0)).ravel()))]
    top = np.argsort(-np.asarray(c6.X.sum(0)).ravel())
    shared = [g for g in c6.var_names[top[20:60]] if g in set(c5.var_names)][:3]
    c6_small = c6[:, list(c6.var_names[top[:300]])].copy()  # a smaller truth file; still real counts
    x5 = np.resize(np.asarray(c5[:, absent].X.toarray()).ravel(), c6.n_obs)
    pred = _pred(c6_small, [shared[0], absent, *shared[1:]], rng, extra_counts=x5)
    pp, tp = tmp_path / "C6_pred.h5ad", tmp_path / "C6.h5ad"
    write_h5ad(pred, pp)
    write_h5ad(c6_small, tp)
    out = tmp_path / "metrics.csv"
    rep = evaluate_files(pp, tp, out, plot=tmp_path / "maps.png", uncertainty_genes=[absent, shared[0]],
                         calibration=tmp_path / "cal.png")
    assert rep.missing == [absent]
    assert rep.lines()[0] == f"1 predicted gene(s) absent from the truth, not scored: {absent}"
    table = pd.read_csv(out)
    assert list(table["gene"]) == shared and (table["sample"] == "C6").all()
    for g in shared:
        y = np.asarray(c6[:, g].X.toarray()).ravel()
        assert table.set_index("gene").loc[g, "pcc"] == pytest.approx(
            pearsonr(np.asarray(pred[:, g].X).ravel(), y)[0], abs=1e-6)
    assert np.isfinite(table[["nll", "crps", "pit_coverage", "ause_total", "moran_bv", "iou"]].to_numpy()).all()
    w_abs, h_abs = _png_wh(uncertainty_plot_path(out, absent))  # no observed panel: 3 maps
    w_sh, h_sh = _png_wh(uncertainty_plot_path(out, shared[0]))  # 4 maps
    assert w_abs / h_abs < w_sh / h_sh
    assert len(rep.written) == 5 and all(p.is_file() for p in rep.written)


@pytest.mark.parametrize("existing", ["m.csv", "maps.png", "m_uncertainty_A.png", "cal.png"])
def test_any_existing_output_refused_before_writing_any(files, tmp_path, existing):
    pp, tp, *_ = files
    (tmp_path / existing).write_bytes(b"keep")
    before = _listing(tmp_path)
    with pytest.raises(StimageError, match=f"{existing} already exists"):
        evaluate_files(pp, tp, tmp_path / "m.csv", plot=tmp_path / "maps.png", uncertainty_genes=["A"],
                       calibration=tmp_path / "cal.png")
    assert _listing(tmp_path) == before and (tmp_path / existing).read_bytes() == b"keep"


@pytest.mark.parametrize("which", ["out", "plot", "calibration"])
def test_output_equal_to_an_input_refused_even_with_overwrite(files, tmp_path, which):
    pp, tp, *_ = files
    kw = {"out": tmp_path / "m.csv", "plot": tmp_path / "maps.png", "calibration": tmp_path / "cal.png"}
    kw[which] = tp if which != "plot" else pp
    truth_bytes, pred_bytes = tp.read_bytes(), pp.read_bytes()
    with pytest.raises(StimageError, match="is also an input; choose another --out"):
        evaluate_files(pp, tp, kw.pop("out"), overwrite=True, **kw)
    assert tp.read_bytes() == truth_bytes and pp.read_bytes() == pred_bytes
    assert _listing(tmp_path) == ["pred.h5ad", "truth.h5ad"]


def test_output_given_twice_refused(files, tmp_path):
    pp, tp, *_ = files
    with pytest.raises(StimageError, match="given twice"):
        evaluate_files(pp, tp, tmp_path / "m.csv", plot=tmp_path / "x.png", calibration=tmp_path / "x.png")
    assert _listing(tmp_path) == ["pred.h5ad", "truth.h5ad"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
@pytest.mark.parametrize("which", ["pred", "truth"])
def test_unreadable_input_is_one_line_and_writes_nothing(files, tmp_path, damage, which):
    pp, tp, *_ = files
    target = pp if which == "pred" else tp
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        target.write_bytes(np.random.default_rng(1).bytes(4096))
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        target.unlink()
    before = _listing(tmp_path)
    with pytest.raises(StimageError) as e:
        evaluate_files(pp, tp, tmp_path / "m.csv", plot=tmp_path / "maps.png")
    msg = str(e.value)
    assert "\n" not in msg and target.name in msg
    assert ("not found" if damage == "missing" else "not a readable .h5ad") in msg
    assert _listing(tmp_path) == before


def test_bad_requests_fail_before_writing(files, tmp_path, rng):
    pp, tp, pred, truth = files
    cases = [
        (dict(uncertainty_genes=["NOTAGENE"]), "--plot-uncertainty: gene\\(s\\) not in the prediction: NOTAGENE"),
        (dict(plot=tmp_path / "p.png", plot_genes=["A", "Q"]), "not in the prediction: Q"),
    ]
    point = _pred(truth, ["A", "B", "C"], rng, r_value=np.inf)
    point.write_h5ad(tmp_path / "point.h5ad")
    for kw, msg in cases:
        with pytest.raises(StimageError, match=msg):
            evaluate_files(pp, tp, tmp_path / "m.csv", **kw)
    with pytest.raises(StimageError, match="point model"):
        evaluate_files(tmp_path / "point.h5ad", tp, tmp_path / "m.csv", calibration=tmp_path / "c.png")
    no_var = pred.copy()
    del no_var.layers[keys.VAR_EPISTEMIC]
    no_var.write_h5ad(tmp_path / "novar.h5ad")
    with pytest.raises(StimageError, match="var_epistemic"):
        evaluate_files(tmp_path / "novar.h5ad", tp, tmp_path / "m.csv", uncertainty_genes=["A"])
    assert _listing(tmp_path) == ["novar.h5ad", "point.h5ad", "pred.h5ad", "truth.h5ad"]


def test_plot_gene_absent_from_truth_fails_before_writing(tmp_path, rng):
    truth = _truth(rng, genes=("A", "B"))
    pred = _pred(truth, ["A", "B", "Z"], rng, extra_counts=np.ones(truth.n_obs))
    truth.write_h5ad(tmp_path / "t.h5ad")
    pred.write_h5ad(tmp_path / "p.h5ad")
    with pytest.raises(StimageError, match="--plot-genes: gene\\(s\\) absent from the truth: Z"):
        evaluate_files(tmp_path / "p.h5ad", tmp_path / "t.h5ad", tmp_path / "m.csv", plot=tmp_path / "maps.png",
                       plot_genes=["A", "Z"])
    assert not (tmp_path / "m.csv").exists()
    rep = evaluate_files(tmp_path / "p.h5ad", tmp_path / "t.h5ad", tmp_path / "m.csv", plot=tmp_path / "maps.png",
                         uncertainty_genes=["Z"])
    assert rep.missing == ["Z"] and set(pd.read_csv(tmp_path / "m.csv")["gene"]) == {"A", "B"}
    w, h = _png_wh(uncertainty_plot_path(tmp_path / "m.csv", "Z"))
    assert 2.0 < w / h < 3.5  # the truth lacks Z: mean, aleatoric, epistemic only


def test_failed_write_leaves_no_output_of_the_set(files, tmp_path, monkeypatch):
    import pathlib

    pp, tp, *_ = files
    real = pathlib.Path.write_bytes

    def full_disk(self, data):
        if "cal.png" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        evaluate_files(pp, tp, tmp_path / "m.csv", plot=tmp_path / "maps.png", calibration=tmp_path / "cal.png")
    assert _listing(tmp_path) == ["pred.h5ad", "truth.h5ad"]


def test_overwrite_replaces_outputs_with_plain_open_mode(files, tmp_path):
    """What quickstart does on a rerun: overwrite=True, plot=..."""
    pp, tp, *_ = files
    out, maps = tmp_path / "metrics.csv", tmp_path / "spatial_maps.png"
    out.write_text("old")
    maps.write_bytes(b"old")
    saved = os.umask(0o022)
    try:
        rep = evaluate_files(pp, tp, out, overwrite=True, plot=maps)
    finally:
        os.umask(saved)
    assert rep.written == [out, maps] and maps.read_bytes()[:8] == PNG
    assert pd.read_csv(out).shape[0] == 3
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in rep.written)


def test_uncertainty_plot_path_sanitises_gene_names():
    assert uncertainty_plot_path("/r/m.csv", "HLA-A").name == "m_uncertainty_HLA-A.png"
    assert uncertainty_plot_path("/r/m.csv", "a/b c").name == "m_uncertainty_a_b_c.png"
