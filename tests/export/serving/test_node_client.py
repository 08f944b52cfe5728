"""Another language as the server's client: export/node/serve_client.js (plain Node, binary
tensors) gets the numbers export.predict computes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .test_serving import _close, _expected

pytestmark = [pytest.mark.real_data]
CLIENT = Path(__file__).resolve().parents[3] / "export" / "node" / "serve_client.js"


def test_node_client_gets_means_and_uncertainties(server, exported, c6_tiles, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed on this machine")
    tiles = c6_tiles[20:26]
    (tmp_path / "t.u8").write_bytes(tiles.tobytes())
    proc = subprocess.run([node, str(CLIENT), f"http://{server.url}", "her2st", str(tmp_path / "t.u8"), "6"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    want = _expected(exported[0], tiles)
    assert len(out["genes"]) == 14 and out["model_version"] == "1"
    for n in ("mean", "var_aleatoric", "var_epistemic", "q_lo", "q_hi"):
        _close(np.asarray(out[n], np.float32), want[n], n, want["mean"] if n == "var_epistemic" else None)
    proc = subprocess.run([node, str(CLIENT), f"http://{server.url}", "nope", str(tmp_path / "t.u8"), "6"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown model" in proc.stderr
