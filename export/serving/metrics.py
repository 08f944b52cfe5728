"""Prometheus text exposition (format 0.0.4) without a client library: counters and
histograms keyed by label tuples, safe to update from the event loop and worker threads."""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["Metrics", "LATENCY_BUCKETS", "BATCH_BUCKETS"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(names: tuple[str, ...], values: tuple) -> str:
    def esc(v):
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return ",".join(f'{n}="{esc(v)}"' for n, v in zip(names, values))


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)    # (model, version, protocol) -> n
        self.failures = defaultdict(int)    # (model, code) -> n
        self.tiles = defaultdict(int)       # (model, version) -> n
        self.latency = {}                   # (model, version) -> histogram of request seconds
        self.batch = {}                     # (model, version) -> histogram of batch sizes (tiles)

    def request(self, model: str, version: str, protocol: str, seconds: float, tiles: int) -> None:
        with self._lock:
            self.requests[(model, version, protocol)] += 1
            self.tiles[(model, version)] += tiles
            self.latency.setdefault((model, version), _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def failure(self, model: str, code: int) -> None:
        with self._lock:
            self.failures[(model, str(code))] += 1

    def batch_run(self, model: str, version: str, tiles: int) -> None:
        with self._lock:
            self.batch.setdefault((model, version), _Histogram(BATCH_BUCKETS)).observe(tiles)

    def render(self, ready_models: int) -> str:
        out = []
        with self._lock:
            def counter(name, help_, table, names):
                out.extend([f"# HELP {name} {help_}", f"# TYPE {name} counter"])
                out.extend(f"{name}{{{_labels(names, k)}}} {v}" for k, v in sorted(table.items()))

            def histogram(name, help_, table):
                out.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram"])
                for k, h in sorted(table.items()):
                    lab = _labels(("model", "version"), k)
                    for b, c in zip(h.buckets, h.counts):
                        out.append(f'{name}_bucket{{{lab},le="{b}"}} {c}')
                    out.append(f'{name}_bucket{{{lab},le="+Inf"}} {h.count}')
                    out.append(f"{name}_sum{{{lab}}} {h.sum}")
                    out.append(f"{name}_count{{{lab}}} {h.count}")

            counter("stimage_inference_requests_total", "Successful inference requests.", self.requests,
                    ("model", "version", "protocol"))
            counter("stimage_inference_failures_total", "Failed requests by HTTP status.", self.failures,
                    ("model", "code"))
            counter("stimage_inference_tiles_total", "Tiles inferred.", self.tiles, ("model", "version"))
            histogram("stimage_request_duration_seconds", "Inference request latency (server side).", self.latency)
            histogram("stimage_batch_size_tiles", "Tiles per onnxruntime batch.", self.batch)
        out.extend(["# HELP stimage_models_ready Model versions loaded.", "# TYPE stimage_models_ready gauge",
                    f"stimage_models_ready {ready_models}"])
        return "\n".join(out) + "\n"
