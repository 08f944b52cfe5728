"""The serving graph on hand-made plain exports (no JAX, no training): NB and point models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from data_pipelines.errors import StimageError
from export.runtime.moments import ensemble_moments_np
from export.runtime.onnx_model import ONNX_FORMAT
from export.serving.model import ServedModel
from export.serving.repo import GRAPH_OUTPUTS, serving_graph, write_triton_repo

M, G, PX = 3, 5, 4


def plain_export(point: bool) -> onnx.ModelProto:
    """tiles (B, 4, 4, 3) uint8 → mu (softplus of a linear map), r (softplus, or inf), each (M, B, G)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.05, (PX * PX * 3, 2 * M * G)).astype(np.float32), "w")
    nodes = [helper.make_node("Cast", ["tiles"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["x", "flat"], ["xf"]),
             helper.make_node("MatMul", ["xf", "w"], ["h"]),
             helper.make_node("Softplus", ["h"], ["sp"]),
             helper.make_node("Reshape", ["sp", "split_shape"], ["sp3"]),  # (B, 2M, G)
             helper.make_node("Transpose", ["sp3"], ["t"], perm=[1, 0, 2]),  # (2M, B, G)
             helper.make_node("Split", ["t", "halves"], ["mu", "r_nb"], axis=0)]
    if point:
        nodes.append(helper.make_node("Add", ["r_nb", "inf"], ["r"]))
    else:
        nodes.append(helper.make_node("Identity", ["r_nb"], ["r"]))
    inits = [w, numpy_helper.from_array(np.array([-1, PX * PX * 3], np.int64), "flat"),
             numpy_helper.from_array(np.array([0, 2 * M, G], np.int64), "split_shape"),
             numpy_helper.from_array(np.array([M, M], np.int64), "halves"),
             numpy_helper.from_array(np.array(np.inf, np.float32), "inf")]
    graph = helper.make_graph(nodes, "plain", [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["B", PX, PX, 3])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [M, "B", G]) for n in ("mu", "r")],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    for k, v in {"format": ONNX_FORMAT, "genes": json.dumps([f"g{i}" for i in range(G)]), "tile_um": "100.0",
                 "tile_px": str(PX), "members": str(M), "provenance": "{}", "stain_reference": "null",
                 "target": "log1p" if point else "nb"}.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("point", [False, True], ids=["nb", "point"])
def test_serving_graph_adds_batch_major_moments(point):
    plain = plain_export(point)
    tiles = np.random.default_rng(1).integers(0, 256, (7, PX, PX, 3), dtype=np.uint8)
    mu, r = ort.InferenceSession(plain.SerializeToString()).run(["mu", "r"], {"tiles": tiles})
    sess = ort.InferenceSession(serving_graph(plain).SerializeToString())
    got = dict(zip(GRAPH_OUTPUTS, sess.run(list(GRAPH_OUTPUTS), {"tiles": tiles})))
    mom = ensemble_moments_np(mu, r)
    if point:  # as export.runtime.prediction.build_prediction
        mom["var_aleatoric"][:] = 0.0
    np.testing.assert_array_equal(got["mu"], mu.transpose(1, 0, 2))
    np.testing.assert_array_equal(got["r"], r.transpose(1, 0, 2))
    for n in ("mean", "var_aleatoric", "var_epistemic"):
        np.testing.assert_allclose(got[n], mom[n], rtol=1e-5, atol=1e-7, err_msg=n)
    iv = ServedModel.interval(got["mu"], got["r"])
    if point:
        np.testing.assert_allclose(iv["q_lo"], got["mean"])
        np.testing.assert_allclose(iv["q_hi"], got["mean"])
    else:
        assert np.all(iv["q_lo"] <= iv["q_hi"])


def test_write_triton_repo_refuses_bad_names_and_overwrites(tmp_path):
    plain = plain_export(False)
    folder = write_triton_repo(plain, tmp_path, "m1", max_batch_size=8)
    assert (folder / "1" / "model.onnx").is_file() and "max_batch_size: 8" in (folder / "config.pbtxt").read_text()
    with pytest.raises(StimageError, match="already exists"):
        write_triton_repo(plain, tmp_path, "m1")
    for bad in ("../x", "", "a b"):
        with pytest.raises(StimageError, match="model name"):
            write_triton_repo(plain, tmp_path, bad)
    with pytest.raises(StimageError, match="max-batch-size"):
        write_triton_repo(plain, tmp_path, "m2", max_batch_size=0)
    with pytest.raises(StimageError, match="not an ONNX file"):
        (tmp_path / "junk.onnx").write_bytes(b"junk")
        write_triton_repo(tmp_path / "junk.onnx", tmp_path, "m3")


def test_cli_checks_the_repository_arguments_before_writing(tmp_path, capsys):
    from stimage_jax.cli import main

    plain = tmp_path / "m.onnx"
    onnx.save_model(plain_export(False), plain)
    assert main(["export-onnx", "--model", str(plain), "--triton-repo", str(tmp_path / "r"), "--name", "../x"]) == 2
    assert "model name" in capsys.readouterr().err and not (tmp_path / "r").exists() and not (tmp_path / "x").exists()
    assert main(["export-onnx", "--model", str(plain), "--triton-repo", str(tmp_path / "r"), "--name", "ok",
                 "--max-batch-size", "16"]) == 0  # an exported .onnx needs no JAX export
    assert "max_batch_size: 16" in (tmp_path / "r" / "ok" / "config.pbtxt").read_text()
    assert main(["export-onnx", "--model", str(plain)]) == 2
    assert "--triton-repo" in capsys.readouterr().err
