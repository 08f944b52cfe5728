"""Run one ``stimage`` (or ``python -m export.predict``) command in-process, the way a
shell would see it, and judge it against the README's promise for bad input.

A real process prints Python warnings, log records, C-library messages (libpng, libtiff,
OpenCV) and tracebacks on its stderr, so the capture here is at the file-descriptor
level plus ``sys.stdout``/``sys.stderr``; warnings are shown every time (a fresh process
would show the first of each) and logging goes through the ``basicConfig`` handler
``main`` installs, as it would from a shell. An exception escaping ``main`` is what a
process would print as a traceback (exit status 1).

The checks (:meth:`Outcome.violations`): exit status 2; stderr exactly one non-empty line,
starting ``stimage: error:``; no ``Traceback``; no new file anywhere under the watched
folders (so neither the output nor a temporary sibling of it); every input byte-identical.
A *tolerant* case (a bit flip that may leave a file valid, a valid but odd input) may
also succeed (exit 0); a non-zero exit must still be the clean one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import io
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

__all__ = ["Case", "Outcome", "Worker", "pin_hypothesis", "run_case", "snapshot", "tree_hashes"]

ERROR_PREFIX = "stimage: error:"


@dataclasses.dataclass
class Case:
    """One malformed input and the command that reads it."""

    family: str                     # generator × command, e.g. "h5ad.truncate/predict-jax"
    argv: list[str]
    runner: str = "stimage"         # "stimage" (stimage_jax.cli.main) or "export" (export.predict.main)
    inputs: list[Path] = dataclasses.field(default_factory=list)   # files/folders that must stay byte-identical
    watch: list[Path] = dataclasses.field(default_factory=list)    # folders where no file may appear
    outputs: list[Path] = dataclasses.field(default_factory=list)  # paths that must not exist afterwards
    strict: bool = True             # False: exit 0 is acceptable (the input may still be valid)
    how: str = ""                   # how the input was made (the reproducer)
    same_as: tuple[Path, Path] | None = None  # (output, reference): on exit 0 the output's X must equal it
    allowed_new: list[str] = dataclasses.field(default_factory=list)  # fnmatch patterns of documented caches
    accept: tuple[int, ...] = (0,)  # exit codes a tolerant case may end with (cohort: 1 = some slide failed)
    confine: Path | None = None     # every new file, whatever the exit, must lie under this folder

    def command(self) -> str:
        head = "stimage" if self.runner == "stimage" else "python -m export.predict"
        return " ".join([head, *self.argv])


@dataclasses.dataclass
class Outcome:
    case: Case
    code: int
    stdout: str
    stderr: str
    seconds: float
    traceback: str | None = None        # last line of the traceback, when one escaped
    new_files: list[str] = dataclasses.field(default_factory=list)
    left_outputs: list[str] = dataclasses.field(default_factory=list)
    changed_inputs: list[str] = dataclasses.field(default_factory=list)
    different_result: str | None = None  # exit 0 with a result that differs from the pristine input's

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    @property
    def partial(self) -> bool:
        """Something was written although the command failed."""
        accepted = self.code == 0 or (not self.case.strict and self.code in self.case.accept)
        return not accepted and bool(self.new_files or self.left_outputs)

    @property
    def escaped(self) -> list[str]:
        """New files outside ``case.confine`` (e.g. a path-like id or gene name escaping --out)."""
        if self.case.confine is None:
            return []
        root = str(Path(self.case.confine).resolve()) + os.sep
        return [p for p in self.new_files if not str(Path(p).resolve()).startswith(root)]

    def violations(self) -> list[str]:
        v = []
        if self.code in (-1000, -1001):  # Worker.HANG, Worker.CRASH
            v.append(self.traceback)
        elif self.traceback is not None or "Traceback" in self.stderr or "Traceback" in self.stdout:
            v.append(f"traceback: {self.traceback or '(printed)'}")
        if self.changed_inputs:
            v.append(f"inputs modified: {self.changed_inputs}")
        if self.different_result:
            v.append(f"silently different result: {self.different_result}")
        if self.escaped:
            v.append(f"wrote outside its output folder: {self.escaped[:3]}")
        if not self.case.strict and self.code in self.case.accept:
            return v
        if self.code != 2:
            v.append(f"exit status {self.code} (expected 2)")
        lines = self.error_lines
        if len(lines) != 1 or not lines[0].startswith(ERROR_PREFIX):
            v.append(f"stderr is not one '{ERROR_PREFIX}' line: {lines[:4]!r}")
        if self.partial:
            v.append(f"output left behind: {sorted(self.new_files + self.left_outputs)[:5]}")
        return v

    def report(self) -> str:
        return (f"[{self.case.family}] {self.case.command()}\n  input: {self.case.how}\n  exit {self.code}; "
                f"stderr {self.error_lines[-3:]!r}\n  violations: {self.violations()}")


def pin_hypothesis() -> None:
    """Make generation depend only on the generators and the seed: Hypothesis (>= 6.13x) also
    draws "local constants" harvested from the project's own modules, so any library edit
    would change the examples; and it keeps a storage folder (constants, unicode tables),
    which goes to the temporary folder instead of the repository."""
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                          str(Path(tempfile.gettempdir()) / "stimage-reliability-hypothesis"))
    try:
        from hypothesis.internal.conjecture import providers

        empty = providers.Constants()
        providers._get_local_constants = lambda: empty
    except (ImportError, AttributeError, TypeError):  # another Hypothesis: generation still derandomised
        pass


def _file_hash(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(paths) -> dict[str, str]:
    """sha256 of every file at or under ``paths`` (folders recursively); missing → "absent"."""
    out = {}
    for p in map(Path, paths):
        if p.is_file():
            out[str(p)] = _file_hash(p)
        elif p.is_dir():
            for q in sorted(p.rglob("*")):
                if q.is_file() and q.name != ".lock":  # the workdir lock file is rewritten by design
                    out[str(q)] = _file_hash(q)
        else:
            out[str(p)] = "absent"
    return out


def snapshot(folders) -> set[str]:
    """Every path (files and folders) under ``folders``."""
    out = set()
    for d in map(Path, folders):
        if d.is_dir():
            out.update(str(q) for q in d.rglob("*"))
    return out


@contextlib.contextmanager
def _captured():
    """Capture fd 1/2 (C libraries) and sys.stdout/sys.stderr (Python) into ``box``."""
    box: dict[str, str] = {}
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]  # noqa: SIM115 — closed in finally
    saved = [os.dup(1), os.dup(2)]
    py_out, py_err = io.StringIO(), io.StringIO()
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    try:
        with contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_err):
            yield box
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        fd_text = []
        for f in files:
            f.seek(0)
            fd_text.append(f.read().decode("utf-8", "replace"))
            f.close()
        box["stdout"] = py_out.getvalue() + fd_text[0]
        box["stderr"] = py_err.getvalue() + fd_text[1]


@contextlib.contextmanager
def _as_a_process():
    """Python's default warning filters (DeprecationWarning, PendingDeprecationWarning,
    ImportWarning and ResourceWarning ignored), every other warning printed to the
    current stderr as a fresh process would print its first one; the root logger bare, so
    the ``basicConfig`` in ``main`` installs its stderr handler as in a fresh process."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.simplefilter("always")
            for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=cat)
            warnings.showwarning = show
            yield
    finally:
        for h in root.handlers:
            with contextlib.suppress(Exception):
                h.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)


