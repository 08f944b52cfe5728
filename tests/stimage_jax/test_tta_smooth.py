"""Issue 21 as a user meets it: `stimage train` records test-time augmentation (8 dihedral
views) and spatial smoothing (alpha 0.5, 6 neighbours) by default, and every runtime — JAX,
ONNX, a whole slide — predicts the same numbers, which equal independent computations."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from data_pipelines import keys
from stimage_jax.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jax2onnx internals

TINY = ["--backbone", "tiny", "--tile-px", "32", "--lr", "3e-2", "--max-epochs", "4", "--genes", "A,B,C",
        "--members", "2", "--quiet"]


def _views(tiles: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral views written out by hand (not export.runtime.context.dihedral)."""
    out = []
    for flip in (False, True):
        for k in range(4):
            v = np.rot90(tiles, k=k, axes=(1, 2))
            out.append(np.ascontiguousarray(v[:, :, ::-1] if flip else v))
    return out


def _smoothed_by_hand(x: np.ndarray, xy: np.ndarray, alpha: float, k: int) -> np.ndarray:
    """(N, G) values → (1 − α)·own + α·mean of the k nearest others (ties: lower index)."""
    d = cdist(xy, xy)
    np.fill_diagonal(d, np.inf)
    out = np.empty_like(x, dtype=np.float64)
    for i in range(len(x)):
        nn = np.lexsort((np.arange(len(x)), np.round(d[i], 6)))[:k]
        out[i] = (1 - alpha) * x[i] + alpha * x[nn].mean(0)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import make_sample

    tmp = tmp_path_factory.mktemp("tta")
    paths = []
    for i in range(3):
        make_sample(tmp, f"s{i}", seed=i).write_h5ad(tmp / f"s{i}.h5ad")
        paths.append(tmp / f"s{i}.h5ad")
    wd = tmp / "wd"
    assert main(["train", "--data", str(paths[0]), str(paths[1]), "--workdir", str(wd), *TINY]) == 0
    return tmp, paths, wd


def test_defaults_are_recorded_and_invalid_choices_refused(trained, capsys, tmp_path):
    tmp, paths, wd = trained
    cfg = json.loads((wd / "model" / "model.json").read_text())
    assert cfg["tta"] == 8 and cfg["smoothing"] == {"alpha": 0.5, "k": 6}
    capsys.readouterr()
    for extra, msg in ((["--tta", "3"], "invalid choice '3'"), (["--tta", "8", "--fine-tune"], "--tta averages"),
                       (["--smooth", "1.5"], "between 0 and 1"), (["--smooth-k", "0"], "must be")):
        assert main(["train", "--data", str(paths[0]), "--workdir", str(tmp_path / "x"), *TINY, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("stimage: error:") and msg in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "x").exists()


def test_jax_prediction_equals_hand_made_tta_and_smoothing(trained, tmp_path):
    from data_pipelines.slides import read_h5ad
    from data_pipelines.tiles import spot_tiles
    from export.runtime.moments import ensemble_moments_np
    from stimage_jax.ensemble.model import EnsembleModel
    from stimage_jax.features.extract import extract_features

    tmp, paths, wd = trained
    p_raw, p_def = tmp_path / "raw.h5ad", tmp_path / "def.h5ad"
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(paths[2]), "--out", str(p_raw),
                 "--smooth", "0"]) == 0
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(paths[2]), "--out", str(p_def)]) == 0
    raw, dflt = ad.read_h5ad(p_raw), ad.read_h5ad(p_def)
    assert dflt.uns["stimage"]["prediction"]["smoothing"] == {"alpha": 0.5, "k": 6}
    assert raw.uns["stimage"]["prediction"]["smoothing"]["alpha"] == 0.0
    assert dflt.uns["stimage"]["prediction"]["tta"] == 8

    # TTA: the backbone's features averaged over the 8 views, then the members' heads
    model = EnsembleModel.load(wd)
    tiles = np.asarray(spot_tiles(read_h5ad(paths[2]), tile_px=32, progress=False))
    feats = np.mean([extract_features(model.backbone, v, progress=False) for v in _views(tiles)], axis=0)
    mu, _ = model.member_params(None, features=feats, progress=False)
    got = np.moveaxis(np.asarray(raw.obsm[keys.MEMBER_MU]), 1, 0)
    np.testing.assert_allclose(got, mu, rtol=2e-5, atol=1e-6)
    plain = np.mean([extract_features(model.backbone, tiles, progress=False)], axis=0)
    assert not np.allclose(feats, plain, rtol=1e-3)  # the views do change the features

    # smoothing: each member's mean towards its 6 nearest spots, moments recomputed
    xy = np.asarray(raw.obsm[keys.SPATIAL], float)
    members = np.stack([_smoothed_by_hand(m, xy, 0.5, 6) for m in got])
    np.testing.assert_allclose(np.moveaxis(np.asarray(dflt.obsm[keys.MEMBER_MU]), 1, 0), members, rtol=1e-5)
    mom = ensemble_moments_np(members, np.moveaxis(np.asarray(raw.obsm[keys.MEMBER_R]), 1, 0))
    np.testing.assert_allclose(np.asarray(dflt.X), mom["mean"], rtol=1e-5)
    np.testing.assert_allclose(dflt.layers[keys.VAR_EPISTEMIC], mom["var_epistemic"], rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(dflt.X), np.asarray(raw.X), rtol=1e-3)


