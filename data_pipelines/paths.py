"""Where the shared real data live: ``$STIMAGE_SHARED``, else ``shared/`` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_dir"]


def shared_dir() -> Path:
    """The read-only data/weights folder (never copied into the repository)."""
    env = os.environ.get("STIMAGE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
