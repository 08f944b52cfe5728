"""Streaming an exported spot dataset (:mod:`data_pipelines.tfds_dataset`) through grain.

Two loaders over the dataset's random-access ArrayRecord files (the same records
``tfds.builder_from_directory(DIR).as_data_source("train")`` serves):

- :func:`spot_loader` — a ``grain.DataLoader`` with grain's own ``IndexSampler``: sharded
  by process (each of N JAX processes reads every N-th record of the global order),
  shuffled per epoch by a seed, batches that run across epochs. General purpose.
- :func:`epoch_loader` — the loader fine-tuning uses (``stimage train --dataset``): an
  :class:`EpochSampler` draws member ``m``'s order of epoch ``e`` from a given order function
  (the trainer passes the in-RAM loop's ``permutation(fold_in(key_m, e), n)``), cut into fixed-size batches
  that never cross an epoch (the last one padded with copies of its first record, weight
  0), so a model trained from the dataset equals one trained from the same arrays.

Both read records as raw bytes and parse them with :class:`ParseSpots` (one protobuf parse
and ``np.frombuffer`` per field; TFDS's generic decoder is 3-4x slower per record), prefetch
with ``ReadOptions`` threads (default) or ``worker_count`` processes, batch in the pipeline
(``grain.Batch``), and are checkpointable: ``iterator.get_state()`` is a small JSON value;
``set_state`` on a fresh iterator of the same loader continues mid-epoch. The state names the
dataset by its content digest (not its path), so a moved dataset still resumes. Memory
holds the prefetch buffer whatever the dataset's size.

grain imports JAX, so grain is imported lazily and no JAX code is named here (the JAX
permutation comes from the caller): the JAX-free runtime can import this module (and never
calls it).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError

__all__ = [
    "DEFAULT_PREFETCH",
    "DEFAULT_READ_THREADS",
    "FIELDS",
    "EpochBatches",
    "EpochSampler",
    "ParseSpots",
    "SpotRecords",
    "epoch_loader",
    "spot_loader",
]

FIELDS = ("tile", "counts")
# One reader thread: it reads the next batches while the step runs (on an accelerator the host is
# free, so the read is hidden). On 2 shared CPU cores 0, 1 and 2 threads measured alike within the
# noise (experiments/benchmarks/dataset_throughput.py); 4 were slower (GIL contention).
DEFAULT_READ_THREADS = 1
DEFAULT_PREFETCH = 256  # records read ahead per loader


class SpotRecords:
    """The exported dataset's records, random access: ``len`` N; ``src[k]`` → ``(k, raw bytes)``.

    Keys ``N <= k < 2N`` are the padding copies of record ``k - N`` (read as record ``k - N``;
    :class:`ParseSpots` gives them weight 0): grain's source datasets take keys modulo the
    length, so a padded record is told apart by its key alone. ``repr`` names the dataset by
    content digest (grain checks it when an iterator state is restored).
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        from data_pipelines.tfds_dataset import DATASET_NAME, dataset_metadata

        directory = Path(directory).absolute()
        meta = dataset_metadata(directory)
        files = sorted(directory.glob(f"{DATASET_NAME}-{split}.array_record-*"))
        if not files:
            raise StimageError(f"dataset {directory} has no {split!r} ArrayRecord files")
        self.files = [str(f) for f in files]
        self.digest, self.split = str(meta.get("digest", "")), split
        self._n = sum(int(meta_n) for meta_n in _shard_lengths(directory, split))

    @functools.cached_property
    def _source(self):  # opened on first read, in whichever process reads (grain workers pickle self)
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        return ArrayRecordDataSource(self.files)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __len__(self) -> int:
        return 2 * self._n

    @property
    def num_records(self) -> int:
        return self._n

    def __getitem__(self, k: int):
        k = int(k)
        return k, self._source[k % self._n]

    def __getitems__(self, keys: Sequence[int]):
        keys = [int(k) for k in keys]
        return list(zip(keys, self._source.__getitems__([k % self._n for k in keys])))

    def __repr__(self) -> str:
        return f"SpotRecords(digest={self.digest!r}, split={self.split!r}, n={self._n})"


