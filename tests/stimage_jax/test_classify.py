"""High/low classification: labels, the elastic-net fit against scikit-learn, CLI, real data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data_pipelines import keys
from stimage_jax.classify import ClassifierReference, apply_classifier, fit_classifier, high_labels
from stimage_jax.cli import main


def run(*args) -> int:
    return main([str(a) for a in args])


def test_high_labels_are_per_sample_z_above_zero(rng):
    counts = rng.poisson(4.0, size=(30, 3)).astype(float)
    counts[15:] *= 10  # a deeper second sample: one global threshold would call it all high
    samples = np.array(["a"] * 15 + ["b"] * 15)
    y = high_labels(counts, samples)
    for s in ("a", "b"):
        c = counts[samples == s]
        z = (c - c.mean(0)) / c.std(0)
        np.testing.assert_array_equal(y[samples == s], z > 0)


def test_fit_matches_sklearn_elastic_net(rng, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = rng.normal(size=(200, 6))
    counts = rng.poisson(np.exp(1 + x[:, :2] @ np.array([[1.0, -1.0], [0.5, 0.8]])))
    samples = np.array(["s"] * 200)
    ref = fit_classifier(x, counts, samples, ["g1", "g2"], progress=False)
    z = StandardScaler().fit_transform(x)
    for g in range(2):
        clf = LogisticRegression(solver="saga", l1_ratio=0.5, C=0.1, max_iter=500, random_state=0)
        clf.fit(z, counts[:, g] > counts[:, g].mean())
        np.testing.assert_allclose(apply_classifier(ref, x)[:, g], clf.predict_proba(z)[:, 1], atol=1e-5)
    # the L1 part zeroes some noise features; the informative ones stay large
    assert (ref.coef[:, 2:] == 0).any() and np.abs(ref.coef[:, 2:]).max() < 0.1
    assert np.abs(ref.coef[:, :2]).min() > 0.5
    ref.save(tmp_path / "c.npz")
    back = ClassifierReference.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(apply_classifier(back, x), apply_classifier(ref, x))


def test_classify_cli_train_predict_evaluate(synthetic_study, tmp_path, capsys):
    wd = tmp_path / "cls"
    assert run("train", "--task", "classify", "--data", *synthetic_study[:2], "--workdir", wd, "--backbone", "tiny",
               "--tile-px", "32", "--genes", "A,B,C", "--min-coverage", "0", "--quiet") == 0
    pred = tmp_path / "p.h5ad"
    assert run("--quiet", "predict", "--model", wd, "--data", synthetic_study[2], "--out", pred) == 0
    p = ad.read_h5ad(pred)
    assert list(p.var_names) == ["A", "B", "C"]
    np.testing.assert_array_equal(p.layers[keys.P_HIGH], p.X)
    assert p.X.min() >= 0 and p.X.max() <= 1
    assert run("evaluate", "--pred", pred, "--truth", synthetic_study[2], "--out", tmp_path / "m.csv") == 0
    t = pd.read_csv(tmp_path / "m.csv").set_index("gene")
    assert t.loc["A", "auc"] > 0.8 and t.loc["B", "auc"] > 0.8, t[["auc", "f1"]]
    # f1 of P(high) > 0.5 against truth above its mean, recomputed here
    truth = ad.read_h5ad(synthetic_study[2])[:, "A"].X
    y = np.asarray(truth.toarray() if hasattr(truth, "toarray") else truth).ravel()
    y = y > y.mean()
    yhat = p[:, "A"].X.ravel() > 0.5
    assert t.loc["A", "f1"] == pytest.approx(2 * (y & yhat).sum() / (y.sum() + yhat.sum()))


def test_classify_bad_input(synthetic_study, tmp_path, capsys):
    base = ["train", "--task", "classify", "--data", *synthetic_study[:2], "--backbone", "tiny", "--tile-px", "32",
            "--genes", "A", "--min-coverage", "0", "--quiet"]
    assert run(*base, "--workdir", tmp_path / "a", "--members", "3") == 2
    assert "--task classify" in capsys.readouterr().err
    assert run(*base, "--workdir", tmp_path / "b") == 0
    (tmp_path / "b" / "model" / "classifier.npz").write_bytes(b"PK\x03\x04 truncated")
    assert run("--quiet", "predict", "--model", tmp_path / "b", "--data", synthetic_study[2],
               "--out", tmp_path / "p.h5ad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0]


@pytest.mark.real_data
def test_classify_her2st_markers(her2st_root, tmp_path):
    from data_pipelines.slides import read_her2st

    paths = []
    for s in ("C2", "C3", "C4"):
        p = tmp_path / f"{s}.h5ad"
        read_her2st(her2st_root, s, require_image=True).write_h5ad(p)
        paths.append(p)
    wd = tmp_path / "cls"
    assert run("train", "--task", "classify", "--data", *paths[:2], "--workdir", wd, "--genes", "markers",
               "--tile-px", "64", "--quiet") == 0
    assert run("--quiet", "predict", "--model", wd, "--data", paths[2], "--out", tmp_path / "p.h5ad") == 0
    assert run("evaluate", "--pred", tmp_path / "p.h5ad", "--truth", paths[2], "--out", tmp_path / "m.csv") == 0
    t = pd.read_csv(tmp_path / "m.csv")
    # EfficientNet-Lite0 features of 64-px tiles, two training sections: markers ranked above chance
    assert t["auc"].mean() > 0.6, t[["gene", "auc", "f1"]].to_string()
