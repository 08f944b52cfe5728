"""Fixtures: a tiny ensemble trained on real HER2ST C6, exported to a Triton repository, and
the server started on a free loopback port in a subprocess (stopped with SIGTERM)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.export._process import stop_process

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="package")
def her2st_c6(her2st_root):
    from data_pipelines.slides import read_her2st

    return read_her2st(her2st_root, "C6")


@pytest.fixture(scope="package")
def c6_tiles(her2st_c6):
    from data_pipelines.tiles import spot_tiles

    return np.ascontiguousarray(spot_tiles(her2st_c6, tile_px=32, progress=False))


@pytest.fixture(scope="package")
def exported(her2st_c6, tmp_path_factory):
    """(plain .onnx, Triton repository) of a 2-member tiny-backbone ensemble trained on C6;
    the repository also holds a model that cannot load."""
    from data_pipelines.io import write_h5ad
    from stimage_jax.cli import main

    tmp = tmp_path_factory.mktemp("serving")
    write_h5ad(her2st_c6, tmp / "C6.h5ad")
    assert main(["train", "--quiet", "--data", str(tmp / "C6.h5ad"), "--genes", "markers", "--backbone", "tiny",
                 "--tile-px", "32", "--members", "2", "--max-epochs", "1", "--workdir", str(tmp / "wd")]) == 0
    repo = tmp / "repo"
    assert main(["export-onnx", "--model", str(tmp / "wd"), "--out", str(tmp / "m.onnx"),
                 "--triton-repo", str(repo), "--name", "her2st"]) == 0
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return tmp / "m.onnx", repo


class Server:
    def __init__(self, repo, *extra, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "export.serving", "--repo", str(repo), "--port", "0",
                                      *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.log = []
        end = time.monotonic() + 60
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            self.log.append(line)
            if line.startswith("serving "):
                self.url = line.split(" on ")[1].split()[0].removeprefix("http://")
                self.grpc_url = line.split("gRPC on ")[1].strip() if "gRPC on " in line else None
                break
        else:
            raise AssertionError("server did not start")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int:
        return stop_process(self.proc)


@pytest.fixture(scope="package")
def server(exported):
    s = Server(exported[1], "--max-body-mb", "1", "--max-delay-us", "5000", "--grpc-port", "0")
    yield s
    assert s.stop() == 0