def _shard_lengths(directory: Path, split: str) -> list[int]:
    import json

    info = json.loads((directory / "dataset_info.json").read_text())
    for s in info.get("splits", []):
        if s.get("name") == split:
            return [int(x) for x in s.get("shardLengths", [])]
    raise StimageError(f"dataset {directory} has no split {split!r}")


def _field_specs(directory: Path) -> dict:
    """{field: ("text",) | ("bytes", dtype, shape) | ("list", dtype, shape)} from features.json."""
    import json

    feats = json.loads((Path(directory) / "features.json").read_text())["featuresDict"]["features"]
    specs = {}
    for name, f in feats.items():
        if "text" in f:
            specs[name] = ("text",)
        else:
            t = f["tensor"]
            shape = tuple(int(s) for s in t.get("shape", {}).get("dimensions", []))
            specs[name] = ("bytes" if t.get("encoding") == "bytes" else "list", t["dtype"], shape)
    return specs


class ParseSpots:
    """``(key, serialized tf.train.Example)`` → ``{field: value, "record": key mod N, "weight": 0/1}``.

    Reads each field straight from the protobuf: raw-bytes tensors (datasets written by this
    version) with ``np.frombuffer``, value lists (older datasets) with ``np.asarray``; text as
    bytes. A grain ``MapTransform`` (picklable, for worker processes).
    """

    def __init__(self, directory: str | os.PathLike, fields: Sequence[str], num_records: int):
        specs = _field_specs(Path(directory))
        unknown = [f for f in fields if f not in specs]
        if unknown:
            raise StimageError(f"dataset {directory} has no field(s) {unknown}; it has {sorted(specs)}")
        self.specs = {f: specs[f] for f in fields}
        self.n = int(num_records)

    def map(self, item):
        from tensorflow_datasets.proto import tf_example_pb2

        key, raw = item
        feats = tf_example_pb2.Example.FromString(raw).features.feature
        out = {}
        for name, spec in self.specs.items():
            f = feats[name]
            if spec[0] == "text":
                out[name] = f.bytes_list.value[0]
            elif spec[0] == "bytes":
                out[name] = np.frombuffer(f.bytes_list.value[0], spec[1]).reshape(spec[2])
            else:
                vals = f.int64_list.value if f.HasField("int64_list") else f.float_list.value
                out[name] = np.asarray(vals, spec[1]).reshape(spec[2])
        out["record"] = np.int64(key % self.n)
        out["weight"] = np.float32(key < self.n)
        return out


class EpochSampler:
    """A grain sampler of ``num_epochs`` epochs of ``records`` in fixed-size batches.

    Epoch ``e``'s order of the ``n`` records is ``order(e, n)`` (a picklable callable with a
    ``repr`` that names it, e.g. the trainer's per-member JAX permutation
    :class:`stimage_jax.ensemble.dataset_train.MemberOrder`), else a NumPy permutation seeded
    by ``(seed, e)``, or input order with ``shuffle=False``; it is cut into batches of
    ``batch_size`` whose records are sorted (sequential reads, as the in-RAM loop's batches),
    the last batch padded with copies of its first record (keys ``+ N``, weight 0). Global
    index ``i`` is epoch ``i // L``, position ``i % L`` with ``L = ceil(n / batch_size) *
    batch_size``. ``repr`` (checked by grain on restore) holds everything that fixes the order.
    """

    def __init__(self, records: np.ndarray, num_records: int, *, batch_size: int, num_epochs: int,
                 order=None, seed: int | None = None, shuffle: bool = True):
        self.records = np.asarray(records, np.int64)
        self.n, self.num_records = len(self.records), int(num_records)
        self.batch_size, self.num_epochs, self.shuffle = int(batch_size), int(num_epochs), bool(shuffle)
        if self.n == 0:
            raise StimageError("no records to read")
        self.length = -(-self.n // self.batch_size) * self.batch_size  # per epoch, padded
        self.order, self.seed = order, None if seed is None else int(seed)
        if self.shuffle and order is None and seed is None:
            raise ValueError("shuffling needs an order or a seed")
        self._cache: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}

    def __len__(self) -> int:
        return self.num_epochs * self.length

    def epoch_keys(self, epoch: int) -> np.ndarray:
        """The record keys of one epoch, (L,), padding keys ``>= N`` included."""
        if epoch not in self._cache:
            if not self.shuffle:
                perm = np.arange(self.n)
            elif self.order is not None:
                perm = np.asarray(self.order(epoch, self.n))
            else:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            keys = self.records[perm]
            chunks = [np.sort(keys[s:s + self.batch_size]) for s in range(0, self.n, self.batch_size)]
            pad = self.length - self.n
            if pad:
                chunks.append(np.full(pad, chunks[-1][0] + self.num_records))
            self._cache = {epoch: np.concatenate(chunks)}  # one epoch at a time: O(n) memory
        return self._cache[epoch]

    def __getitem__(self, index: int):
        from grain.python import RecordMetadata

        if index < 0 or index >= len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        epoch, pos = divmod(int(index), self.length)
        return RecordMetadata(index=index, record_key=int(self.epoch_keys(epoch)[pos]))

    def __repr__(self) -> str:
        rec = hashlib.sha1(self.records.tobytes()).hexdigest()[:16]
        how = repr(self.order) if self.order is not None else f"seed={self.seed}"
        return (f"EpochSampler(records={rec}, n={self.n}, batch_size={self.batch_size}, "
                f"num_epochs={self.num_epochs}, shuffle={self.shuffle}, {how})")


