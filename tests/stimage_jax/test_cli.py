"""The ``stimage`` command end to end: read → train → predict → evaluate, and bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data_pipelines import keys
from stimage_jax.cli import main
from stimage_jax.ensemble.model import EnsembleModel

TRAIN = ["--backbone", "tiny", "--tile-px", "32", "--lr", "3e-2", "--max-epochs", "40",
         "--patience", "40", "--genes", "A,B,C", "--quiet"]


def run(*args) -> int:
    return main([str(a) for a in args])


def _train(paths, wd, *extra):
    return run("train", "--data", *paths, "--workdir", wd, *TRAIN, *extra)


@pytest.fixture
def trained(synthetic_study, tmp_path):
    wd = tmp_path / "wd"
    assert _train(synthetic_study[:2], wd, "--members", "2") == 0
    return wd


def test_train_predict_evaluate(trained, synthetic_study, tmp_path, capsys):
    pred_path, metrics = tmp_path / "p.h5ad", tmp_path / "m.csv"
    assert run("--quiet", "predict", "--model", trained, "--data", synthetic_study[2], "--out", pred_path) == 0
    pred, truth = ad.read_h5ad(pred_path), ad.read_h5ad(synthetic_study[2])
    assert list(pred.obs_names) == list(truth.obs_names)
    np.testing.assert_array_equal(pred.obsm[keys.SPATIAL], truth.obsm[keys.SPATIAL])
    assert list(pred.var_names) == ["A", "B", "C"]
    assert pred.X.dtype == np.float32 and np.all(pred.X > 0)
    epi, ale = pred.layers[keys.VAR_EPISTEMIC], pred.layers[keys.VAR_ALEATORIC]
    assert np.all(epi > 0) and np.all(ale >= pred.X)  # NB variance >= mean
    prov = pred.uns[keys.STIMAGE_UNS]["prediction"]
    assert prov["backbone"] == "tiny" and int(prov["members"]) == 2
    assert list(prov["training_samples"]) == ["s0"]  # s1 validated (early stopping)

    assert run("evaluate", "--pred", pred_path, "--truth", synthetic_study[2], "--out", metrics,
               "--plot", tmp_path / "maps.png") == 0
    table = pd.read_csv(metrics)
    assert list(table.columns[:5]) == ["sample", "gene", "n_spots", "pcc", "spearman"]
    byg = table.set_index("gene")["pcc"]
    # Colour drives A and B on a held-out sample; C is noise around a constant.
    assert byg["A"] > 0.5 and byg["B"] > 0.5, byg
    assert (tmp_path / "maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean PCC" in capsys.readouterr().out


def test_one_member_ensemble_equals_single_model(synthetic_study, tmp_path):
    wd = tmp_path / "one"
    # one view, no smoothing: the member applied to the plain tiles below is the whole model
    assert _train(synthetic_study[:2], wd, "--members", "1", "--tta", "1", "--smooth", "0") == 0
    model = EnsembleModel.load(wd)
    from stimage_jax.pipeline import predict
    truth = ad.read_h5ad(synthetic_study[2])
    pred = predict(truth, model, progress=False)
    assert np.all(pred.layers[keys.VAR_EPISTEMIC] == 0)
    # The single member applied directly gives the same mean and NB variance.
    from data_pipelines.tiles import spot_tiles
    from stimage_jax.nb import params_from_logits
    import jax.numpy as jnp
    feats = model.backbone(jnp.asarray(np.asarray(spot_tiles(truth, tile_um=model.config["tile_um"], tile_px=32, progress=False))))
    mu, r = params_from_logits(*model.members[0](feats))
    np.testing.assert_allclose(pred.X, np.asarray(mu), rtol=1e-5)
    np.testing.assert_allclose(pred.layers[keys.VAR_ALEATORIC], np.asarray(mu + mu**2 / r), rtol=1e-5)


def test_rerun_resumes_and_reloads_identically(trained, synthetic_study, tmp_path, capsys):
    before = EnsembleModel.load(trained)
    mtime = (trained / "model" / "model.json").stat().st_mtime
    assert _train(synthetic_study[:2], trained, "--members", "2") == 0
    assert (trained / "model" / "model.json").stat().st_mtime == mtime  # not retrained
    after = EnsembleModel.load(trained)
    np.testing.assert_array_equal(np.asarray(before.members[1].mu_out.kernel[...]),
                                  np.asarray(after.members[1].mu_out.kernel[...]))


def test_fine_tune_trains_backbone(synthetic_study, tmp_path):
    wd = tmp_path / "ft"
    assert run("train", "--data", *synthetic_study[:2], "--workdir", wd, "--backbone", "tiny",
               "--tile-px", "32", "--max-epochs", "2", "--genes", "A,B", "--fine-tune", "--quiet") == 0
    model = EnsembleModel.load(wd)
    assert model.backbone is None and model.config["fine_tune"]
    pred = tmp_path / "ft.h5ad"
    assert run("--quiet", "predict", "--model", wd, "--data", synthetic_study[2], "--out", pred) == 0
    assert ad.read_h5ad(pred).shape == (64, 2)


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "nope.h5ad", "--workdir", "w"], "nope.h5ad"),
    (["train", "--genes", "A,NOTAGENE", "--members", "1"], "NOTAGENE"),
    (["train", "--genes", "A", "--members", "0"], "--members: must be at least 1"),
    (["train", "--genes", "A", "--backbone", "vgg"], "unknown backbone 'vgg'"),
    (["predict", "--model", "missing_dir", "--out", "p.h5ad"], "not a trained model"),
])
def test_bad_input_one_line_exit_2(args, message, synthetic_study, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if args[0] == "train" and "--data" not in args:
        args = args + ["--data", str(synthetic_study[0]), str(synthetic_study[1]), "--workdir", "w",
                       "--backbone" if "--backbone" not in args else "--seed", "tiny" if "--backbone" not in args else "0",
                       "--tile-px", "32"]
    if args[0] == "predict":
        args = args + ["--data", str(synthetic_study[0])]
    assert main(args + ["--quiet"] if args[0] != "predict" else ["--quiet"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stimage: error:") and message in err[0], err


def test_existing_output_and_other_run_are_refused(trained, synthetic_study, tmp_path, capsys):
    out = tmp_path / "p.h5ad"
    out.write_text("keep me")
    assert run("--quiet", "predict", "--model", trained, "--data", synthetic_study[2], "--out", out) == 2
    assert out.read_text() == "keep me"
    assert "--overwrite" in capsys.readouterr().err
    assert _train(synthetic_study[:2], trained, "--members", "3") == 2
    assert "holds a different run (differs in members)" in capsys.readouterr().err


def test_corrupt_model_is_a_clear_error(trained, synthetic_study, tmp_path, capsys):
    for f in (trained / "model").glob("members_*/**/*"):
        if f.is_file() and f.stat().st_size > 64 and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[:10])
    assert run("--quiet", "predict", "--model", trained, "--data", synthetic_study[2], "--out", tmp_path / "p.h5ad") == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "p.h5ad").exists()


def test_log1p_target_is_a_point_model(synthetic_study, tmp_path):
    wd = tmp_path / "l1p"
    assert _train(synthetic_study[:2], wd, "--target", "log1p") == 0
    assert run("--quiet", "predict", "--model", wd, "--data", synthetic_study[2], "--out", tmp_path / "p.h5ad") == 0
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert np.all(pred.layers[keys.VAR_ALEATORIC] == 0)
    np.testing.assert_array_equal(pred.layers[keys.Q_LO], pred.X)
    # still learns the colour → expression relation, on the count scale
    truth = ad.read_h5ad(synthetic_study[2]).X.toarray()
    assert np.corrcoef(pred.X[:, 0], truth[:, 0])[0, 1] > 0.5
    assert 0.3 < pred.X[:, 0].mean() / truth[:, 0].mean() < 3


def _nb_pred_file(truth_path, tmp_path, members=2):
    """A prediction .h5ad built straight from random NB parameters (no training)."""
    from export.runtime.prediction import build_prediction

    truth = ad.read_h5ad(truth_path)
    rng = np.random.default_rng(5)
    mu = rng.gamma(4.0, 3.0, size=(members, truth.n_obs, truth.n_vars))
    r = rng.uniform(2.0, 6.0, size=mu.shape)
    pred = build_prediction(truth, mu, r, list(truth.var_names), {"test": True}, interval=0.8)
    path = tmp_path / "nbpred.h5ad"
    pred.write_h5ad(path)
    return path


def _png_shape(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape


def test_evaluate_uncertainty_plots_and_columns(synthetic_study, tmp_path, capsys):
    from stimage_jax.metrics import calibration_table, evaluate

    pred_path = _nb_pred_file(synthetic_study[2], tmp_path)
    out, cal_png = tmp_path / "m.csv", tmp_path / "cal.png"
    assert run("--quiet", "evaluate", "--pred", pred_path, "--truth", synthetic_study[2], "--out", out,
               "--plot-uncertainty", "A,B", "--plot-calibration", cal_png) == 0
    printed = capsys.readouterr().out
    assert "CRPS" in printed and "PIT coverage" in printed
    for g in ("A", "B"):
        png = tmp_path / f"m_uncertainty_{g}.png"
        h, w, _ = _png_shape(png)
        assert w > 2.5 * h  # four panels side by side: observed, mean, aleatoric, epistemic
        assert str(png) in printed
    assert _png_shape(cal_png)[2] in (3, 4) and str(cal_png) in printed
    table = pd.read_csv(out)
    pred, truth = ad.read_h5ad(pred_path), ad.read_h5ad(synthetic_study[2])
    direct, _ = evaluate(pred, truth)
    for col in ("crps", "pit_coverage", "ause_epistemic", "ause_total"):
        np.testing.assert_allclose(table[col], direct[col], rtol=1e-9)
    cal = calibration_table(pred, truth)
    assert cal["coverage_pit"].between(0, 1).all() and len(cal) == 10


def test_evaluate_uncertainty_unknown_gene_is_one_line_before_writing(synthetic_study, tmp_path, capsys):
    pred_path = _nb_pred_file(synthetic_study[2], tmp_path)
    out = tmp_path / "m.csv"
    assert run("--quiet", "evaluate", "--pred", pred_path, "--truth", synthetic_study[2], "--out", out,
               "--plot-uncertainty", "NOTAGENE") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stimage: error:") and "NOTAGENE" in err[0], err
    assert not out.exists()


def test_cells_commands_are_wired_into_stimage(tmp_path, capsys):
    import cv2

    inst = np.zeros((32, 32), np.uint16)
    inst[4:12, 4:12], inst[20:28, 18:26] = 1, 2
    cv2.imwrite(str(tmp_path / "t.png"), inst)
    assert main(["cells", "evaluate", "--pred", str(tmp_path / "t.png"), "--truth", str(tmp_path / "t.png"),
                 "--out", str(tmp_path / "m.json")]) == 0
    import json

    m = json.loads((tmp_path / "m.json").read_text())
    assert m["dice"] == 1.0 and m["aji"] == 1.0 and m["pq"] == 1.0
    assert main(["cells", "evaluate", "--pred", str(tmp_path / "missing.png"), "--truth", str(tmp_path / "t.png"),
                 "--out", str(tmp_path / "m2.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.png" in err[0], err
