"""Serving throughput, latency, soak and fuzz (issue 14): one JSON line.

Loads a Triton-layout repository (``stimage export-onnx --triton-repo``), starts
``python -m export.serving`` on a free 127.0.0.1 port (batching on, then ``--no-batching``) and
drives it from this process with asyncio ``tritonclient.http.aio`` clients, each sending one
real HER2ST C6 tile per request (binary tensors, outputs mean/var_aleatoric/var_epistemic):

- ``offline_tiles_s``: onnxruntime alone on the serving graph at the server's max batch size;
- ``served``: for 1, 4, 16, 64 concurrent clients, tiles/s and p50/p99 latency (ms), each
  level for ``--seconds``; ``ratio_16`` = served tiles/s at 16 clients / offline (target ≥ 0.8);
- ``soak``: ``--soak-s`` seconds at 16 clients (batching on): requests, errors, server RSS at
  the start and end (MiB);
- ``fuzz``: ``--fuzz`` malformed requests (mutated binary headers, truncated or padded bodies,
  wrong dtypes/shapes, garbage JSON): count of 4xx, 5xx (target 0), and readiness after.

Every request goes to 127.0.0.1 only; every loop is bounded in count and time. Clients share
the server's 2 cores, so served figures include the client's own cost. CPU flags
(avx512/vnni/amx) from /proc/cpuinfo are reported with the figures.

Usage: python experiments/benchmarks/serve.py --repo REPO [--name her2st] [--seconds 10] [--soak-s 120] [--fuzz 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import cpu_flags  # noqa: E402  (this directory is on sys.path)

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ("mean", "var_aleatoric", "var_epistemic")




def tiles_for(px: int, n: int) -> np.ndarray:
    from data_pipelines.slides import read_her2st
    from data_pipelines.tiles import spot_tiles

    shared = Path(os.environ.get("STIMAGE_SHARED", ROOT.parent / "shared"))
    t = np.asarray(spot_tiles(read_her2st(shared / "data" / "her2st", "C6"), tile_px=px, progress=False))
    return np.ascontiguousarray(np.resize(t, (n, *t.shape[1:])))


def start_server(repo: Path, *extra) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "export.serving", "--repo", str(repo), "--port", "0", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("server exited")
        if line.startswith("serving "):
            return proc, line.split(" on ")[1].split()[0].removeprefix("http://")
    proc.kill()
    raise SystemExit("server did not start")


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, name: str, tiles: np.ndarray, clients: int, seconds: float, max_requests: int = 200_000):
    """``clients`` concurrent loops, one tile per request, for ``seconds`` (and at most max_requests)."""
    import tritonclient.http.aio as aio

    lat, errors, sent = [], 0, 0
    end = time.perf_counter() + seconds

    async def one(k: int):
        nonlocal errors, sent
        c = aio.InferenceServerClient(url, conn_limit=1)
        outs = [aio.InferRequestedOutput(n, binary_data=True) for n in OUTPUTS]
        try:
            i = k
            while time.perf_counter() < end and sent < max_requests:
                sent += 1
                t = tiles[i % len(tiles)][None]
                inp = aio.InferInput("tiles", list(t.shape), "UINT8")
                inp.set_data_from_numpy(t, binary_data=True)
                s = time.perf_counter()
                try:
                    r = await c.infer(name, [inp], outputs=outs)
                    r.as_numpy("mean")
                    lat.append(time.perf_counter() - s)
                except Exception:  # noqa: BLE001 - counted
                    errors += 1
                i += clients
        finally:
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    lat_ms = np.asarray(lat) * 1e3
    return {"clients": clients, "tiles_s": round(len(lat) / wall, 1), "requests": len(lat), "errors": errors,
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 2) if len(lat) else None}


def malformed(rng: random.Random, tile: np.ndarray, px: int) -> tuple[bytes, dict]:
    blob = tile.tobytes()
    header = {"inputs": [{"name": "tiles", "datatype": "UINT8", "shape": [1, px, px, 3],
                          "parameters": {"binary_data_size": len(blob)}}]}
    kind = rng.randrange(8)
    if kind == 0:  # a random field of the header replaced
        inp = header["inputs"][0]
        key = rng.choice(["name", "datatype", "shape", "parameters"])
        inp[key] = rng.choice([None, 7, "x", [], {}, [1, -1], [2 ** 40], {"binary_data_size": -3}, "FP64", [1, 2]])
    elif kind == 1:
        header = rng.choice([[], 3, "str", None, {"inputs": None}, {"inputs": [None]}, {"outputs": [{"name": 1}]}])
    js = json.dumps(header).encode()
    body = js + blob
    hdr = {"Inference-Header-Content-Length": str(len(js))}
    if kind == 2:  # bytes flipped anywhere in the body
        b = bytearray(body)
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        body = bytes(b)
    elif kind == 3:
        body = body[:rng.randrange(len(body))]
    elif kind == 4:
        body = body + os.urandom(rng.randint(1, 500))
    elif kind == 5:
        hdr["Inference-Header-Content-Length"] = rng.choice(["-1", "abc", str(len(body) + 5), "0", "1e3", ""])
    elif kind == 6:
        hdr = {}
    elif kind == 7:
        body = os.urandom(rng.randint(0, 4096))
    return body, hdr


async def fuzz(url: str, name: str, tile: np.ndarray, px: int, n: int, seed: int = 0) -> dict:
    import aiohttp

    rng = random.Random(seed)
    counts = {"2xx": 0, "4xx": 0, "5xx": 0, "conn_errors": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        for _ in range(n):
            body, hdr = malformed(rng, tile, px)
            try:
                async with s.post(f"http://{url}/v2/models/{name}/infer", data=body, headers=hdr) as r:
                    await r.read()
                    counts[f"{r.status // 100}xx"] = counts.get(f"{r.status // 100}xx", 0) + 1
            except aiohttp.ClientError:
                counts["conn_errors"] += 1
        async with s.get(f"http://{url}/v2/health/ready") as r:
            counts["ready_after"] = r.status == 200
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--name", default="her2st")
    ap.add_argument("--seconds", type=float, default=10.0, help="per concurrency level (default 10)")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--soak-s", type=float, default=120.0)
    ap.add_argument("--fuzz", type=int, default=1000)
    a = ap.parse_args()
    a.repo = a.repo.resolve()  # the server runs from the project root

    import onnxruntime as ort

    from export.serving.model import Repository

    model = Repository.load(a.repo).get(a.name)
    if model is None:
        raise SystemExit(f"no model {a.name!r} in {a.repo}")
    px, mbs = model.tile_px, model.max_batch_size
    tiles = tiles_for(px, max(mbs, 64))
    sess = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    sess.run(list(OUTPUTS), {"tiles": tiles[:mbs]})
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 3:
        sess.run(list(OUTPUTS), {"tiles": tiles[:mbs]})
        reps += 1
    offline = reps * mbs / (time.perf_counter() - t0)
    del sess
    levels = [int(x) for x in a.levels.split(",")]
    result = {"bench": "serve", "model": a.name, "tile_px": px, "members": model.members, "genes": len(model.genes),
              "backbone": model.meta.get("backbone"), "max_batch_size": mbs, "max_delay_us": model.max_delay_us,
              **cpu_flags(), "offline_tiles_s": round(offline, 1), "served": {}}
    for mode, extra in (("batching", ()), ("no_batching", ("--no-batching",))):
        proc, url = start_server(a.repo, *extra)
        try:
            asyncio.run(load(url, a.name, tiles, 4, 1.0))  # warm-up
            result["served"][mode] = [asyncio.run(load(url, a.name, tiles, c, a.seconds)) for c in levels]
            if mode == "batching":
                rss0 = rss_mib(proc.pid)
                soak = asyncio.run(load(url, a.name, tiles, 16, a.soak_s))
                result["soak"] = {"seconds": a.soak_s, "requests": soak["requests"], "errors": soak["errors"],
                                  "rss_start_mib": round(rss0, 1), "rss_end_mib": round(rss_mib(proc.pid), 1)}
                result["fuzz"] = {"requests": a.fuzz, **asyncio.run(fuzz(url, a.name, tiles[0], px, a.fuzz))}
        finally:
            proc.terminate()
            proc.wait(30)
    for mode in result["served"]:
        at16 = next((r for r in result["served"][mode] if r["clients"] == 16), None)
        if at16:
            result[f"ratio_16_{mode}"] = round(at16["tiles_s"] / offline, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