class EpochBatches:
    """Random-access *batches* of :class:`EpochSampler`'s order: item ``i`` is batch ``i % P`` of
    epoch ``i // P`` (``P`` batches per epoch) as ``{field: (B, ...), "record": (B,), "weight": (B,)}``.

    Why batches, not records: grain's per-record path (sampler, source, map, batch, each a
    Python call per record) costs ~5x the read and parse themselves on this machine; a batch
    is one tight read-and-parse loop, so grain's per-element work is paid once per batch. A grain
    ``DataLoader`` still samples, shards (whole batches per process), prefetches and
    checkpoints these items.
    """

    def __init__(self, directory: str | os.PathLike, sampler: EpochSampler, fields: Sequence[str],
                 rows: Sequence[int] | None = None):
        self.records = SpotRecords(directory)
        self.sampler = sampler
        self.parse = ParseSpots(directory, fields, self.records.num_records)
        self.per_epoch = sampler.length // sampler.batch_size
        # several processes: each reads only these rows of every batch (the rows its devices hold)
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        if self.rows is not None and (not len(self.rows) or self.rows.min() < 0
                                      or self.rows.max() >= sampler.batch_size):
            raise ValueError(f"rows must be a non-empty subset of [0, {sampler.batch_size})")

    def __len__(self) -> int:
        return self.sampler.num_epochs * self.per_epoch

    def __getitem__(self, i: int) -> dict:
        epoch, b = divmod(int(i), self.per_epoch)
        bs = self.sampler.batch_size
        keys = self.sampler.epoch_keys(epoch)[b * bs:(b + 1) * bs]
        if self.rows is not None:
            keys = keys[self.rows]
        rows = [self.parse.map(self.records[k]) for k in keys]  # array_record's __getitems__ starts threads per call: slower
        return {k: np.stack([r[k] for r in rows]) if isinstance(rows[0][k], np.ndarray | np.generic)
                else [r[k] for r in rows] for k in rows[0]}

    def __repr__(self) -> str:
        rows = "all" if self.rows is None else hashlib.sha1(self.rows.tobytes()).hexdigest()[:16]
        return f"EpochBatches({self.records!r}, {self.sampler!r}, fields={sorted(self.parse.specs)}, rows={rows})"


def _read_options(read_threads: int | None, prefetch: int | None):
    import grain.python as grain

    return grain.ReadOptions(num_threads=DEFAULT_READ_THREADS if read_threads is None else int(read_threads),
                             prefetch_buffer_size=DEFAULT_PREFETCH if prefetch is None else int(prefetch))


def _mark_flags(worker_count: int) -> None:
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app, defaults
            flags.FLAGS.mark_as_parsed()


