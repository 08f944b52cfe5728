"""The documented runtime-only environment (README "Deployment with ONNX", GPU inference)
installs and predicts in a fresh venv: the README's own `pip install onnxruntime-gpu ...` line
(CPU `onnxruntime` standing in, since the two cannot share an environment), then
`pip install --no-deps -e .`, then `python -m export.predict` on an h5ad and on a slide.

No --system-site-packages: the venv sees only what the list pulls in, so a missing package
fails here. Wheels come from a wheelhouse (STIMAGE_WHEELHOUSE, default
~/.cache/stimage-jax/runtime-wheels) filled by `pip download` on the first run only: pip's
own HTTP cache is not kept on these machines, and an offline install from local wheels is
what keeps the test fast (first run ~1-2 min, later ~20 s on 2 cores).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from stimage_jax.cli import main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def documented_runtime_list() -> list[str]:
    """The packages of README's `pip install onnxruntime-gpu ...` line, GPU runtime swapped for CPU."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deployment with ONNX"):]
    section = section[:section.index("\n## ", 1)]
    line = re.search(r"^pip install (onnxruntime-gpu\b.*)$", section, re.M)
    assert line, "README 'Deployment with ONNX' lost its runtime-only `pip install onnxruntime-gpu ...` line"
    pkgs = shlex.split(line.group(1).split("#")[0])
    return ["onnxruntime" if p == "onnxruntime-gpu" else p for p in pkgs]


def _pip(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--python", python, *args, "--quiet"],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with exactly the documented list plus the project (--no-deps, editable)."""
    pkgs = documented_runtime_list()
    wheels = Path(os.environ.get("STIMAGE_WHEELHOUSE", Path.home() / ".cache" / "stimage-jax" / "runtime-wheels"))
    wheels.mkdir(parents=True, exist_ok=True)
    venv = tmp_path_factory.mktemp("ort-runtime") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    offline = ("--no-index", "--find-links", str(wheels))
    build = ("setuptools>=68",)  # the editable install's build backend, from the wheelhouse too
    proc = _pip("install", *offline, *pkgs, python=py)
    if proc.returncode != 0:  # first run (or the list changed): fill the wheelhouse, then retry offline
        dl = _pip("download", "--dest", str(wheels), "--find-links", str(wheels), *pkgs, *build)
        assert dl.returncode == 0, dl.stderr[-3000:]
        proc = _pip("install", *offline, *pkgs, python=py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _pip("install", *offline, "--no-deps", "-e", str(ROOT), python=py)
    if proc.returncode != 0 and "setuptools" in proc.stderr:
        _pip("download", "--dest", str(wheels), "--find-links", str(wheels), *build)
        proc = _pip("install", *offline, "--no-deps", "-e", str(ROOT), python=py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run([str(venv / "bin" / "python"), "-m", "export.predict", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_readme_runtime_list_is_parsed():
    pkgs = documented_runtime_list()
    assert pkgs[0] == "onnxruntime" and "anndata" in pkgs and not any(p.startswith(("jax", "flax")) for p in pkgs)


def test_runtime_only_venv_predicts_like_the_full_environment(runtime_venv, synthetic_study, make_slide, tmp_path):
    py = str(runtime_venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('jax', 'flax', 'optax') "
                                      "if u.find_spec(m)])"], capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "[]", probe.stderr  # really a runtime-only environment
    helped = _run(runtime_venv, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--model" in helped.stdout, helped.stderr[-2000:]

    wd, model = tmp_path / "wd", tmp_path / "m.onnx"
    assert main(["train", "--quiet", "--data", *map(str, synthetic_study[:2]), "--workdir", str(wd),
                 "--backbone", "tiny", "--tile-px", "32", "--members", "2", "--max-epochs", "1",
                 "--genes", "A,B,C"]) == 0
    assert main(["export-onnx", "--model", str(wd), "--out", str(model)]) == 0
    make_slide(tmp_path / "s.tif", mpp=1.0)
    for name, source in (("data", str(synthetic_study[2])), ("slide", str(tmp_path / "s.tif"))):
        ref, out = tmp_path / f"{name}_ref.h5ad", tmp_path / f"{name}_venv.h5ad"
        assert main(["predict", "--quiet", "--model", str(model), f"--{name}", source, "--out", str(ref)]) == 0
        proc = _run(runtime_venv, "--quiet", "--model", str(model), f"--{name}", source, "--out", str(out),
                    cwd=tmp_path)
        assert proc.returncode == 0, f"--{name} in the documented runtime venv:\n{proc.stderr[-3000:]}"
        a, b = ad.read_h5ad(ref), ad.read_h5ad(out)
        assert a.n_obs > 0 and list(a.obs_names) == list(b.obs_names)
        np.testing.assert_allclose(b.X, a.X, rtol=1e-5)
