"""Stain normalisation through the pipeline: train fits a template, predict and ONNX reuse it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from data_pipelines import keys
from data_pipelines.slides import read_her2st
from data_pipelines.stain_normalisation import Reference, apply_stain, fit_source, fit_stain
from data_pipelines.tiles import load_image, lowres_view, sample_image_path, spot_tiles
from stimage_jax.cli import main
from stimage_jax.ensemble.model import EnsembleModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def her2st_small(her2st_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("her2st")
    paths = []
    for s in ("C2", "C3", "C4"):
        p = out / f"{s}.h5ad"
        read_her2st(her2st_root, s, require_image=True).write_h5ad(p)
        paths.append(p)
    return paths


def test_spot_tiles_normalise_with_the_slides_own_stains(her2st_small, tmp_path):
    template = ad.read_h5ad(her2st_small[0])
    ref = fit_stain("macenko", lowres_view(load_image(sample_image_path(template, "C2"))))
    a = ad.read_h5ad(her2st_small[1])
    raw = np.asarray(spot_tiles(a, tile_px=48, progress=False))
    got = np.asarray(spot_tiles(a, tile_px=48, progress=False, stain=ref, cache_dir=tmp_path))
    source = fit_source("macenko", lowres_view(load_image(sample_image_path(a, "C3"))))
    np.testing.assert_array_equal(got, apply_stain(ref, source, raw))
    assert got.dtype == np.uint8 and np.abs(got.astype(int) - raw).mean() > 1  # it did change them
    cached = [p for p in tmp_path.glob("C3__*macenko-*.npy") if not p.name.endswith(".border.npy")]
    assert len(cached) == 1  # normalised tiles are cached under the reference's tag
    np.testing.assert_array_equal(np.asarray(spot_tiles(a, tile_px=48, progress=False, stain=ref,
                                                        cache_dir=tmp_path)), got)


def test_train_stores_template_predict_and_onnx_reuse_it(her2st_small, tmp_path, capsys):
    wd = tmp_path / "wd"
    assert main(["train", "--quiet", "--data", str(her2st_small[0]), str(her2st_small[1]), "--genes", "CD74,ERBB2",
                 "--backbone", "tiny", "--tile-px", "32", "--max-epochs", "2", "--stain", "vahadane",
                 "--workdir", str(wd)]) == 0
    model = EnsembleModel.load(wd)
    ref = model.stain
    assert isinstance(ref, Reference) and ref.method == "vahadane"
    # The template is C2 (the first training sample), fitted on its low-resolution view.
    c2 = ad.read_h5ad(her2st_small[0])
    again = fit_stain("vahadane", lowres_view(load_image(sample_image_path(c2, "C2"))))
    np.testing.assert_allclose(ref.stain_matrix, again.stain_matrix, atol=1e-6)

    pred_j = tmp_path / "j.h5ad"
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(her2st_small[2]), "--out", str(pred_j),
                 "--smooth", "0"]) == 0  # the members' own means (smoothing is tested in test_tta_smooth)
    c4 = ad.read_h5ad(her2st_small[2])
    tiles = spot_tiles(c4, tile_um=model.config["tile_um"], tile_px=32, progress=False, stain=ref)
    mu, _ = model.member_params(tiles, progress=False)
    np.testing.assert_allclose(ad.read_h5ad(pred_j).X, mu.mean(0), rtol=1e-5)

    assert main(["export-onnx", "--model", str(wd), "--out", str(tmp_path / "m.onnx")]) == 0
    from export.predict import OnnxEnsemble

    onx = OnnxEnsemble(tmp_path / "m.onnx")
    np.testing.assert_allclose(onx.stain.stain_matrix, ref.stain_matrix)
    pred_o = tmp_path / "o.h5ad"
    assert main(["predict", "--quiet", "--model", str(tmp_path / "m.onnx"), "--data", str(her2st_small[2]),
                 "--out", str(pred_o), "--smooth", "0"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(pred_o).X, ad.read_h5ad(pred_j).X, rtol=1e-4)
    assert ad.read_h5ad(pred_o).uns[keys.STIMAGE_UNS]["prediction"]["stain"] == "vahadane"


def test_stain_bad_input(her2st_small, tmp_path, capsys):
    blank = tmp_path / "blank.png"
    import cv2

    cv2.imwrite(str(blank), np.full((64, 64, 3), 255, np.uint8))
    base = ["train", "--quiet", "--data", str(her2st_small[0]), str(her2st_small[1]), "--genes", "CD74",
            "--backbone", "tiny", "--tile-px", "32", "--max-epochs", "1", "--workdir", str(tmp_path / "w")]
    for extra, message in ((["--stain", "macenko", "--stain-template", str(blank)], "no stained tissue"),
                           (["--stain", "macenko", "--stain-template", str(tmp_path / "nope.png")], "not found")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_training_leaves_out_low_coverage_tiles(her2st_small, tmp_path):
    from data_pipelines.tissue import spot_tissue_coverage

    wd = tmp_path / "cov"
    assert main(["train", "--quiet", "--data", str(her2st_small[0]), str(her2st_small[1]), "--genes", "CD74",
                 "--backbone", "tiny", "--tile-px", "32", "--max-epochs", "1", "--workdir", str(wd)]) == 0
    cfg = EnsembleModel.load(wd).config
    expected = {}
    for p, s in zip(her2st_small[:2], ("C2", "C3")):
        a = ad.read_h5ad(p)
        cov = spot_tissue_coverage(a, tile_um=cfg["tile_um"], tile_px=32)
        expected[s] = int((cov < 0.7).sum())
    assert cfg["min_coverage"] == 0.7 and cfg["dropped_low_coverage"] == expected
    assert 0 < expected["C2"] < 0.15 * 187  # a few edge spots, never most of the section
    # predictions record every spot's coverage, so low-coverage spots can be masked
    pred = tmp_path / "p.h5ad"
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(her2st_small[2]), "--out", str(pred)]) == 0
    c4 = ad.read_h5ad(her2st_small[2])
    np.testing.assert_allclose(ad.read_h5ad(pred).obs["tissue_coverage"],
                               spot_tissue_coverage(c4, tile_um=cfg["tile_um"], tile_px=32), rtol=1e-6)