def epoch_loader(directory: str | os.PathLike, records: Sequence[int], *, batch_size: int, num_epochs: int,
                 order=None, seed: int | None = None, shuffle: bool = True, fields: Sequence[str] = FIELDS, worker_count: int = 0,
                 read_threads: int | None = None, prefetch: int | None = None, per_record: bool = False,
                 rows: Sequence[int] | None = None):
    """A grain DataLoader of epoch-aligned batches ``{field: (B, ...), "record": (B,), "weight": (B,)}``
    of ``records`` (see :class:`EpochSampler`); ``ceil(len(records) / batch_size)`` batches per epoch.

    Batches are the in-RAM loop's, exactly; prefetch runs in
    ``read_threads`` threads or ``worker_count`` processes (``prefetch``: items read ahead).
    Items are whole batches read at once (:class:`EpochBatches`); ``per_record`` reads
    record by record and batches with ``grain.Batch`` instead (same batches, slower).
    ``rows``: read only these rows of every batch (the share of a process whose devices hold
    them, when several JAX processes train on one global batch); None reads whole batches.
    """
    import grain.python as grain

    src = SpotRecords(directory)
    sampler = EpochSampler(records, src.num_records, batch_size=batch_size, num_epochs=num_epochs, order=order,
                           seed=seed, shuffle=shuffle)
    _mark_flags(worker_count)
    if per_record:
        if rows is not None:
            raise ValueError("per_record reads whole batches (rows=None)")
        return grain.DataLoader(data_source=src, sampler=sampler, worker_count=worker_count,
                                shard_options=grain.NoSharding(), read_options=_read_options(read_threads, prefetch),
                                operations=[_Parse(directory, fields, src.num_records), grain.Batch(batch_size)])
    batches = EpochBatches(directory, sampler, fields, rows)
    ahead = DEFAULT_PREFETCH // batch_size + 1 if prefetch is None else max(1, int(prefetch) // batch_size)
    return grain.DataLoader(data_source=batches, worker_count=worker_count, shard_options=grain.NoSharding(),
                            sampler=grain.IndexSampler(len(batches), shard_options=grain.NoSharding(),
                                                       shuffle=False, num_epochs=1),
                            read_options=_read_options(read_threads, ahead))


def spot_loader(directory: str | os.PathLike, *, batch_size: int, seed: int, num_epochs: int | None = 1,
                shuffle: bool = True, fields: Sequence[str] = FIELDS, records: Sequence[int] | None = None,
                shard_index: int | None = None, shard_count: int | None = None, worker_count: int = 0,
                drop_remainder: bool = False, read_threads: int | None = None, prefetch: int | None = None):
    """A grain DataLoader of batches ``{field: (B, ...) array, "record", "weight"}`` from an exported dataset.

    ``records``: restrict to these record indices (e.g. the training samples' ranges);
    shards: by default this JAX process's index and count when JAX is initialised with
    several processes, else one shard. ``worker_count`` > 0 prefetches in worker processes,
    else ``read_threads`` threads.
    """
    import grain.python as grain

    src = SpotRecords(directory)
    index = np.arange(src.num_records) if records is None else np.asarray(records, np.int64)
    if len(index) == 0:
        raise StimageError(f"dataset {directory} has no records to read")
    source = src if records is None else _Subset(src, index)
    if shard_index is None or shard_count is None:  # grain asks JAX for this process's index and count
        shards = grain.ShardByJaxProcess(drop_remainder=True)
    else:
        shards = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    sampler = grain.IndexSampler(len(index), shard_options=shards, shuffle=shuffle, num_epochs=num_epochs,
                                 seed=int(seed) % (2 ** 32))
    _mark_flags(worker_count)
    return grain.DataLoader(data_source=source, sampler=sampler, worker_count=worker_count,
                            read_options=_read_options(read_threads, prefetch),
                            operations=[_Parse(directory, fields, src.num_records),
                                        grain.Batch(batch_size, drop_remainder=drop_remainder)])


class _Subset:
    """A random-access source restricted to some of its indices."""

    def __init__(self, source: SpotRecords, index: np.ndarray):
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.source[int(self.index[i])]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {hashlib.sha1(self.index.tobytes()).hexdigest()[:16]})"


def _Parse(directory, fields, n):
    return _parse_class()(directory, fields, n)


@functools.cache
def _parse_class():
    """:class:`ParseSpots` as a grain ``MapTransform``, defined on first use (grain imports JAX)
    and reachable as this module's ``ParseTransform`` so worker processes can unpickle it."""
    import grain.python as grain

    class ParseTransform(ParseSpots, grain.MapTransform):
        pass

    ParseTransform.__module__, ParseTransform.__qualname__ = __name__, "ParseTransform"
    return ParseTransform


def __getattr__(name: str):
    if name == "ParseTransform":
        return _parse_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
