"""The leave-one-sample-out harness: folds, methods on identical inputs, resume, outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stimage_jax.cli import main


def run(*args) -> int:
    return main([str(a) for a in args])


BENCH = ["--backbone", "tiny", "--tile-px", "32", "--genes", "A,B,C", "--members", "2", "--max-epochs", "30",
         "--lr", "3e-2", "--min-coverage", "0", "--quiet"]


def test_loso_cli_all_methods_resume_and_outputs(synthetic_study, tmp_path, capsys):
    wd = tmp_path / "bench"
    assert run("benchmark", "--data", *synthetic_study, "--workdir", wd, *BENCH) == 0
    out = capsys.readouterr().out
    assert "stimage: mean PCC" in out and "ridge: mean PCC" in out
    table = pd.read_csv(wd / "metrics.csv")
    assert set(table["method"]) == {"stimage", "stimage_single", "ridge", "mse"}
    assert set(table["fold"]) == {"s0", "s1", "s2"}
    # one row per method, fold and gene, scored within the held-out sample only
    assert len(table) == 4 * 3 * 3 and (table["sample"] == table["fold"]).all()
    # Colour drives A and B in every sample: every method learns them.
    ab = table[table["gene"].isin(["A", "B"])]
    assert (ab.groupby("method")["pcc"].mean() > 0.5).all(), ab.groupby("method")["pcc"].mean()
    summary = (wd / "summary.md").read_text()
    assert "| stimage |" in summary and "Most predictable genes (stimage" in summary
    assert (wd / "boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The single model is member 0 of the ensemble: its fold CSV equals a direct evaluation.
    from stimage_jax.ensemble.model import EnsembleModel
    import anndata as ad
    from export.runtime.prediction import build_prediction
    from stimage_jax.metrics import evaluate

    model = EnsembleModel.load(wd / "folds" / "s2" / "stimage")
    truth = ad.read_h5ad(synthetic_study[2])
    from data_pipelines.tiles import spot_tiles
    mu, r = model.member_params(spot_tiles(truth, tile_px=32, progress=False), progress=False)
    direct = evaluate(build_prediction(truth, mu[:1], r[:1], model.genes, {}), truth)[0]
    single = table[(table["method"] == "stimage_single") & (table["fold"] == "s2")]
    np.testing.assert_allclose(single["pcc"].to_numpy(), direct["pcc"].to_numpy(), rtol=1e-4)

    # Resume: finished folds are read back, not retrained.
    before = (wd / "folds" / "s0" / "ridge.csv").stat().st_mtime_ns
    assert run("benchmark", "--data", *synthetic_study, "--workdir", wd, *BENCH) == 0
    assert (wd / "folds" / "s0" / "ridge.csv").stat().st_mtime_ns == before


@pytest.mark.parametrize("extra, message", [
    (["--methods", "stimage,knn"], "unknown method(s) knn"),
    (["--samples", "s9"], "s9"),
    (["--protocol", "kfold"], "unknown protocol"),
])
def test_loso_bad_input(extra, message, synthetic_study, tmp_path, capsys):
    assert run("benchmark", "--data", *synthetic_study, "--workdir", tmp_path / "w", *BENCH, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_loso_needs_three_samples(synthetic_study, tmp_path, capsys):
    assert run("benchmark", "--data", *synthetic_study[:2], "--workdir", tmp_path / "w", *BENCH) == 2
    assert "at least 3 samples" in capsys.readouterr().err


def test_loso_context_methods_on_identical_folds(synthetic_study, tmp_path, capsys):
    """Context, TTA and smoothing run on the same folds; the smoothed method's CSV equals
    smoothing the ensemble's members by hand (brute-force neighbours) and re-scoring."""
    import anndata as ad
    from scipy.spatial.distance import cdist

    from data_pipelines import keys
    from export.runtime.prediction import build_prediction
    from stimage_jax.ensemble.model import EnsembleModel
    from stimage_jax.metrics import evaluate
    from stimage_jax.pipeline import predict

    wd = tmp_path / "bench"
    methods = "stimage,stimage_smooth,stimage_ctx,stimage_tta_ctx_smooth"
    assert run("benchmark", "--data", *synthetic_study, "--workdir", wd, *BENCH, "--methods", methods,
               "--samples", "s2", "--context-k", "4", "--smooth", "0.5") == 0
    table = pd.read_csv(wd / "metrics.csv")
    assert list(dict.fromkeys(table["method"])) == methods.split(",")
    assert (table.groupby("method").size() == 3).all()
    ab = table[table["gene"].isin(["A", "B"])]
    assert (ab.groupby("method")["pcc"].mean() > 0.5).all(), ab.groupby("method")["pcc"].mean()

    truth = ad.read_h5ad(synthetic_study[2])
    model = EnsembleModel.load(wd / "folds" / "s2" / "stimage")
    pred = predict(truth, model, progress=False)
    mu = np.transpose(np.asarray(pred.obsm[keys.MEMBER_MU]), (1, 0, 2))
    r = np.transpose(np.asarray(pred.obsm[keys.MEMBER_R]), (1, 0, 2))
    d = cdist(truth.obsm[keys.SPATIAL], truth.obsm[keys.SPATIAL])
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1, kind="stable")[:, :4]
    smoothed = 0.5 * mu + 0.5 * mu[:, nn].mean(2)
    direct = evaluate(build_prediction(truth, smoothed, r, model.genes, {}), truth)[0]
    got = table[table["method"] == "stimage_smooth"]
    np.testing.assert_allclose(got["pcc"].to_numpy(), direct["pcc"].to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(got["pit_coverage"].to_numpy(), direct["pit_coverage"].to_numpy(), rtol=1e-4)


def test_loso_folder_of_h5ad_and_zarr(synthetic_study, tmp_path, capsys):
    """A --data folder holds .h5ad files and .zarr stores alike (a store is a folder too)."""
    import shutil

    import anndata as ad

    folder = tmp_path / "data"
    folder.mkdir()
    for p in synthetic_study[:2]:
        shutil.copy(p, folder / p.name)
    ad.read_h5ad(synthetic_study[2]).write_zarr(folder / "s2.zarr")
    assert run("benchmark", "--data", folder, "--workdir", tmp_path / "w", *BENCH, "--methods", "ridge") == 0
    table = pd.read_csv(tmp_path / "w" / "metrics.csv")
    assert set(table["fold"]) == {"s0", "s1", "s2"}


def test_loso_global_context_methods_and_workdir_extension(synthetic_study, tmp_path, capsys):
    """Global-context methods run on the same folds; their head sees [own, PCA of the field]
    fitted on the training samples only; a run adding methods with new settings extends the
    workdir (old folds reused), one changing a setting is refused."""
    import json

    from stimage_jax.ensemble.model import EnsembleModel

    wd = tmp_path / "bench"
    common = [*BENCH, "--samples", "s2", "--members", "1"]
    assert run("benchmark", "--data", *synthetic_study, "--workdir", wd, *common, "--methods", "stimage") == 0
    before = (wd / "folds" / "s2" / "stimage.csv").stat().st_mtime_ns
    methods = "stimage,stimage_global_pca_smooth"
    assert run("benchmark", "--data", *synthetic_study, "--workdir", wd, *common, "--methods", methods,
               "--global-um", "80", "--global-pca", "3") == 0
    assert (wd / "folds" / "s2" / "stimage.csv").stat().st_mtime_ns == before  # extended, not redone
    settings = json.loads((wd / "request.json").read_text())["settings"]
    assert settings["global_um"] == 80.0 and settings["global_pca"] == 3 and settings["smooth"] == 0.5
    table = pd.read_csv(wd / "metrics.csv")
    assert list(dict.fromkeys(table["method"])) == methods.split(",")
    ab = table[table["gene"].isin(["A", "B"])]
    assert (ab.groupby("method")["pcc"].mean() > 0.5).all(), ab.groupby("method")["pcc"].mean()
    base = EnsembleModel.load(wd / "folds" / "s2" / "stimage" / "model")
    pca = EnsembleModel.load(wd / "folds" / "s2" / "stimage_global_pca" / "model")
    assert pca.sources[0]["num_features"] == base.backbones[base.sources[0]["name"]].num_features + 3
    capsys.readouterr()
    assert run("benchmark", "--data", *synthetic_study, "--workdir", wd, *common, "--methods", methods,
               "--global-um", "120", "--global-pca", "3") == 2
    assert "settings differ" in capsys.readouterr().err
