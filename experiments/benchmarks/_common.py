"""Helpers the benchmark scripts share (scripts run as files, so this directory is on sys.path)."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["her2st_paths", "timed", "cpu_flags"]

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


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


def timed(f, reps: int, warmup: bool = True) -> float:
    """Best of ``reps`` wall times, after one warm-up call (first-touch allocations, thread pools)
    unless ``warmup`` is False."""
    if warmup:
        f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def cpu_flags() -> dict:
    """The CPU a speed figure was measured on: model name, cores and the SIMD/matrix flags
    that change onnxruntime's and XLA's kernels (AVX2 vs AVX-512, VNNI, AMX), so figures from
    different machines are never confused."""
    import os

    flags, model = set(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), **{f: f in flags for f in FLAGS}}
