"""Shared fixtures: where the real data lives, and a tiny seeded RNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STIMAGE_SHARED", ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only ``shared/`` folder; tests needing it skip with a reason if absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} not found (set STIMAGE_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def her2st_root(shared) -> Path:
    return shared / "data" / "her2st"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
