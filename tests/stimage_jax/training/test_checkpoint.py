"""The checkpoint wrapper: arrays and JSON metadata round trip exactly; foreign, earlier and
mismatched checkpoints are one-line errors; the ensemble writes the same format."""

import json
import math

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from data_pipelines.errors import StimageError
from stimage_jax.training import CHECKPOINT_FORMAT, CheckpointMeta, Checkpointer


def _arrays():
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(0.5) * np.ones(3, np.float32)}
    return {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": np.int32(7),
            "key": jax.random.split(jax.random.key(3), 2)}


def _leaves(tree):
    return [np.asarray(jax.random.key_data(a)) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else np.asarray(a)
            for a in jax.tree.leaves(tree)]


def test_round_trip_of_arrays_and_metadata(tmp_path):
    arrays = _arrays()
    hist = [[{"epoch": 0, "train_loss": 0.1 + 0.2, "val_loss": math.nan}], []]
    meta = CheckpointMeta(step=4, unit="epoch", histories=hist,
                          early_stopping={"best_val": [math.inf, 1 / 3], "bad_epochs": [0, 2], "done": [False, True]},
                          elapsed_s=12.25)
    with Checkpointer(tmp_path / "c") as ck:
        assert ck.restore(arrays) is None  # nothing yet
        assert ck.save(4, arrays, meta) is True
        assert ck.save(4, arrays, meta) is False  # already the latest
    with Checkpointer(tmp_path / "c") as ck:
        got, back = ck.restore(jax.tree.map(lambda a: a, arrays))
    assert jax.tree.structure(got) == jax.tree.structure(arrays)
    for a, b in zip(_leaves(got), _leaves(arrays)):
        np.testing.assert_array_equal(a, b)
    assert back.step == 4 and back.unit == "epoch" and back.elapsed_s == 12.25 and back.format == CHECKPOINT_FORMAT
    assert back.histories[0][0]["train_loss"] == 0.1 + 0.2 and math.isnan(back.histories[0][0]["val_loss"])
    assert back.early_stopping == {"best_val": [math.inf, 1 / 3], "bad_epochs": [0, 2], "done": [False, True]}
    on_disk = json.loads((tmp_path / "c" / "4" / "meta" / "metadata").read_text())
    assert on_disk["format"] == CHECKPOINT_FORMAT and on_disk["step"] == 4


def test_mismatched_or_earlier_checkpoints_are_clear_errors(tmp_path):
    arrays = _arrays()
    with Checkpointer(tmp_path / "steps", unit="step") as ck:
        ck.save(2, arrays, CheckpointMeta(step=2, unit="step"))
    with Checkpointer(tmp_path / "steps", unit="epoch") as ck, pytest.raises(StimageError, match="counting 'step's"):
        ck.restore(arrays)
    # Another format version
    with Checkpointer(tmp_path / "fmt") as ck:
        ck.save(1, arrays, CheckpointMeta(step=1, format="stimage-jax-checkpoint/0"))
    with Checkpointer(tmp_path / "fmt") as ck, pytest.raises(StimageError, match="format") as e:
        ck.restore(arrays)
    assert "\n" not in str(e.value)
    # The layout before this format: one unnamed item, no metadata
    mngr = ocp.CheckpointManager((tmp_path / "old").absolute())
    mngr.save(3, args=ocp.args.StandardSave({"model": arrays["params"]}))
    mngr.wait_until_finished()
    mngr.close()
    with Checkpointer(tmp_path / "old") as ck, pytest.raises(StimageError, match="earlier version"):
        ck.restore(arrays)
    # Arrays of another shape (another architecture) are not restored into this one
    with Checkpointer(tmp_path / "steps", unit="step") as ck, \
            pytest.raises(StimageError, match=r"\['w'\] of shape \(2, 3\)"):
        ck.restore({**arrays, "params": {"w": np.zeros((4, 3), np.float32), "b": arrays["params"]["b"]}})


def test_ensemble_checkpoint_uses_the_format(tmp_path, rng):
    from stimage_jax.ensemble.stacked import create_members, fit_ensemble
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.nb.head import NBHead, init_head_from_data

    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = rng.poisson(2.0, size=(60, 2)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    st = init_head_from_data(create_members(lambda r: NBHead(4, 2, rngs=r), keys), x, y)
    _, hists = fit_ensemble(st, x[:40], y[:40], x[40:], y[40:], keys=keys, progress=False, mesh=None,
                            config=TrainConfig(lr=1e-2, max_epochs=3, batch_size=16), ckpt_dir=tmp_path)
    meta = json.loads((tmp_path / "stacked" / "3" / "meta" / "metadata").read_text())
    assert meta["format"] == CHECKPOINT_FORMAT and meta["unit"] == "epoch" and meta["step"] == 3
    assert meta["histories"] == hists
    assert meta["early_stopping"]["best_val"] == [min(r["val_loss"] for r in h) for h in hists]
    assert meta["early_stopping"]["done"] == [False, False]  # ran out of epochs, not of patience


def test_saved_model_folders_are_checked_file_by_file_before_orbax_reads_them(tmp_path):
    """A model folder records its array files' sha256 (``sha256sum`` format): a missing,
    changed or unrecorded-format file is named in one line before Orbax runs (Orbax's
    concurrent reads of a damaged checkpoint could print a late traceback)."""
    import hashlib
    import shutil

    from stimage_jax.training.checkpoint import DIGEST_FILE, verify_digests, write_digests

    good = tmp_path / "model"
    ck = ocp.StandardCheckpointer()
    ck.save((good / "params").absolute(), {"w": np.arange(12, dtype=np.float32)})
    ck.wait_until_finished()
    (good / "model.json").write_text("{}")
    write_digests(good)
    rows = [line.split("  ") for line in (good / DIGEST_FILE).read_text().splitlines()]
    files = sorted(p for p in good.rglob("*") if p.is_file() and p.name not in (DIGEST_FILE, "model.json"))
    assert [r[1] for r in rows] == [p.relative_to(good).as_posix() for p in files] and len(files) >= 3
    assert all(r[0] == hashlib.sha256(p.read_bytes()).hexdigest() for r, p in zip(rows, files))
    verify_digests(good)  # intact
    (good / "model.json").write_text('{"edited": 1}')  # validated by content elsewhere, not here
    verify_digests(good)

    for i, f in enumerate(files):
        bad = tmp_path / f"missing{i}"
        shutil.copytree(good, bad)
        (bad / f.relative_to(good)).unlink()
        with pytest.raises(StimageError, match=rf"model file .*{f.name} is missing; retrain or restore"):
            verify_digests(bad)
    bad = tmp_path / "flipped"
    shutil.copytree(good, bad)
    target = bad / files[-1].relative_to(good)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 1
    target.write_bytes(bytes(raw))
    with pytest.raises(StimageError, match=rf"{target.name} has changed since the model was saved"):
        verify_digests(bad)
    for text in ("", "not a digest line\n", f"{'0' * 64}  ../outside\n"):
        (bad / DIGEST_FILE).write_text(text)
        with pytest.raises(StimageError, match="arrays.sha256 is corrupt"):
            verify_digests(bad)
    (bad / DIGEST_FILE).unlink()
    verify_digests(bad)  # folders saved before the record existed are read as before
