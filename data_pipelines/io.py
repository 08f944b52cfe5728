"""Atomic output: write to a temporary sibling, then rename; one process per workdir.

A crash or Ctrl-C never leaves a half-written file under the final name, an existing
output is refused unless the caller passes ``overwrite=True``, an output that is also an
input is refused always, and outputs get the permissions a plain ``open()`` /
``mkdir()`` would give (``mkstemp``/``mkdtemp`` alone would leave them private, 0600/0700).
NumPy-free and JAX-free: the ONNX runtime writes through it too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_pipelines.errors import StimageError

__all__ = ["quiet_stderr", "atomic_path", "atomic_dir", "check_writable", "check_distinct", "check_new_output", "write_h5ad", "workdir_lock",
           "file_mode", "dir_mode", "LOCK_NAME"]

LOCK_NAME = ".lock"  # workdir_lock's file inside the workdir


def _umask() -> int:
    """The process umask. Read from /proc (Linux ≥ 4.7) because the only portable query,
    ``os.umask``, has to set it, and another thread could create a file in between."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permission bits ``open(path, "w")`` gives a new file: 0o666 & ~umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Permission bits ``os.mkdir`` gives a new folder: 0o777 & ~umask."""
    return 0o777 & ~_umask()


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def check_distinct(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse an output that is one of ``inputs`` (same resolved path, or the same file by
    inode when both exist): with ``--overwrite`` it would replace the input. ``None``
    inputs are ignored. Returns ``out`` as a Path."""
    out = Path(out)
    for i in inputs:
        if i is not None and _same(out, Path(i)):
            raise StimageError(f"output {out} is also an input; choose another --out")
    return out


def check_writable(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check that the file ``path`` can be written, before any work: not one of ``inputs``,
    not an existing file unless ``overwrite``, not a folder, and in a folder we may write
    to (created here when missing). Returns ``path`` as a Path."""
    path = check_distinct(path, *inputs)
    if path.is_dir():
        raise StimageError(f"output {path} is a folder; give a file name")
    return check_new_output(path, overwrite)


def check_new_output(path: Path, overwrite: bool) -> Path:
    """The checks every output shares, file or folder: not existing unless ``overwrite``,
    its parent folder created when missing and writable. Returns ``path``."""
    if path.exists() and not overwrite:
        raise StimageError(f"output {path} already exists (pass --overwrite to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StimageError(f"cannot create the folder of output {path} ({e.strerror or type(e).__name__})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StimageError(f"cannot write output {path}: folder {path.parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success with the
    mode a plain ``open()`` gives a new file (0o666 & ~umask)."""
    path = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # mkstemp made it 0600; the writer may also have replaced it
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_h5ad(adata, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``adata`` atomically (compressed) and return the final path; scanpy/squidpy-ready
    (images, scale factors, image paths relative to the file: :func:`data_pipelines.scverse.scverse_ready`)."""
    from data_pipelines.scverse import scverse_ready

    with atomic_path(path, overwrite=overwrite) as tmp, scverse_ready(adata, path) as ready:
        ready.write_h5ad(tmp, compression="gzip")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a unique hidden sibling (``.<name>.XXXX.tmp``), then swap it onto
    ``path`` (an existing folder there is replaced); on error the temporary folder is removed.

    The sibling is unique per call, so two writers never build in the same folder; the
    folder gets 0o777 & ~umask, as ``mkdir`` would give. The old folder is renamed aside
    before the new one moves in and deleted after, so a crash mid-swap loses nothing.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except OSError:
        if old is not None and not path.exists():
            os.replace(old / path.name, path)  # put the previous folder back
            old.rmdir()
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``workdir`` (created if missing) for the ``with`` block.

    A non-blocking ``fcntl.flock`` on ``workdir/.lock``; the holder's pid is written into
    the file so a second process can name it. The kernel drops the lock when the file is
    closed — on exit, on an exception, or when the holder dies — so a stale ``.lock``
    never blocks anyone. Yields the workdir.
    """
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise StimageError(f"cannot lock workdir {workdir} ({e.strerror or type(e).__name__})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StimageError(f"cannot lock workdir {workdir} ({e.strerror})") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StimageError(f"workdir {workdir} is in use by another stimage process (pid {holder}); "
                               "wait for it or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield workdir
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 while a C library decodes a file: libpng and libtiff print
    their own complaints ("libpng error: IDAT: incorrect data check") straight to stderr,
    besides the one error line we print for the same failure."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
