"""The grain pipeline fine-tuning reads (data_pipelines.grain_source): records parsed straight
from the ArrayRecord protobufs equal TFDS's own decoding; epoch_loader's batches are each
member's in-RAM order (jax permutation keyed by its seed), epoch-aligned and padded with
weight 0; an iterator restored from its JSON state continues mid-epoch; worker processes and
record-by-record reads (grain.Batch) give the same batches as reader threads."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from data_pipelines.errors import StimageError
from data_pipelines.grain_source import (
    EpochSampler,
    ParseSpots,
    SpotRecords,
    epoch_loader,
)
from data_pipelines.tfds_dataset import open_source
from stimage_jax.cli import main
from stimage_jax.ensemble.dataset_train import MemberOrder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def exported(synthetic_study, tmp_path):
    out = tmp_path / "ds"
    assert main(["export-dataset", "--quiet", "--data", *map(str, synthetic_study[:2]), "--out", str(out),
                 "--genes", "A,B,C", "--tile-px", "16"]) == 0
    return out


def test_records_parse_as_tfds_decodes_them(exported):
    src, recs = open_source(exported), SpotRecords(exported)
    parse = ParseSpots(exported, ("tile", "counts", "xy", "sample", "spot"), recs.num_records)
    assert recs.num_records == len(src) == 128 and len(recs) == 256  # keys >= N: padding copies
    for k in (0, 63, 64, 127):
        got, want = parse.map(recs[k]), src[k]
        for f in ("tile", "counts", "xy"):
            assert got[f].dtype == want[f].dtype
            np.testing.assert_array_equal(got[f], want[f])
        assert got["sample"] == want["sample"] and got["spot"] == want["spot"]
        assert got["record"] == k and got["weight"] == 1.0
        pad = parse.map(recs[k + 128])
        assert pad["record"] == k and pad["weight"] == 0.0
        np.testing.assert_array_equal(pad["tile"], want["tile"])
    # the dataset stores tensors as raw bytes (one frombuffer each, not a list of int64 per pixel)
    feats = json.loads((exported / "features.json").read_text())["featuresDict"]["features"]
    assert feats["tile"]["tensor"]["encoding"] == "bytes"
    with pytest.raises(StimageError, match="no field"):
        ParseSpots(exported, ("nope",), 128)


def test_epoch_batches_follow_each_members_key_and_pad(exported):
    train = np.arange(3, 103)  # 100 records: batches of 16 → 6 full + 4 real and 12 padding
    key = jax.random.key(7)
    batches = list(epoch_loader(exported, train, batch_size=16, num_epochs=2, order=MemberOrder(key),
                                fields=("counts",)))
    assert len(batches) == 14 and all(b["record"].shape == (16,) for b in batches)
    counts = np.stack([open_source(exported)[int(k)]["counts"] for k in range(128)])
    for e in range(2):
        order = train[np.asarray(jax.random.permutation(jax.random.fold_in(key, e), 100))]
        epoch = batches[7 * e:7 * e + 7]
        for i, b in enumerate(epoch):
            real = b["record"][b["weight"] > 0]
            np.testing.assert_array_equal(real, np.sort(order[16 * i:16 * i + 16]))  # sorted within a batch
            np.testing.assert_array_equal(b["counts"], counts[b["record"]])
        last = epoch[-1]
        assert last["weight"].tolist() == [1.0] * 4 + [0.0] * 12 and set(last["record"][4:]) == {last["record"][0]}
    other = list(epoch_loader(exported, train, batch_size=16, num_epochs=1, order=MemberOrder(jax.random.key(8)),
                              fields=("counts",)))
    assert not np.array_equal(other[0]["record"], batches[0]["record"])
    # without an order function: a NumPy permutation per (seed, epoch), every record once per epoch
    seeded = list(epoch_loader(exported, train, batch_size=16, num_epochs=2, seed=5, fields=("counts",)))
    for e in range(2):
        got = np.concatenate([b["record"][b["weight"] > 0] for b in seeded[7 * e:7 * e + 7]])
        assert sorted(got.tolist()) == train.tolist()
    assert not np.array_equal(seeded[0]["record"], seeded[7]["record"])
    # in input order (validation): sequential, one epoch
    seq = list(epoch_loader(exported, np.arange(64, 128), batch_size=32, num_epochs=1, shuffle=False,
                            fields=("counts",)))
    assert np.concatenate([b["record"] for b in seq]).tolist() == list(range(64, 128))
    with pytest.raises(StimageError):
        EpochSampler([], 128, batch_size=4, num_epochs=1, seed=0)


def test_restored_iterator_continues_mid_epoch(exported):
    train, key = np.arange(0, 96), jax.random.key(3)

    def loader(k=key):
        return epoch_loader(exported, train, batch_size=16, num_epochs=3, order=MemberOrder(k), fields=("counts",))

    it = iter(loader())
    first = [next(it)["record"] for _ in range(8)]  # epoch 0 (6 batches) and 2 of epoch 1
    state = it.get_state()
    rest = [b["record"] for b in it]
    again = iter(loader())
    again.set_state(state)
    rest2 = [b["record"] for b in again]
    assert len(first) + len(rest) == 18 and len(rest2) == len(rest) == 10
    for x, y in zip(rest, rest2):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="[Ss]ampler"):  # a state is tied to its order (key, records, batch)
        iter(loader(jax.random.key(4))).set_state(state)


def test_worker_processes_and_record_reads_give_the_thread_batches(exported):
    train = np.arange(0, 128)
    kw = {"batch_size": 32, "num_epochs": 1, "order": MemberOrder(jax.random.key(1)), "fields": ("tile", "counts")}
    threads = list(epoch_loader(exported, train, read_threads=2, **kw))
    procs = list(epoch_loader(exported, train, worker_count=1, **kw))
    records = list(epoch_loader(exported, train, read_threads=0, per_record=True, **kw))  # grain.Batch
    assert len(threads) == len(procs) == len(records) == 4
    for a, b, c in zip(threads, procs, records):
        for f in ("record", "tile", "counts", "weight"):
            np.testing.assert_array_equal(a[f], b[f])
            np.testing.assert_array_equal(a[f], c[f])