def _main(runner: str):
    if runner == "export":
        from export.predict import main
    else:
        from stimage_jax.cli import main
    return main


WATCHDOG_S = 300.0  # an in-process case still running after this long ends the process with a stack dump
_watch_file = None


def _watchdog_file():
    """The process's real stderr (fd 2 is redirected while a case runs)."""
    global _watch_file
    if _watch_file is None:
        _watch_file = os.fdopen(os.dup(2), "w")
    return _watch_file


def _execute(case: Case) -> tuple[int, str, str, str | None, float]:
    """Call ``main(argv)`` in this process: (exit code, stdout, stderr, traceback's last line, seconds).

    A hang inside a C library cannot be interrupted in-process, so a watchdog
    (faulthandler) dumps every thread's stack and exits after ``WATCHDOG_S`` instead of
    letting CI hang (the experiment runs cases in a :class:`Worker` with a timeout)."""
    import faulthandler

    main = _main(case.runner)
    tb = None
    t0 = time.perf_counter()
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True, file=_watchdog_file())
    with _captured() as box, _as_a_process():
        try:
            code = main(list(case.argv))
        except SystemExit as e:  # what the process would exit with
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_tb(e.__traceback__))
                             + f"{type(e).__name__}: {e}\n")
            tb = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            code = 1
    faulthandler.cancel_dump_traceback_later()
    seconds = time.perf_counter() - t0
    return (0 if code is None else int(code)), box["stdout"], box["stderr"], tb, seconds


