"""Two local processes × two forced CPU devices (gloo collectives) train the same ensemble as
one process with four devices, to 1e-5; a 2-process run killed mid-training resumes from its
Orbax checkpoint to that same model. Features-only training on a tiny synthetic study."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from stimage_jax.distributed import DistributedConfig, initialize
from stimage_jax.ensemble.model import EnsembleModel
from stimage_jax.launch import process_env
from data_pipelines.errors import StimageError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CONFIG = """
from stimage_jax.config import RunConfig
def get_config():
    return RunConfig(genes="A,B,C", members=2).override(embeddings="emb", max_epochs=8, batch_size=16,
                                                        lr=3e-2, patience=50, checkpoint_every=1)
"""
CLI = [sys.executable, "-c", "import sys; from stimage_jax.cli import main; sys.exit(main())"]


def _train_cmd(paths, wd, cfg):
    return ["train", "--quiet", "--data", *map(str, paths), "--workdir", str(wd), "--config", str(cfg)]


def _members(wd: Path) -> list[np.ndarray]:
    m = EnsembleModel.load(wd / "model")
    return [np.asarray(a, np.float64) for mem in m.members for a in jax.tree.leaves(nnx.to_pure_dict(nnx.state(mem)))
            if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)]


def _single_env(devices: int) -> dict:
    """One process (no JAX_* distributed variables) with ``devices`` forced CPU devices."""
    env = process_env(0, 1, "", devices)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k)
    return env


def _steps(wd: Path) -> list[int]:
    d = wd / "checkpoints" / "emb_emb" / "stacked"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow
def test_two_processes_equal_one_and_a_killed_run_resumes(feature_study, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG)
    one = tmp_path / "one"
    proc = subprocess.run([*CLI, *_train_cmd(feature_study, one, cfg)], env=_single_env(4), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = tmp_path / "two"
    launch = [sys.executable, "-m", "stimage_jax.launch", "-n", "2", "--devices-per-process", "2", "--",
              "stimage", *_train_cmd(feature_study, two, cfg)]
    first = subprocess.Popen(launch, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while first.poll() is None and not any(s >= 2 for s in _steps(two)) and time.monotonic() - t0 < 240:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # the launcher stops both training processes
    first.communicate(timeout=60)
    assert not (two / "model").exists(), "the run finished before it could be killed"
    assert 2 <= max(_steps(two)) < 8

    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # process 0 alone wrote the model and the log; every process printed the same summary
    assert proc.stdout.count("trained 2 member(s)") == 1 and "[process 1] trained 2 member(s)" in proc.stderr
    for a, b in zip(_members(one), _members(two), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    la, lb = pd.read_csv(one / "train_log.csv"), pd.read_csv(two / "train_log.csv")
    assert len(la) == 2 * 8 and list(la["epoch"]) == list(lb["epoch"])
    np.testing.assert_allclose(lb[["train_loss", "val_loss"]], la[["train_loss", "val_loss"]], rtol=1e-5)


def test_distributed_settings_are_checked():
    assert DistributedConfig().resolved(env={}).enabled is False
    got = DistributedConfig().resolved(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                            "JAX_PROCESS_ID": "1"})
    assert got == DistributedConfig("h:1", 2, 1)
    assert DistributedConfig(process_id=0).resolved(env={"JAX_PROCESS_ID": "1"}).process_id == 0  # option wins
    for bad in (DistributedConfig("h:1", 2, None), DistributedConfig("nohost", 2, 0), DistributedConfig("h:1", 2, 2)):
        with pytest.raises(StimageError):
            bad.check()
    with pytest.raises(StimageError, match="JAX_NUM_PROCESSES"):
        DistributedConfig().resolved(env={"JAX_NUM_PROCESSES": "two"})
    assert initialize(DistributedConfig()) is False or os.environ.get("JAX_COORDINATOR_ADDRESS")


def test_addressed_rows_and_gather_json():
    """Which batch rows a process reads: the union, per member, of the rows its devices hold."""
    from stimage_jax.distributed import addressed_rows, gather_json

    class Sharding:  # three local devices of a (3 members, 16 rows) batch on a bigger mesh
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(0, 1), slice(0, 8)), 1: (slice(0, 1), slice(8, 16)), 2: (slice(1, 2), slice(4, 8))}

    got = addressed_rows(Sharding(), (3, 16))
    assert [g.tolist() for g in got] == [list(range(16)), [4, 5, 6, 7], []]

    class Rows:  # a (16,) validation batch: this process's device holds rows 8..15
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(8, 16),)}

    assert [g.tolist() for g in addressed_rows(Rows(), (16,))] == [list(range(8, 16))]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("member", "batch"))
    whole = addressed_rows(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("member", "batch")), (2, 6))
    assert [g.tolist() for g in whole] == [list(range(6))] * 2
    assert gather_json({"a": [1, None]}) == [{"a": [1, None]}]  # one process


def test_launch_environment():
    env = process_env(1, 2, "127.0.0.1:5", 2, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    assert env["JAX_PROCESS_ID"] == "1" and env["JAX_NUM_PROCESSES"] == "2"
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2" and env["JAX_PLATFORMS"] == "cpu"


@pytest.mark.real_data
@pytest.mark.slow
def test_two_processes_on_real_her2st_equal_one(her2st_root, tmp_path):
    """Tiles, cached features and early stopping on two real sections: 2 processes × 2 devices
    give the 1-process, 1-device model (measured max relative difference 2e-7)."""
    from stimage_jax.cli import main

    data = tmp_path / "data"
    assert main(["read", "her2st", str(her2st_root), "--sections", "C2,C3", "--out", str(data)]) == 0
    args = ["--quiet", "--data", str(data / "C2.h5ad"), str(data / "C3.h5ad"), "--backbone", "tiny",
            "--tile-px", "32", "--members", "2", "--max-epochs", "3", "--genes", "markers"]
    assert main(["train", *args, "--workdir", str(tmp_path / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "stimage_jax.launch", "-n", "2", "--devices-per-process", "2", "--",
                           "stimage", "train", *args, "--workdir", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _members(tmp_path / "one"), _members(tmp_path / "two")
    assert len(a) == len(b) > 4
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    la, lb = pd.read_csv(tmp_path / "one" / "train_log.csv"), pd.read_csv(tmp_path / "two" / "train_log.csv")
    np.testing.assert_allclose(lb["val_loss"], la["val_loss"], rtol=1e-5)


STREAM = ["--backbone", "tiny", "--fine-tune", "--lr", "1e-2", "--batch-size", "16", "--checkpoint-steps", "3"]


def _stream_steps(wd: Path) -> list[int]:
    d = wd / "checkpoints" / "tiny" / "streamed"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _one_process(cmd, devices: int = 4):
    proc = subprocess.run([*CLI, *cmd], env=_single_env(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_stream_a_dataset_each_its_own_rows_and_resume_mid_epoch(synthetic_study, tmp_path):
    """`stimage train --dataset` on 2 processes × 2 devices: each process reads only the batch
    rows its devices hold (member 0's on process 0, member 1's on process 1), a run killed
    mid-epoch resumes from its step checkpoint (every process's grain reader state), and the
    model equals one process with 4 devices."""
    from stimage_jax.cli import main

    ds = tmp_path / "ds"
    assert main(["export-dataset", "--quiet", "--data", *map(str, synthetic_study), "--out", str(ds),
                 "--genes", "A,B,C", "--tile-px", "32"]) == 0
    args = ["train", "--dataset", str(ds), *STREAM, "--members", "2", "--max-epochs", "3"]
    _one_process([*args, "--quiet", "--workdir", str(tmp_path / "one")])

    two = tmp_path / "two"
    launch = [sys.executable, "-m", "stimage_jax.launch", "-n", "2", "--devices-per-process", "2", "--",
              "stimage", *args, "--workdir", str(two)]
    first = subprocess.Popen(launch, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    # 128 training spots / 16 = 8 steps per epoch: step 9 is in the middle of epoch 1
    while first.poll() is None and not any(s >= 9 and s % 8 for s in _stream_steps(two)) \
            and time.monotonic() - t0 < 400:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert not (two / "model").exists(), "the run finished before it could be killed"
    assert max(_stream_steps(two)) % 8, "no mid-epoch checkpoint to resume from"
    # each process reads its member's 16 rows of the 2 × 16 of a step (and the whole validation batch)
    assert "process 0 of 2 reads 16 of the 32 rows of each training step" in err
    assert "[process 1] " in err and "process 1 of 2 reads 16 of the 32 rows" in err

    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _members(tmp_path / "one"), _members(two)
    assert len(a) == len(b) > 10
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    la, lb = pd.read_csv(tmp_path / "one" / "train_log.csv"), pd.read_csv(two / "train_log.csv")
    assert len(la) == 2 * 3 and list(la["epoch"]) == list(lb["epoch"])
    np.testing.assert_allclose(lb[["train_loss", "val_loss"]], la[["train_loss", "val_loss"]], rtol=1e-5)

    # a checkpoint written by two processes is not resumed by one (its readers were per process)
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(two / "checkpoints", cut / "checkpoints")
    shutil.copy(two / "request.json", cut / "request.json")
    proc = subprocess.run([*CLI, *args, "--quiet", "--workdir", str(cut)], env=_single_env(4), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "was written by 2 process(es), this run has 1: resume with 2" in proc.stderr


@pytest.mark.real_data
@pytest.mark.slow
def test_two_processes_stream_real_her2st_with_augmentation_equal_one(her2st_root, tmp_path):
    """Real HER2ST spots (64 of C2, 32 of C3) exported; one member, so the two processes split
    every batch's rows, each augmenting (HED jitter) its own rows as in the whole batch: the
    model equals the 1-process, 4-device run's (which reads and augments whole batches).
    Against one device it differs by float summation order only (measured 1.8e-6)."""
    import anndata as ad

    from stimage_jax.cli import main

    data = tmp_path / "data"
    assert main(["read", "her2st", str(her2st_root), "--sections", "C2,C3", "--out", str(data)]) == 0
    for s, n in (("C2", 64), ("C3", 32)):
        ad.read_h5ad(data / f"{s}.h5ad")[:n].copy().write_h5ad(tmp_path / f"{s}.h5ad")
    ds = tmp_path / "ds"
    assert main(["export-dataset", "--quiet", "--data", str(tmp_path / "C2.h5ad"), str(tmp_path / "C3.h5ad"),
                 "--out", str(ds), "--tile-px", "32", "--genes", "markers"]) == 0
    args = ["train", "--dataset", str(ds), *STREAM, "--members", "1", "--max-epochs", "2", "--augment", "hed"]
    _one_process([*args, "--quiet", "--workdir", str(tmp_path / "one")])  # 4 devices, whole batches
    proc = subprocess.run([sys.executable, "-m", "stimage_jax.launch", "-n", "2", "--devices-per-process", "2", "--",
                           "stimage", *args, "--workdir", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2 reads 8 of the 16 rows of each training step" in proc.stderr
    a, b = _members(tmp_path / "one"), _members(tmp_path / "two")
    assert len(a) == len(b) > 4
    # to 1e-5: the two processes' gradient all-reduce (gloo) sums the batch halves in another
    # order than one process's devices (measured max abs difference 1.5e-6 after 12 steps)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
