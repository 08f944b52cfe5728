"""An exported model is validated once, at load: metadata and graph must agree, and every
mismatch is one line (issue 13 item 3). Every model kind is a Predictor."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from data_pipelines.errors import StimageError
from export.runtime.onnx_model import OnnxEnsemble
from export.runtime.predictor import Predictor
from stimage_jax.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jax2onnx internals


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tests.conftest import make_sample

    tmp = tmp_path_factory.mktemp("onnx_validation")
    paths = []
    for k in range(2):
        p = tmp / f"s{k}.h5ad"
        make_sample(tmp, f"s{k}", seed=k).write_h5ad(p)
        paths.append(p)
    wd = tmp / "wd"
    assert main(["train", "--quiet", "--data", *map(str, paths), "--workdir", str(wd), "--backbone", "tiny",
                 "--tile-px", "32", "--max-epochs", "2", "--genes", "A,B,C", "--members", "2"]) == 0
    assert main(["export-onnx", "--quiet", "--model", str(wd), "--out", str(tmp / "m.onnx")]) == 0
    return wd, tmp / "m.onnx", paths


def _with_meta(src, dst, **changes):
    proto = onnx.load(src)
    meta = {p.key: p.value for p in proto.metadata_props}
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, dst)
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(genes=None), "metadata lacks genes"),
    (dict(genes="[\"A\", \"B\""), "'genes' is not valid JSON"),
    (dict(genes=json.dumps(["A", "B"])), "output 'mu' has 3 gene columns but the metadata lists 2 genes"),
    (dict(genes=json.dumps(["A", "A", "B"])), "lists a gene twice"),
    (dict(genes=json.dumps([1, 2, 3])), "non-empty list of gene names"),
    (dict(tile_px="64"), "metadata says tile_px 64"),
    (dict(tile_px="big"), "'tile_px' = 'big' is not an integer"),
    (dict(tile_um="-5"), "'tile_um' = '-5' must be positive"),
    (dict(tile_um="1e30"), "'tile_um' = '1e30' must be positive and at most 10000"),
    (dict(tile_px="99999999999999999999"), "'tile_px' = '99999999999999999999' must be positive and at most 8192"),
    (dict(provenance="{"), "'provenance' is not valid JSON"),
    (dict(members="7"), "the graph has 2 members but the metadata says 7"),
    (dict(format="other/1"), "is not a stimage model"),
])
def test_bad_metadata_is_one_line(exported, tmp_path, changes, message, capsys):
    _, onnx_path, data = exported
    bad = _with_meta(onnx_path, tmp_path / "bad.onnx", **changes)
    with pytest.raises(StimageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        OnnxEnsemble(bad)
    from export.predict import main as runtime_main

    out = tmp_path / "p.h5ad"
    assert runtime_main(["--model", str(bad), "--data", str(data[0]), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stimage: error:") and not out.exists()


def test_truncated_model_file_is_one_line(exported, tmp_path):
    _, onnx_path, _ = exported
    raw = onnx_path.read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StimageError, match="is not an ONNX model onnxruntime can run"):
        OnnxEnsemble(bad)


def test_every_model_kind_is_a_predictor(exported, tmp_path):
    from stimage_jax.models import load_model

    wd, onnx_path, data = exported
    for m in (load_model(wd), load_model(wd / "model"), load_model(onnx_path)):
        assert isinstance(m, Predictor)
        assert m.genes == ["A", "B", "C"] and m.tile_px == 32 and m.task == "regress"
    jax_model, onnx_model = load_model(wd), load_model(onnx_path)
    tiles = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    a, b = jax_model.params(tiles), onnx_model.params(tiles)
    assert set(a) == set(b) == {"mu", "r"} and a["mu"].shape == (2, 5, 3)
    np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-4)
