"""The open bugs the fuzz suite found (``known_bugs.KNOWN``), one strict xfail per exact
reproducer: each must keep the promise (exit 2, one ``stimage: error:`` line, no traceback,
nothing written, inputs untouched) once fixed — its XPASS then fails this test, and the
entry is removed from ``known_bugs.py`` (which also stops excusing it in ``test_fuzz.py``)."""

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
            yield pytest.param(bug, make, id=f"{bug.name}:{make.__name__}",
                               marks=pytest.mark.xfail(strict=True, reason=bug.reason))


def _run_with_timeout(case):
    """A reproducer that hangs, run as its own process (an in-process hang cannot be stopped)."""
    head = ["-m", "export.predict"] if case.runner == "export" else ["-m", "stimage_jax.cli"]
    try:
        p = subprocess.run([sys.executable, *head, *case.argv], capture_output=True, text=True,
                           timeout=HANG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer in {HANG_TIMEOUT_S} s: {case.command()}")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("stimage: error:"), p.stderr[-500:]


@pytest.mark.parametrize("bug, make", list(_params()))
def test_known_bug_reproducer(bug, make, world, tmp_path):
    case = make(world, new_case_dir(tmp_path, 1))
    if bug.hangs:
        _run_with_timeout(case)
        return
    out = run_case(case)
    assert not out.violations(), out.report()


def test_every_known_bug_has_a_reproducer_or_says_why():
    for bug in KNOWN:
        assert bug.reproducers or "progress" in bug.name, bug.name
