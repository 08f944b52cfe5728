"""``stimage view`` / ``python -m export.viewer``: bad input is one error line (exit 2) before
anything is served, and a training workdir is served in-process (JAX) with the numbers the
exported model gives."""

from __future__ import annotations

import socket
import sys

import pytest

from export.viewer.__main__ import main as viewer_main
from stimage_jax.cli import main as stimage_main
from tests.export.viewer.conftest import Viewer


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line(tmp_path, capsys):
    data = tmp_path / "x.h5ad"
    data.write_bytes(b"not read")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert stimage_main(["view", "--model", str(bad), "--data", str(data), "--host", "0.0.0.0"]) == 2
    assert "is not a loopback address" in _one_line(capsys)
    assert viewer_main(["--model", str(bad), "--data", str(data)]) == 2
    assert "is not an ONNX model onnxruntime can run" in _one_line(capsys)
    assert viewer_main(["--model", str(tmp_path / "missing.onnx"), "--data", str(data)]) == 2
    assert "not found" in _one_line(capsys)
    assert viewer_main(["--model", str(tmp_path), "--data", str(data)]) == 2
    assert "use stimage view" in _one_line(capsys)
    assert viewer_main(["--model", str(bad), "--data", str(data), "--port", "70000"]) == 2
    assert "--port" in _one_line(capsys)
    assert viewer_main(["--model", str(bad)]) == 2  # neither --data nor --slide
    _one_line(capsys)


@pytest.mark.real_data
def test_port_in_use_is_one_line(c6_model, capsys):
    data, model = c6_model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert viewer_main(["--quiet", "--model", str(model), "--data", str(data), "--port", str(port),
                            "--cache", str(model.parent / "cli-cache")]) == 2
    assert "cannot listen on 127.0.0.1" in _one_line(capsys)


@pytest.mark.real_data
def test_stimage_view_serves_a_training_workdir(c6_model, tmp_path):
    """The workdir's JAX model, served in-process, predicts what its ONNX export predicts."""
    import subprocess

    data, model = c6_model
    onnx = Viewer("--model", model, "--data", data, "--cache", tmp_path / "o")
    try:
        onnx.wait_ready()
        want = onnx.get("/api/spot?id=C6_10x15&gene=CD74")[1]
    finally:
        onnx.stop()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from stimage_jax.cli import main; sys.exit(main())",
                             "--quiet", "view", "--model",
                             str(model.parent / "wd"), "--data", str(data), "--port", "0", "--cache",
                             str(tmp_path / "j")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    v = Viewer.__new__(Viewer)
    v.proc = proc
    line = proc.stdout.readline()
    assert line.startswith("viewing C6 with wd on "), line + proc.stderr.read()[-2000:]
    v.url = line.split(" on ")[1].split()[0].rstrip("/")
    try:
        assert v.wait_ready()["state"] == "ready"
        got = v.get("/api/spot?id=C6_10x15&gene=CD74")[1]
        for k in ("mean", "var_aleatoric", "var_epistemic"):
            assert got[k] == pytest.approx(want[k], rel=1e-4), k
        assert (tmp_path / "j").is_dir()
    finally:
        v.stop()