def run_case(case: Case, execute=_execute) -> Outcome:
    """Run ``case`` (in this process, or through ``execute``, e.g. :class:`Worker`) and
    record what a user would have seen and what changed on disk."""
    before_inputs = tree_hashes(case.inputs)
    before_files = snapshot(case.watch)
    code, stdout, stderr, tb, seconds = execute(case)
    after_files = snapshot(case.watch)
    new = sorted(after_files - before_files)
    allowed = lambda p: any(fnmatch.fnmatch(str(p), pat) for pat in case.allowed_new)
    # files only: an empty folder made for an output is harmless; a folder with a file shows that file
    new_files = [p for p in new if not Path(p).is_dir() and not allowed(p)]
    left = [str(p) for p in map(Path, case.outputs) if p.is_file() or (p.is_dir() and any(
        q.is_file() and not allowed(q) for q in p.rglob("*")))]
    after_inputs = tree_hashes(case.inputs)
    changed = sorted(k for k in set(before_inputs) | set(after_inputs) if before_inputs.get(k) != after_inputs.get(k))
    different = _compare(*case.same_as) if code == 0 and case.same_as else None
    return Outcome(case, code, stdout, stderr, seconds, tb, new_files, left, changed, different)


def _compare(out: Path, ref: Path) -> str | None:
    """None when the .h5ad ``out`` has the same genes, spots and X (to 1e-5) as ``ref``."""
    import warnings

    import anndata as ad
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = ad.read_h5ad(out), ad.read_h5ad(ref)
    if list(a.var_names) != list(b.var_names) or list(a.obs_names) != list(b.obs_names):
        return f"genes/spots differ ({list(a.var_names)[:3]} vs {list(b.var_names)[:3]})"
    xa, xb = np.asarray(a.X, np.float64), np.asarray(b.X, np.float64)
    if xa.shape != xb.shape or not np.allclose(xa, xb, rtol=1e-4, atol=1e-5, equal_nan=True):
        return f"X differs (max |diff| {np.nanmax(np.abs(xa - xb)) if xa.shape == xb.shape else 'shape'})"
    return None


def _serve(conn) -> None:
    """Worker loop: run each case received, send back what :func:`_execute` returns."""
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        conn.send(_execute(case))


class Worker:
    """Cases run in a long-lived child process (imports and JIT caches warm once), so a
    case that hangs (e.g. HDF5 looping on a corrupt file) or crashes the interpreter is
    recorded instead of stopping the run: after ``timeout`` seconds the child is killed
    and replaced. Used by ``experiments/reliability.py``; CI calls :func:`_execute` inline."""

    HANG, CRASH = -1000, -1001

    def __init__(self, timeout: float = 90.0):
        self.timeout = timeout
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def _restart(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.restarts += 1
        self._start()

    def __call__(self, case: Case):
        t0 = time.perf_counter()
        self.conn.send(case)
        if self.conn.poll(self.timeout):
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass
            code = self.proc.exitcode
            self._restart()
            return self.CRASH, "", f"(the process died: exit {code})", f"crash: exit {code}", \
                time.perf_counter() - t0
        self._restart()
        return self.HANG, "", f"(no answer in {self.timeout:.0f} s)", f"hang: no answer in {self.timeout:.0f} s", \
            time.perf_counter() - t0

    def close(self) -> None:
        self.conn.close()
        self.proc.kill()
        self.proc.join()
