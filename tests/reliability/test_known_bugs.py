"""The bugs the fuzz suite found (``known_bugs.KNOWN``), one test per exact reproducer: each
must keep the promise (exit 2, one ``stimage: error:`` line, no traceback, nothing written,
inputs untouched). An open bug's test is a strict xfail (its XPASS after a fix fails, and the
bug is then marked ``fixed`` in ``known_bugs.py``); a fixed bug's test is a regression test."""

from __future__ import annotations

import subprocess
import sys

import pytest
from generators import new_case_dir
from harness import run_case
from known_bugs import KNOWN

HANG_TIMEOUT_S = 8  # a fixed reader answers in ~3 s (imports) even on a loaded 2-core machine


def _params():
    for bug in KNOWN:
        for make in bug.reproducers:
            marks = () if bug.fixed else pytest.mark.xfail(strict=True, reason=bug.reason)
            yield pytest.param(bug, make, id=f"{'fixed' if bug.fixed else 'open'}:{bug.name}:{make.__name__}",
                               marks=marks)


def _run_with_timeout(case):
    """A reproducer that hangs, run as its own process (an in-process hang cannot be stopped)."""
    head = ["-m", "export.predict"] if case.runner == "export" else \
        ["-c", "import sys; from stimage_jax.cli import main; sys.exit(main(sys.argv[1:]))"]
    try:
        p = subprocess.run([sys.executable, *head, *case.argv], capture_output=True, text=True,
                           timeout=HANG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer in {HANG_TIMEOUT_S} s: {case.command()}")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("stimage: error:"), p.stderr[-500:]


@pytest.mark.parametrize("bug, make", list(_params()))
def test_known_bug_reproducer(bug, make, world, tmp_path, monkeypatch):
    for k, v in bug.env.items():
        monkeypatch.setenv(k, v)
    case = make(world, new_case_dir(tmp_path, 1))
    if bug.hangs and not bug.fixed:  # still hangs: in a child process, with a timeout
        _run_with_timeout(case)
        return
    out = run_case(case)
    assert not out.violations(), out.report()


def test_every_known_bug_has_a_reproducer_or_says_why():
    for bug in KNOWN:
        assert bug.reproducers or "progress" in bug.name, bug.name
