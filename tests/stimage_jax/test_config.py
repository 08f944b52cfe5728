"""RunConfig: one frozen config built by the CLI or a Python file, serialised into
request.json, and a rerun keyed by the data's content (issue 13 item 2)."""

from __future__ import annotations

import dataclasses
import json

import anndata as ad
import numpy as np
import pytest

from data_pipelines.errors import StimageError
from stimage_jax.cli import main
from stimage_jax.config import RunConfig, flat_fields, load_config
from stimage_jax.ensemble.train import TrainConfig

TINY = ["--backbone", "tiny", "--tile-px", "32", "--lr", "3e-2", "--max-epochs", "3", "--genes", "A,B,C"]


def test_override_reaches_nested_parts_and_round_trips():
    cfg = RunConfig().override(members=3, lr=1e-3, backbone="a,b", dropout=0.2, val_samples="s1", C=0.5)
    assert cfg.members == 3 and cfg.train.lr == 1e-3 and cfg.head.dropout == 0.2 and cfg.classify.C == 0.5
    assert cfg.features.backbone == ("a", "b") and cfg.val_samples == ("s1",)
    assert cfg.train.max_epochs == TrainConfig().max_epochs  # untouched fields keep their defaults
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RunConfig().override(members=None) == RunConfig()  # None means "not given"
    with pytest.raises(StimageError, match="unknown run option"):
        RunConfig().override(memebrs=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.members = 1


def test_every_field_name_is_unique_and_old_requests_load():
    fields = flat_fields()
    assert fields["lr"] == "train" and fields["backbone"] == "features" and fields["members"] is None
    d = RunConfig().to_dict()
    del d["features"]["augment"], d["classify"]  # keys a newer version added
    assert RunConfig.from_dict(d) == RunConfig()


@pytest.mark.parametrize("bad, message", [(dict(members=0), "--members must be >= 1"),
                                          (dict(min_coverage=1.5), "--min-coverage"),
                                          (dict(task="cluster"), "unknown task"),
                                          (dict(task="classify", members=3), "--task classify")])
def test_check_refuses_unusable_values(bad, message):
    with pytest.raises(StimageError, match=message):
        RunConfig().override(**bad).check()


def test_config_file_equals_flags_and_flags_override(synthetic_study, tmp_path, capsys):
    conf = tmp_path / "tiny.py"
    conf.write_text("from stimage_jax.config import RunConfig\n"
                    "def get_config():\n"
                    "    return RunConfig(genes='A,B,C', members=2).override(backbone='tiny', tile_px=32, lr=3e-2,\n"
                    "                                                        max_epochs=3)\n")
    assert load_config(conf).members == 2
    data = ["--data", *map(str, synthetic_study[:2])]
    assert main(["train", "--quiet", *data, "--workdir", str(tmp_path / "flags"), *TINY, "--members", "2"]) == 0
    assert main(["train", "--quiet", *data, "--workdir", str(tmp_path / "file"), "--config", str(conf)]) == 0
    req = [json.loads((tmp_path / w / "request.json").read_text()) for w in ("flags", "file")]
    assert req[0] == req[1]
    assert req[0]["config"]["members"] == 2 and req[0]["config"]["train"]["lr"] == 3e-2
    # An option on the command line overrides the file.
    assert main(["train", "--quiet", *data, "--workdir", str(tmp_path / "over"), "--config", str(conf),
                 "--members", "1"]) == 0
    assert json.loads((tmp_path / "over" / "request.json").read_text())["config"]["members"] == 1
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return {'members': 2}\n")
    capsys.readouterr()
    assert main(["train", *data, "--workdir", str(tmp_path / "bad"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must define get_config() returning a RunConfig" in err[0]


def test_changed_counts_are_refused_not_served_stale(synthetic_study, tmp_path, capsys):
    """Same command, same sample ids, different counts: an error naming the sample, never
    the old model; --overwrite retrains on the new data."""
    wd = tmp_path / "wd"
    args = ["train", "--quiet", "--data", *map(str, synthetic_study[:2]), "--workdir", str(wd), *TINY]
    assert main(args) == 0
    before = (wd / "model" / "model.json").read_text()
    a = ad.read_h5ad(synthetic_study[1])
    a.X = a.X * 3  # same spots and genes, other counts
    a.write_h5ad(synthetic_study[1])
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the data of sample(s) s1 changed" in err[0] and "--overwrite" in err[0]
    assert (wd / "model" / "model.json").read_text() == before  # refused: nothing touched
    assert main(args + ["--overwrite"]) == 0
    new = json.loads((wd / "request.json").read_text())
    assert new["data"]["s1"] != json.loads(json.dumps(new))["data"]["s0"]
    assert main(args) == 0  # and now the same command reuses the retrained model


def test_feature_cache_follows_tile_content(rng):
    from stimage_jax.pipeline import tiles_digest

    t = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    u = t.copy()
    u[3, 4, 4, 1] ^= 1  # one bit of one pixel
    assert tiles_digest(t) == tiles_digest(t.copy()) != tiles_digest(u)
