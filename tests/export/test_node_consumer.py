"""A non-Python runtime: the Node.js consumer in export/node gives the Python runtime's numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from export.predict import OnnxEnsemble
from export.to_onnx import export_onnx
from stimage_jax.cli import main
from stimage_jax.ensemble.model import EnsembleModel

NODE_DIR = Path(__file__).resolve().parents[2] / "export" / "node"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def node_consumer():
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js is not installed on this machine (the consumer needs node and npm)")
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        # --ignore-scripts: the postinstall only fetches optional CUDA binaries from outside
        # the npm registry; the CPU runtime ships inside the package.
        subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                       check=True, capture_output=True, timeout=600)
    return node


def test_node_means_equal_python(node_consumer, synthetic_study, tmp_path):
    wd = tmp_path / "wd"
    assert main(["train", "--quiet", "--data", *map(str, synthetic_study[:2]), "--workdir", str(wd),
                 "--backbone", "tiny", "--tile-px", "32", "--members", "2", "--max-epochs", "3",
                 "--genes", "A,B,C"]) == 0
    model_path = export_onnx(EnsembleModel.load(wd), tmp_path / "m.onnx")
    tiles = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "tiles.u8").write_bytes(tiles.tobytes())
    proc = subprocess.run([node_consumer, str(NODE_DIR / "predict.js"), str(model_path),
                           str(tmp_path / "tiles.u8"), "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    out = OnnxEnsemble(model_path).params(tiles)
    mu, r = out["mu"], out["r"]
    assert (got["members"], got["tiles"], got["genes"]) == (2, 5, 3)
    np.testing.assert_allclose(np.asarray(got["mean"]), mu.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["r"]).reshape(r.shape), r, rtol=1e-6)
    bad = subprocess.run([node_consumer, str(NODE_DIR / "predict.js"), str(model_path),
                          str(tmp_path / "tiles.u8"), "4"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("stimage: error:")
