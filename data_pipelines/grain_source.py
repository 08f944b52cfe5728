"""Streaming an exported spot dataset (:mod:`data_pipelines.tfds_dataset`) through grain.

``spot_loader(DIR, batch_size=..., seed=...)`` is a ``grain.DataLoader`` over the dataset's
random-access ArrayRecord source: sharded by process (each of N JAX processes reads every
N-th record of the global order), shuffled per epoch by grain's index sampler keyed by
``seed`` (a member's seed), with worker prefetch, and checkpointable — the iterator's
``get_state()`` is a small JSON-able value, and ``set_state`` on a fresh iterator continues
mid-epoch. Memory holds a few batches whatever the dataset's size.

grain imports JAX, so it is imported lazily here: the JAX-free runtime can import this
module (and never calls it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["spot_loader", "FIELDS"]

FIELDS = ("tile", "counts")


def spot_loader(directory: str | os.PathLike, *, batch_size: int, seed: int, num_epochs: int | None = 1,
                shuffle: bool = True, fields: Sequence[str] = FIELDS, records: Sequence[int] | None = None,
                shard_index: int | None = None, shard_count: int | None = None, worker_count: int = 0,
                drop_remainder: bool = False):
    """A grain DataLoader of batches ``{field: (B, ...) array}`` from an exported dataset.

    ``records``: restrict to these record indices (e.g. the training samples' ranges);
    shards: by default this JAX process's index and count when JAX is initialised with
    several processes, else one shard. ``worker_count`` > 0 prefetches in worker processes.
    """
    import grain.python as grain

    from data_pipelines.tfds_dataset import open_source

    source = open_source(directory)
    if records is not None:
        source = _Subset(source, np.asarray(records, np.int64))
    if len(source) == 0:
        raise StimageError(f"dataset {directory} has no records to read")
    if shard_index is None or shard_count is None:  # grain asks JAX for this process's index and count
        shards = grain.ShardByJaxProcess(drop_remainder=True)
    else:
        shards = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    sampler = grain.IndexSampler(len(source), shard_options=shards, shuffle=shuffle, num_epochs=num_epochs,
                                 seed=int(seed) % (2 ** 32))
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app, defaults
            flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(data_source=source, sampler=sampler, worker_count=worker_count,
                            operations=[_MapOp(fields), grain.Batch(batch_size, drop_remainder=drop_remainder)])


class _Subset:
    """A random-access source restricted to some of its indices."""

    def __init__(self, source, index: np.ndarray):
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.source[int(self.index[i])]


def _MapOp(fields):
    import grain.python as grain

    class Select(grain.MapTransform):
        def map(self, record):
            return {k: record[k] for k in fields}

    return Select()
