"""data_pipelines.io: output modes follow the umask, outputs never equal inputs, atomic
folders never share a build folder, and a workdir is held by one process at a time."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_pipelines.errors import StimageError
from data_pipelines.io import (
    LOCK_NAME, atomic_dir, atomic_path, check_distinct, check_writable, workdir_lock, write_h5ad,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda m: os.umask(m)
    os.umask(saved)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_outputs_get_the_mode_plain_open_and_mkdir_give(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")            # what open() gives: the reference
    (tmp_path / "plain_dir").mkdir()  # what mkdir gives
    with atomic_path(tmp_path / "a.csv") as tmp:
        tmp.write_text("1,2\n")
    assert _mode(tmp_path / "a.csv") == _mode(plain) == 0o666 & ~mask
    with atomic_dir(tmp_path / "model") as d:
        (d / "w.json").write_text("{}")
    assert _mode(tmp_path / "model") == _mode(tmp_path / "plain_dir") == 0o777 & ~mask
    assert _mode(tmp_path / "model" / "w.json") == 0o666 & ~mask


def test_write_h5ad_mode_and_content(tmp_path, umask):
    import anndata as ad
    import numpy as np

    umask(0o022)
    a = ad.AnnData(np.arange(6, dtype=np.float32).reshape(2, 3))
    out = write_h5ad(a, tmp_path / "a.h5ad")
    assert _mode(out) == 0o644
    np.testing.assert_array_equal(ad.read_h5ad(out).X, a.X)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad"]  # no temporary left


def test_atomic_path_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_check_distinct_same_path_symlink_and_hard_link(tmp_path, monkeypatch):
    src = tmp_path / "in.h5ad"
    src.write_text("data")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.h5ad").symlink_to(src)
    os.link(src, tmp_path / "hard.h5ad")
    for out in (src, Path("in.h5ad"), tmp_path / "sub" / ".." / "in.h5ad", tmp_path / "link.h5ad",
                tmp_path / "hard.h5ad"):
        with pytest.raises(StimageError, match=r"output .* is also an input; choose another --out"):
            check_distinct(out, tmp_path / "other.h5ad", src)
    assert check_distinct(tmp_path / "new.h5ad", src, None) == tmp_path / "new.h5ad"


def test_check_writable(tmp_path):
    src = tmp_path / "in.h5ad"
    src.write_text("data")
    with pytest.raises(StimageError, match="is also an input"):
        check_writable(src, overwrite=True, inputs=[src])  # --overwrite would replace the input
    assert src.read_text() == "data"
    with pytest.raises(StimageError, match="already exists"):
        check_writable(src, overwrite=False)
    assert check_writable(src, overwrite=True) == src
    with pytest.raises(StimageError, match="is a folder"):
        check_writable(tmp_path, overwrite=True)
    deep = tmp_path / "a" / "b" / "out.csv"
    assert check_writable(deep, overwrite=False) == deep and deep.parent.is_dir()


def test_check_writable_folder_that_cannot_exist(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StimageError, match="cannot create the folder of output"):
        check_writable(tmp_path / "file" / "out.csv", overwrite=False)  # its folder would be a file


def test_atomic_dir_writers_build_in_separate_folders(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as a, atomic_dir(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        assert a.name.startswith(".model.") and b.name.startswith(".model.")
        (a / "who").write_text("a")
        (b / "who").write_text("b")
    # b (inner) swapped in first, then a replaced it; no temporary or old folder is left
    assert (target / "who").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_replaces_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "v").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as d:
            (d / "v").write_text("2")
            raise KeyboardInterrupt
    assert (target / "v").read_text() == "1"
    with atomic_dir(target) as d:
        (d / "v").write_text("3")
    assert (target / "v").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


_HOLDER = textwrap.dedent("""
    import sys
    from data_pipelines.io import workdir_lock
    with workdir_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_workdir_lock_second_process_gets_a_clear_error(tmp_path):
    wd = tmp_path / "runs" / "w"  # created by the holder
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(wd)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (wd / LOCK_NAME).read_text().strip() == str(holder.pid)
        with pytest.raises(StimageError) as e:
            with workdir_lock(wd):
                pytest.fail("entered a workdir another process holds")
        assert str(e.value) == (f"workdir {wd} is in use by another stimage process (pid {holder.pid}); "
                                "wait for it or use another --workdir")
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    with workdir_lock(wd) as got:  # released when the holder exits
        assert got == wd and (wd / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_workdir_lock_released_on_exception(tmp_path):
    with pytest.raises(ValueError):
        with workdir_lock(tmp_path):
            with pytest.raises(StimageError, match=f"pid {os.getpid()}"):  # flock is per open file
                with workdir_lock(tmp_path):
                    pass
            raise ValueError("inside")
    with workdir_lock(tmp_path):
        pass
