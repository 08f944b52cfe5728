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
    # how the stream reads and checkpoints (no reader threads, a checkpoint every 3 steps) is not
    # what it trains: the same model
    assert main(["train", *COMMON, "--dataset", str(ds), "--workdir", str(tmp_path / "ds_run"),
                 "--read-threads", "0", "--checkpoint-steps", "3"]) == 0
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
    assert main(["train", *COMMON, "--data", str(synthetic_study[0]), "--workdir", str(tmp_path / "z"),
                 "--input-workers", "1"]) == 2
    assert capsys.readouterr().err == "stimage: error: --input-workers go with --dataset DIR\n"
    assert main(["train", *COMMON, "--dataset", str(ds), "--workdir", str(tmp_path / "z"), "--read-threads", "-1"]) == 2
    assert not (tmp_path / "z").exists()


class _Killed(Exception):
    pass


def _cfg(ds, **kw):
    from stimage_jax.pipeline import run_config

    return run_config(None, dataset=str(ds), backbone="tiny", members=2, max_epochs=2, fine_tune=True, lr=1e-2,
                      batch_size=16, **kw)


def test_killed_streamed_run_resumes_mid_epoch(synthetic_study, tmp_path):
    """A run killed mid-epoch resumes from its step checkpoint (arrays + grain iterator states):
    the resumed run reads exactly the rest of that epoch and ends equal to an uninterrupted run."""
    from stimage_jax.ensemble.dataset_train import (
        STREAM_CHECKPOINTS,
        StreamOptions,
        train_from_dataset,
    )
    from stimage_jax.training import Checkpointer

    ds = tmp_path / "ds"
    assert main(["export-dataset", "--quiet", "--data", *map(str, synthetic_study), "--out", str(ds),
                 "--genes", "A,B,C", "--tile-px", "32"]) == 0
    opts = StreamOptions(checkpoint_steps=5)  # 128 training spots / 16 = 8 steps per epoch: saves at 5, 10, 15
    seen = {}

    def watch(run):
        def on_batch(member, epoch, records):
            seen.setdefault(run, {}).setdefault((member, epoch), []).append(np.asarray(records).tolist())
        return on_batch

    train_from_dataset(ds, tmp_path / "full", _cfg(ds), progress=False, options=opts, on_batch=watch("full"))

    def kill(step):
        if step == 12:  # epoch 1, batch 4; the latest checkpoint is step 10 (epoch 1 after 2 batches)
            raise _Killed

    with pytest.raises(_Killed):
        train_from_dataset(ds, tmp_path / "cut", _cfg(ds), progress=False, options=opts, on_step=kill,
                           on_batch=watch("killed"))
    assert not (tmp_path / "cut" / "model").exists()
    with Checkpointer(tmp_path / "cut" / "checkpoints" / "tiny" / STREAM_CHECKPOINTS, unit="step") as ck:
        assert ck.latest_step() == 10
    train_from_dataset(ds, tmp_path / "cut", _cfg(ds), progress=False, options=opts, on_batch=watch("resumed"))

    for m in range(2):
        full, resumed = seen["full"][(m, 1)], seen["resumed"][(m, 1)]
        assert len(full) == 8 and len(resumed) == 6 and (m, 0) not in seen["resumed"]
        assert resumed == full[2:]  # exactly the epoch's remaining batches, in order
        flat = lambda batches: sorted(k for b in batches for k in b)
        assert flat(full) == flat(seen["full"][(m, 0)]) == list(range(128))
    assert seen["full"][(0, 0)] != seen["full"][(1, 0)]  # each member its own order
    a, b = _leaves(tmp_path / "full"), _leaves(tmp_path / "cut")
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)


@pytest.mark.real_data
def test_her2st_streamed_fine_tuning_resumes_mid_epoch(her2st_root, tmp_path):
    """Real HER2ST spots (48 of section C2) exported and fine-tuned from the stream: killed
    mid-epoch and resumed, the model equals the uninterrupted run's."""
    import anndata as ad

    from stimage_jax.ensemble.dataset_train import StreamOptions, train_from_dataset

    data = tmp_path / "data"
    assert main(["read", "her2st", str(her2st_root), "--sections", "C2", "--out", str(data)]) == 0
    a = ad.read_h5ad(data / "C2.h5ad")
    a[:48].copy().write_h5ad(tmp_path / "c2_48.h5ad")
    ds = tmp_path / "ds"
    assert main(["export-dataset", "--quiet", "--data", str(tmp_path / "c2_48.h5ad"), "--out", str(ds),
                 "--tile-px", "32"]) == 0
    opts = StreamOptions(checkpoint_steps=4)  # one sample, no validation: 48 / 16 = 3 steps per epoch
    train_from_dataset(ds, tmp_path / "full", _cfg(ds), progress=False, options=opts)

    def kill(step):
        if step == 5:  # epoch 1, batch 2; the latest checkpoint is step 4 (epoch 1 after 1 batch)
            raise _Killed

    with pytest.raises(_Killed):
        train_from_dataset(ds, tmp_path / "cut", _cfg(ds), progress=False, options=opts, on_step=kill)
    m = train_from_dataset(ds, tmp_path / "cut", _cfg(ds), progress=False, options=opts)
    assert len(m.genes) == 14 and m.config["training_samples"] == ["C2"]
    a, b = _leaves(tmp_path / "full"), _leaves(tmp_path / "cut")
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
