"""Several JAX processes (hosts) training one ensemble: start-up and the few cross-process helpers.

One process per host (or per GPU), all running the same ``stimage train`` command; together
their devices form one ("member", "batch") mesh (:func:`stimage_jax.ensemble.stacked.member_mesh`
over ``jax.devices()``, which lists every process's devices). Every process reads the same data
and computes the same data order, so a global batch is built from the full host copy each
process holds (:func:`put`) — or, for data streamed from disk, each process reads only the
batch rows its own devices hold (:func:`addressed_rows`); values a process cannot address (another host's members' losses)
reach the host only through :func:`to_host` (an all-gather), never ``np.asarray``. Process 0
alone writes files other than Orbax's array shards (:func:`is_primary`).

Start-up (:func:`initialize`, before any other JAX call): ``--coordinator HOST:PORT
--num-processes N --process-id I``, or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (what ``python -m stimage_jax.launch`` sets), or
``--coordinator auto``: JAX's cluster auto-detection (SLURM, Open MPI, TPU pods, ...). On CPU
the processes talk through gloo collectives.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["DistributedConfig", "initialize", "is_primary", "is_multiprocess", "to_host", "put", "barrier",
           "broadcast_flag", "addressed_rows", "gather_json", "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID"]

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the others: all None = one process (unless the environment says otherwise)."""

    coordinator: str | None = None    # HOST:PORT of process 0, or "auto" (cluster auto-detection)
    num_processes: int | None = None
    process_id: int | None = None

    def resolved(self, env=os.environ) -> DistributedConfig:
        """Options given win; the JAX_* environment variables fill the rest."""
        def pick(value, name, kind):
            if value is not None:
                return value
            raw = env.get(name)
            if raw in (None, ""):
                return None
            try:
                return kind(raw)
            except ValueError:
                raise StimageError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from None
        return DistributedConfig(pick(self.coordinator, ENV_COORDINATOR, str),
                                 pick(self.num_processes, ENV_NUM_PROCESSES, int),
                                 pick(self.process_id, ENV_PROCESS_ID, int))

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def check(self) -> DistributedConfig:
        if not self.enabled or self.coordinator == "auto":
            return self
        if self.coordinator is None or self.num_processes is None or self.process_id is None:
            raise StimageError("multi-process training needs --coordinator HOST:PORT, --num-processes N and "
                               "--process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), "
                               "or --coordinator auto on a cluster JAX detects")
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise StimageError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise StimageError(f"--process-id must lie in [0, {self.num_processes}) (got {self.process_id})")
        return self


_STARTED: DistributedConfig | None = None


def initialize(config: DistributedConfig = DistributedConfig()) -> bool:
    """Join the processes described by ``config`` (and the environment); True when distributed.

    Must run before anything else touches JAX's backends. A second call with the same
    settings is a no-op (tests and the CLI may both call it).
    """
    global _STARTED
    cfg = config.resolved().check()
    if not cfg.enabled or (cfg.num_processes == 1 and cfg.coordinator != "auto"):
        return False
    if _STARTED is not None:
        if _STARTED != cfg:
            raise StimageError("JAX's distributed runtime is already initialised with other settings")
        return True
    if (os.environ.get("JAX_PLATFORMS", "") in ("", "cpu")):
        # CPU devices of several processes only reach each other through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if cfg.coordinator == "auto":
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    except (RuntimeError, ValueError) as e:
        raise StimageError(f"could not join the other processes ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    _STARTED = cfg
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0: the one that writes request.json, model/, logs and checkpoint metadata."""
    return jax.process_index() == 0


def _is_key(a) -> bool:
    return hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array as NumPy, on every process.

    ``np.asarray`` only works when this process addresses every shard; otherwise the
    shards are all-gathered (a collective: every process must call it at the same point).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree) -> Any:
    """:func:`to_host` on every leaf; typed PRNG keys come back as (local) key arrays."""
    def f(a):
        if _is_key(a):
            return jax.random.wrap_key_data(to_host(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        return to_host(a)
    return jax.tree.map(f, tree)


def put(tree, sharding) -> Any:
    """Place host-identical values (NumPy or local arrays, the same on every process) on
    ``sharding``, which may span other processes' devices: each process fills the shards it
    addresses from its own copy. Typed PRNG keys keep their type."""
    def f(a):
        if _is_key(a):
            data = put(jax.random.key_data(a), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a if a.sharding == sharding else jax.device_put(a, sharding)
        if sharding.is_fully_addressable:
            return jax.device_put(a, sharding)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(f, tree)


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op with one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_flag(value: bool) -> bool:
    """Process 0's ``value`` on every process."""
    if not is_multiprocess():
        return bool(value)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def addressed_rows(sharding, shape: tuple) -> list[np.ndarray]:
    """The batch rows this process's devices hold of an array of ``shape`` on ``sharding``:
    for ``(M, B, ...)`` one sorted row array (along B) per member m (empty: none here); for
    ``(B,)`` a one-element list."""
    shape = tuple(int(d) for d in shape)
    lead = len(shape) > 1
    held: list[set] = [set() for _ in range(shape[0] if lead else 1)]
    for idx in sharding.addressable_devices_indices_map(shape).values():
        members = range(shape[0])[idx[0]] if lead else [0]
        batch_rows = range(shape[1] if lead else shape[0])[idx[1] if lead else idx[0]]
        for m in members:
            held[m].update(batch_rows)
    return [np.asarray(sorted(h), np.int64) for h in held]


def gather_json(value) -> list:
    """Every process's JSON-able ``value``, in process order, on every process (a collective);
    ``[value]`` with one process. Used for per-process reader states in checkpoints, whose
    metadata process 0 alone writes."""
    import json

    if not is_multiprocess():
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(rows[i, :sizes[i]].tobytes().decode()) for i in range(len(sizes))]
