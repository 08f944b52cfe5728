"""`stimage train --dataset DIR --fine-tune`: tiles streamed from the exported TFDS/ArrayRecord
dataset train the same model as the same spots read from h5ad, and resume the same way."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from stimage_jax.cli import main
from stimage_jax.ensemble.model import EnsembleModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
COMMON = ["--quiet", "--backbone", "tiny", "--members", "2", "--max-epochs", "2", "--fine-tune", "--lr", "1e-2",
          "--batch-size", "16"]


def _leaves(wd):
    m = EnsembleModel.load(wd / "model")
    return [np.asarray(a, np.float64) for mem in m.members for a in jax.tree.leaves(nnx.to_pure_dict(nnx.state(mem)))
            if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)]


def test_dataset_fine_tuning_equals_h5ad_fine_tuning(synthetic_study, tmp_path, capsys):
    ds = tmp_path / "ds"
    assert main(["export-dataset", "--quiet", "--data", *map(str, synthetic_study), "--out", str(ds),
                 "--genes", "A,B,C", "--tile-px", "32"]) == 0
    assert main(["train", *COMMON, "--data", *map(str, synthetic_study), "--genes", "A,B,C", "--tile-px", "32",
                 "--min-coverage", "0", "--workdir", str(tmp_path / "h5ad")]) == 0
    assert main(["train", *COMMON, "--dataset", str(ds), "--workdir", str(tmp_path / "ds_run")]) == 0
    a, b = _leaves(tmp_path / "h5ad"), _leaves(tmp_path / "ds_run")
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    m = EnsembleModel.load(tmp_path / "ds_run" / "model")
    assert m.genes == ["A", "B", "C"] and m.config["validation_samples"] == ["s2"] and m.config["tile_px"] == 32
    capsys.readouterr()
    # the same request resumes (here: returns the finished model); data as well as --dataset is refused
    assert main(["train", *COMMON, "--dataset", str(ds), "--workdir", str(tmp_path / "ds_run")]) == 0
    assert main(["train", *COMMON, "--dataset", str(ds), "--data", str(synthetic_study[0]),
                 "--workdir", str(tmp_path / "x")]) == 2
    assert main(["train", "--quiet", "--dataset", str(ds), "--workdir", str(tmp_path / "y")]) == 2  # no --fine-tune
    assert "--fine-tune" in capsys.readouterr().err
