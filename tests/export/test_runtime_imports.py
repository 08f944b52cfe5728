"""The JAX-free side never reaches JAX: statically (no import statement anywhere in it, not
even a lazy one, names jax/flax/optax/orbax or the JAX package) and at run time (importing
every module of it loads none of them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JAX_SIDE = ("jax", "jaxlib", "flax", "optax", "orbax", "jax2onnx", "stimage_jax", "export.to_onnx")
# data_pipelines/augmentation.py is training-only JAX code; everything else there is NumPy.
RUNTIME_FILES = sorted([*(ROOT / "export" / "runtime").glob("*.py"), ROOT / "export" / "predict.py",
                        *(ROOT / "export" / "viewer").glob("*.py"),
                        *(ROOT / "export" / "serving").glob("*.py"),
                        *(ROOT / "export" / "cohort").glob("*.py"), *(ROOT / "export" / "clinical").glob("*.py"),
                        ROOT / "export" / "__init__.py", ROOT / "export" / "quantize.py",
                        *[p for p in (ROOT / "data_pipelines").rglob("*.py") if p.name != "augmentation.py"]])


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_import_statement_reaches_jax():
    assert len(RUNTIME_FILES) > 15
    bad = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p)
                                            if any(n == j or n.startswith(j + ".") for j in JAX_SIDE))
           for p in RUNTIME_FILES}
    assert {k: v for k, v in bad.items() if v} == {}


def test_importing_the_runtime_loads_no_jax():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in RUNTIME_FILES]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', "
            "'orbax', 'jax2onnx', 'stimage_jax'))\n"
            "print(len(sys.modules)); assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) > 100  # the imports really ran (numpy, anndata, onnxruntime, ...)
