"""Helpers the benchmark scripts share (scripts run as files, so this directory is on sys.path)."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["her2st_paths", "timed"]


def her2st_paths(shared: str | Path, workdir: Path, sections) -> dict[str, Path]:
    """HER2ST sections read from ``shared`` once, as .h5ad under ``workdir/data``."""
    from data_pipelines.io import write_h5ad
    from data_pipelines.slides import read_her2st

    paths = {}
    for s in sections:
        p = Path(workdir) / "data" / f"{s}.h5ad"
        if not p.exists():
            write_h5ad(read_her2st(Path(shared) / "data" / "her2st", s, require_image=True), p)
        paths[s] = p
    return paths


def timed(f, reps: int) -> float:
    """Best of ``reps`` wall times after one warm-up call (first-touch allocations, thread pools)."""
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best
