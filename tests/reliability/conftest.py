"""Fixtures of the fuzz suite: the pristine inputs (a tiny trained model, its ONNX export,
a synthetic study, slides, nucleus tiles, HER2ST and Space Ranger folders), built once per
session, and a deterministic Hypothesis profile (derandomised, no deadline, no example
database) small enough for CI; ``experiments/reliability.py`` runs the same generators
for thousands of examples."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # harness, world, generators: shared with experiments/reliability.py

from harness import pin_hypothesis, tree_hashes
from world import build_world

pin_hypothesis()  # examples independent of the library's own constants; Hypothesis' files out of the repo

settings.register_profile(
    "reliability-ci", derandomize=True, deadline=None, database=None, print_blob=False,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failing case is reported whole
    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="session", autouse=True)
def _bounded_hdf5_check():
    """read_h5ad walks HDF5 metadata in a child with a time limit (default 20 s) because h5py
    can loop forever on a damaged file; 5 s bounds such a case here too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STIMAGE_HDF5_CHECK_SECONDS", os.environ.get("STIMAGE_HDF5_CHECK_SECONDS", "5"))
        yield


def _unchanged(before: dict, paths) -> None:
    after = tree_hashes(paths)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"fuzz cases modified the pristine inputs: {changed[:5]}"


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The pristine inputs (without the cell model: see ``cell_world``); checked
    byte-identical at the end of the session."""
    w = build_world(tmp_path_factory.mktemp("fuzz_world"), cells=False)
    before = tree_hashes([w.root])
    yield w
    _unchanged(before, [w.root])


@pytest.fixture(scope="session")
def cell_world(world, tmp_path_factory):
    """``world`` plus a tiny trained cell model (built on first use: it costs a JIT-compiled step)."""
    from world import build_cell_model

    world.cell_wd = build_cell_model(tmp_path_factory.mktemp("fuzz_cells") / "cell_wd", world.cells)
    before = tree_hashes([world.cell_wd])
    yield world
    _unchanged(before, [world.cell_wd])


@pytest.fixture
def case_dirs(tmp_path):
    """A counter of fresh case folders under this test's tmp_path."""
    from generators import new_case_dir

    state = {"n": 0}

    def make():
        state["n"] += 1
        return new_case_dir(tmp_path, state["n"])

    return make
