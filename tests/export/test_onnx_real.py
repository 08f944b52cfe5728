"""ONNX parity on real HER2ST tiles: EfficientNet-Lite0 (ImageNet weights) and ResNet50."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from export.predict import OnnxEnsemble
from export.to_onnx import export_onnx, graph_function
from stimage_jax.cli import main
from stimage_jax.ensemble.model import EnsembleModel

pytestmark = [pytest.mark.real_data, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def her2st_h5ad(her2st_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("her2st")
    assert main(["read", "her2st", str(her2st_root), "--sections", "C3,C4", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("backbone, px", [("efficientnet_lite0", 96), ("resnet50", 64)])
def test_parity_on_her2st_tiles(her2st_h5ad, tmp_path, backbone, px):
    wd = tmp_path / "wd"
    # resnet50 has no shipped weights: random initialisation is enough for a parity check
    assert main(["train", "--quiet", "--data", str(her2st_h5ad / "C3.h5ad"), "--genes", "markers",
                 "--backbone", backbone, "--tile-px", str(px), "--members", "2", "--max-epochs", "3",
                 "--tta", "1", "--workdir", str(wd)]) == 0  # the real backbones' parity; TTA's: test_tta_smooth
    model = EnsembleModel.load(wd)
    onx = OnnxEnsemble(export_onnx(model, tmp_path / "m.onnx"))
    from data_pipelines.slides import read_h5ad
    from data_pipelines.tiles import spot_tiles

    tiles = np.asarray(spot_tiles(read_h5ad(her2st_h5ad / "C4.h5ad"), tile_px=px, progress=False))[:64]
    fn = graph_function(model)
    for b in (1, 7, 64):
        mu_j, r_j = (np.asarray(v) for v in fn(jnp.asarray(tiles[:b])))
        out = onx.params(tiles[:b], batch_size=b)
        mu_o, r_o = out["mu"], out["r"]
        assert np.max(np.abs(mu_o - mu_j) / np.abs(mu_j)) <= 1e-4
        assert np.max(np.abs(r_o - r_j) / np.abs(r_j)) <= 1e-4
