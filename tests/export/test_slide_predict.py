"""Whole-slide prediction: JAX and ONNX runtimes agree; heatmaps; bad input."""

import anndata as ad
import numpy as np
import pytest

from data_pipelines import keys
from stimage_jax.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_slide_prediction_jax_equals_onnx(synthetic_study, make_slide, tmp_path, capsys):
    make_slide(tmp_path / "s.tif", mpp=1.0)
    wd = tmp_path / "wd"
    assert main(["train", "--quiet", "--data", *map(str, synthetic_study[:2]), "--workdir", str(wd),
                 "--backbone", "tiny", "--tile-px", "32", "--members", "2", "--max-epochs", "3",
                 "--genes", "A,B,C"]) == 0
    assert main(["export-onnx", "--model", str(wd), "--out", str(tmp_path / "m.onnx")]) == 0
    outs = {}
    for name, model in (("jax", str(wd)), ("onnx", str(tmp_path / "m.onnx"))):
        out = tmp_path / f"{name}.h5ad"
        assert main(["predict", "--quiet", "--model", model, "--slide", str(tmp_path / "s.tif"),
                     "--genes", "A,B", "--out", str(out)]) == 0
        outs[name] = ad.read_h5ad(out)
        for g in ("A", "B"):
            assert (tmp_path / f"{name}_{g}.png").read_bytes()[:4] == b"\x89PNG"
    j, o = outs["jax"], outs["onnx"]
    assert j.n_obs > 20 and list(j.obs_names) == list(o.obs_names)
    np.testing.assert_allclose(o.X, j.X, rtol=1e-4)
    # tiles of the model's physical size (26 µm here), centred on tissue, in slide pixels
    assert j.uns[keys.STIMAGE_UNS][keys.MPP] == 1.0 and (j.obs["tissue_coverage"] >= 0.7).all()
    assert np.all(np.hypot(j.obsm[keys.SPATIAL][:, 0] - 800, j.obsm[keys.SPATIAL][:, 1] - 600) < 400)
    assert main(["predict", "--model", str(wd), "--slide", str(tmp_path / "s.tif"), "--genes", "NOPE",
                 "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "NOPE" in capsys.readouterr().err and not (tmp_path / "x.h5ad").exists()


def test_slide_prediction_without_heatmap_genes(synthetic_study, make_slide, tmp_path, capsys):
    from stimage_jax.cli import main

    wd = tmp_path / "wd"
    assert main(["train", "--quiet", "--data", str(synthetic_study[0]), str(synthetic_study[1]), "--workdir", str(wd),
                 "--backbone", "tiny", "--tile-px", "32", "--max-epochs", "1", "--genes", "A,B",
                 "--min-coverage", "0"]) == 0
    make_slide(tmp_path / "s.tif", mpp=1.0)
    slide = tmp_path / "s.tif"
    out = tmp_path / "s.h5ad"
    assert main(["predict", "--quiet", "--model", str(wd), "--slide", str(slide), "--out", str(out)]) == 0
    assert out.exists() and not list(tmp_path.glob("s_*.png"))  # no --genes: no heatmaps, no crash
