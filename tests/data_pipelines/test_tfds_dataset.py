"""`stimage export-dataset`: spot tiles and counts as a TFDS/ArrayRecord dataset, read back
without TensorFlow (tfds data source) and through grain (sharded, shuffled, resumable)."""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pytest

from data_pipelines.grain_source import spot_loader
from data_pipelines.tfds_dataset import dataset_metadata, open_source
from data_pipelines.tiles import spot_tiles
from stimage_jax.cli import main


@pytest.fixture
def exported(synthetic_study, tmp_path):
    out = tmp_path / "ds"
    assert main(["export-dataset", "--quiet", "--data", *map(str, synthetic_study[:2]), "--out", str(out),
                 "--genes", "A,B", "--tile-px", "32"]) == 0
    return out, synthetic_study[:2]


def test_dataset_reads_back_without_tensorflow(exported):
    import tensorflow_datasets as tfds

    out, paths = exported
    src = tfds.builder_from_directory(str(out)).as_data_source("train")
    assert (out / "dataset_info.json").is_file() and any("array_record" in p.name for p in out.iterdir())
    meta = dataset_metadata(out)
    assert meta["genes"] == ["A", "B"] and meta["samples"] == {"s0": [0, 64], "s1": [64, 128]} and len(src) == 128
    assert meta["tile_um"] == 26.0 and meta["tile_px"] == 32 and meta["stain"] == "raw"  # the spot diameter
    for p, (lo, hi) in zip(paths, meta["samples"].values()):
        a = ad.read_h5ad(p)
        tiles = spot_tiles(a, tile_px=32, progress=False)
        for i in (0, 17, hi - lo - 1):
            rec = src[lo + i]
            np.testing.assert_array_equal(rec["tile"], tiles[i])
            np.testing.assert_array_equal(rec["counts"], a[:, ["A", "B"]].X.toarray()[i].astype(np.float32))
            assert rec["spot"].decode() == a.obs_names[i] and rec["sample"].decode() == a.obs["sample"].iloc[i]
            np.testing.assert_array_equal(rec["xy"], a.obsm["spatial"][i])
    assert "tensorflow" not in sys.modules


def test_grain_loader_shards_shuffles_and_resumes(exported):
    out, _ = exported
    spots = lambda loader: [bytes(s) for b in loader for s in b["spot"]]  # noqa: E731
    shard0 = spots(spot_loader(out, batch_size=8, seed=3, shard_index=0, shard_count=2, fields=("spot",)))
    shard1 = spots(spot_loader(out, batch_size=8, seed=3, shard_index=1, shard_count=2, fields=("spot",)))
    assert len(shard0) == len(shard1) == 64 and len(set(shard0) | set(shard1)) == 128  # disjoint, complete
    two = spots(spot_loader(out, batch_size=8, seed=3, shard_index=0, shard_count=1, num_epochs=2, fields=("spot",)))
    assert sorted(two[:128]) == sorted(two[128:]) and two[:128] != two[128:]  # every epoch, reshuffled
    assert spots(spot_loader(out, batch_size=8, seed=4, shard_index=0, shard_count=1, fields=("spot",))) != two[:128]
    # a restored iterator continues mid-epoch with exactly the batches the first would have given
    it = iter(spot_loader(out, batch_size=8, seed=3, shard_index=0, shard_count=1, fields=("spot", "counts")))
    [next(it) for _ in range(5)]
    state = it.get_state()
    rest = list(it)
    again = iter(spot_loader(out, batch_size=8, seed=3, shard_index=0, shard_count=1, fields=("spot", "counts")))
    again.set_state(state)
    rest2 = list(again)
    assert len(rest) == len(rest2) == 11
    for x, y in zip(rest, rest2):
        np.testing.assert_array_equal(x["counts"], y["counts"])
    only_s1 = spots(spot_loader(out, batch_size=8, seed=0, records=range(64, 128), shard_index=0, shard_count=1,
                                fields=("spot",)))
    assert len(only_s1) == 64 and all(s.startswith(b"s1_") for s in only_s1)


def test_bad_input_writes_nothing(synthetic_study, tmp_path, capsys, exported):
    out, _ = exported
    assert main(["export-dataset", "--data", str(synthetic_study[0]), "--out", str(out), "--genes", "A"]) == 2
    assert "exists" in capsys.readouterr().err
    bad = tmp_path / "bad"
    assert main(["export-dataset", "--data", str(synthetic_study[0]), "--out", str(bad), "--genes", "NOPE"]) == 2
    assert "NOPE" in capsys.readouterr().err and not bad.exists()
    assert main(["export-dataset", "--data", str(synthetic_study[0]), "--out", str(out), "--genes", "A",
                 "--tile-px", "16", "--overwrite", "--quiet"]) == 0
    assert len(open_source(out)) == 64


@pytest.mark.real_data
def test_her2st_section_exports(her2st_root, tmp_path):
    data = tmp_path / "data"
    assert main(["read", "her2st", str(her2st_root), "--sections", "C2", "--out", str(data)]) == 0
    out = tmp_path / "ds"
    assert main(["export-dataset", "--quiet", "--data", str(data / "C2.h5ad"), "--out", str(out),
                 "--tile-px", "16"]) == 0
    a = ad.read_h5ad(data / "C2.h5ad")
    src, meta = open_source(out), dataset_metadata(out)
    assert len(src) == a.n_obs and len(meta["genes"]) == 14
    counts = np.stack([src[i]["counts"] for i in range(len(src))])
    np.testing.assert_array_equal(counts, a[:, meta["genes"]].X.toarray().astype(np.float32))
    assert src[0]["tile"].shape == (16, 16, 3) and 60 < src[0]["tile"].mean() < 250  # H&E, not padding
