"""Resumable checkpoints: one Orbax manager wrapper and one metadata format for every loop.

A checkpoint ``<dir>/<n>/`` holds two items: ``arrays`` (the train state's arrays, and
whatever else the loop keeps, e.g. the ensemble's best parameters; Orbax ``StandardSave``)
and ``meta`` (JSON, :class:`CheckpointMeta`: format version, the checkpoint's number and
what it counts, per-member histories, early-stopping state, training time). Only the latest
checkpoint is kept. A truncated or foreign checkpoint is a one-line :class:`StimageError`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines.errors import StimageError

__all__ = ["CHECKPOINT_FORMAT", "DIGEST_FILE", "CheckpointMeta", "Checkpointer", "verify_digests", "write_digests"]

CHECKPOINT_FORMAT = "stimage-jax-checkpoint/1"
DIGEST_FILE = "arrays.sha256"  # in a saved model folder; `sha256sum -c arrays.sha256` checks it too


def write_digests(folder: Path) -> None:
    """Record the sha256 of every array file under ``folder`` (``sha256sum`` format; model.json
    is left out: it is validated by content when read).

    Why: Orbax reads a damaged checkpoint with many concurrent tensorstore reads; when one
    fails the rest finish on a closed event loop and can print a traceback after the one-line
    error (a real process did, about one run in ten). Checking the files first means a damaged
    folder never reaches Orbax, and a changed file is named."""
    from data_pipelines.fingerprint import file_digest

    lines = [f"{file_digest(p)}  {p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in (DIGEST_FILE, "model.json")]
    (folder / DIGEST_FILE).write_text("\n".join(lines) + "\n")


def verify_digests(folder: Path) -> None:
    """Raise a one-line :class:`StimageError` naming the first array file of ``folder`` that is
    missing or differs from :func:`write_digests`'s record. Folders saved before records were
    kept (no ``arrays.sha256``) pass unchecked."""
    from data_pipelines.fingerprint import file_digest

    record = folder / DIGEST_FILE
    if not record.exists():
        return
    fix = "retrain or restore the folder"
    try:
        rows = [line.split("  ", 1) for line in record.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, UnicodeDecodeError) as e:
        raise StimageError(f"{record} cannot be read ({type(e).__name__}); {fix}") from None
    if not rows or any(len(r) != 2 or len(r[0]) != 64 or r[1].startswith("/") or ".." in r[1].split("/")
                       for r in rows):
        raise StimageError(f"{record} is corrupt (expected lines '<sha256>  <file>'); {fix}")
    for digest, name in rows:
        f = folder / name
        if not f.is_file():
            raise StimageError(f"model file {f} is missing; {fix}")
        try:
            got = file_digest(f)
        except OSError as e:
            raise StimageError(f"model file {f} cannot be read ({type(e).__name__}); {fix}") from None
        if got != digest:
            raise StimageError(f"model file {f} has changed since the model was saved; {fix}")


@dataclasses.dataclass
class CheckpointMeta:
    """Everything but the arrays that a loop needs to resume exactly where it stopped.

    step: the checkpoint's number, counted in ``unit`` ("epoch": epochs finished, the
    ensemble; "step": optimiser steps finished, the cell network).
    histories: one list of records (dicts of numbers) per member, e.g.
    ``{"epoch", "train_loss", "val_loss"}`` per epoch.
    early_stopping: per-member lists ``best_val``, ``bad_epochs``, ``done`` (empty when the
    loop does not stop early).
    elapsed_s: training time summed over every run so far (time budgets).
    data_state: where the input pipeline stands, for loops that checkpoint mid-epoch (empty
    otherwise): e.g. the epoch, the batch within it, partial loss sums and each grain
    iterator's ``get_state()`` JSON — stored in the same Orbax checkpoint as the arrays, so
    the two can never disagree.
    """

    step: int
    unit: str = "epoch"
    histories: list[list[dict]] = dataclasses.field(default_factory=list)
    early_stopping: dict[str, list] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0
    format: str = CHECKPOINT_FORMAT
    data_state: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CheckpointMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _global(a) -> bool:
    """An array spread over several processes' devices: Orbax writes (and reads) each
    process's shards itself, so it is handed over as it is, never gathered to one host."""
    return isinstance(a, jax.Array) and not a.is_fully_addressable


def _host(tree):
    """Arrays as NumPy (typed PRNG keys and multi-process arrays stay as they are: Orbax
    stores those itself)."""
    return jax.tree.map(lambda a: a if _global(a) or jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                        else np.asarray(a), tree)


def _target(tree):
    """Restore target: NumPy, except multi-process arrays, restored straight into their
    sharding (each process reads its own shards)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) if _global(a)
                        else (a if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else np.asarray(a)), tree)


def _like(got, like):
    """Restored leaves placed as the leaves of ``like`` (same device/sharding)."""
    def f(new, old):
        if isinstance(old, jax.Array):
            return jax.device_put(new, old.sharding)
        return new
    return jax.tree.map(f, got, like)


class Checkpointer:
    """The latest checkpoint of one loop in ``directory`` (created on first save).

    ``restore(like)`` → ``(arrays, meta)`` or None when there is none; ``save(n, arrays,
    meta)`` writes checkpoint ``n`` (nothing when ``n`` is already the latest) and waits
    for it. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, directory: str | Path, *, unit: str = "epoch"):
        self.directory = Path(directory).absolute()
        self.unit = unit
        self._mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, like: Any) -> tuple[Any, CheckpointMeta] | None:
        """The latest checkpoint's arrays (structured, placed and typed as ``like``) and meta."""
        step = self.latest_step()
        if step is None:
            return None
        where = f"checkpoint {self.directory} step {step}"
        if not (self.directory / str(step) / "meta").is_dir():
            raise StimageError(f"{where} was written by an earlier version of stimage-jax (no metadata); "
                               "delete it to retrain")
        try:
            got = self._mngr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(_target(like)),
                                                                   meta=ocp.args.JsonRestore()))
            meta = CheckpointMeta.from_json(got["meta"])
        except Exception as e:  # orbax raises many types for truncated files
            raise StimageError(f"{where} is unreadable ({type(e).__name__}); delete it to retrain") from None
        if meta.format != CHECKPOINT_FORMAT or meta.unit != self.unit or meta.step != step:
            raise StimageError(f"{where} has format {meta.format!r} counting {meta.unit!r}s, expected "
                               f"{CHECKPOINT_FORMAT!r} counting {self.unit!r}s; delete it to retrain")
        # Orbax returns the stored shapes whatever the target's: another architecture must not pass.
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["arrays"]), jax.tree.leaves(like)):
            if np.shape(a) != np.shape(b):
                raise StimageError(f"{where} holds {jax.tree_util.keystr(path)} of shape {np.shape(a)}, this run "
                                   f"has {np.shape(b)} (another model?); delete it to retrain")
        return _like(got["arrays"], like), meta

    def save(self, step: int, arrays: Any, meta: CheckpointMeta) -> bool:
        """Write checkpoint ``step`` unless it is already the latest; True when written."""
        if self.latest_step() == step:
            return False
        if meta.step != step or meta.unit != self.unit:
            raise ValueError(f"meta counts {meta.step} {meta.unit}s, saving {step} {self.unit}s")
        self._mngr.save(step, force=True, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(_host(arrays)), meta=ocp.args.JsonSave(_json_safe(meta.to_json()))))
        self._mngr.wait_until_finished()
        return True

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_safe(obj):
    """NumPy scalars → Python numbers (floats, NaN and infinities kept as JSON allows)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    return obj