def test_onnx_and_slide_predictions_equal_the_jax_ones(trained, tmp_path, make_slide):
    from export.predict import main as runtime_main

    tmp, paths, wd = trained
    onnx_path = tmp_path / "m.onnx"
    assert main(["export-onnx", "--quiet", "--model", str(wd), "--out", str(onnx_path)]) == 0
    # the backbone runs once per view in the graph but its weights are stored once
    import onnx
    from onnx import numpy_helper

    inits = [numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer]
    big = [(a.dtype.str, a.shape, a.tobytes()) for a in inits if a.size > 16]
    assert len(big) == len(set(big)) and len(big) >= 4
    for extra in ([], ["--smooth", "0.3"]):
        pj, po = tmp_path / f"j{len(extra)}.h5ad", tmp_path / f"o{len(extra)}.h5ad"
        assert main(["predict", "--quiet", "--model", str(wd), "--data", str(paths[2]), "--out", str(pj), *extra]) == 0
        assert runtime_main(["--quiet", "--model", str(onnx_path), "--data", str(paths[2]), "--out", str(po),
                             *extra]) == 0
        j, o = ad.read_h5ad(pj), ad.read_h5ad(po)
        assert o.uns["stimage"]["prediction"]["smoothing"] == j.uns["stimage"]["prediction"]["smoothing"]
        assert o.uns["stimage"]["prediction"]["tta"] == 8
        np.testing.assert_allclose(np.asarray(o.X), np.asarray(j.X), rtol=1e-4)
        for k in (keys.VAR_EPISTEMIC, keys.VAR_ALEATORIC, keys.Q_LO, keys.Q_HI):
            np.testing.assert_allclose(o.layers[k], j.layers[k], rtol=1e-3, atol=1e-5)

    # a whole slide: every tile smoothed with its grid neighbours, the same in JAX and ONNX
    slide = tmp_path / "slide.tif"
    make_slide(slide, mpp=2.0, size=(400, 480))
    outs = {}
    for name, model, extra in (("jax", wd, []), ("raw", wd, ["--smooth", "0"]), ("onnx", onnx_path, [])):
        out = tmp_path / f"slide_{name}.h5ad"
        run = runtime_main if name == "onnx" else (lambda argv: main(["predict", *argv]))
        assert run(["--quiet", "--model", str(model), "--slide", str(slide), "--out", str(out), "--min-coverage",
                    "0", *extra]) == 0
        outs[name] = ad.read_h5ad(out)
    raw = outs["raw"]
    assert raw.n_obs >= 12
    # smoothing is linear in the members' means, so the ensemble mean smooths the same way
    want = _smoothed_by_hand(np.asarray(raw.X, np.float64), np.asarray(raw.obsm[keys.SPATIAL], float), 0.5, 6)
    np.testing.assert_allclose(np.asarray(outs["jax"].X), want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(outs["onnx"].X), np.asarray(outs["jax"].X), rtol=1e-4)
