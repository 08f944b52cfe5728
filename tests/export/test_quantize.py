"""INT8 export (issue 19): static QDQ quantisation of the backbone, calibration on tissue
tiles, the accuracy gate both ways, the runtimes run the int8 file unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import onnx
import pytest

from data_pipelines.errors import StimageError
from data_pipelines.fingerprint import file_digest
from export.runtime.onnx_model import OnnxEnsemble
from stimage_jax.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jax2onnx internals


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model on two synthetic sections, its fp32 export and a third (held-out) section."""
    from tests.conftest import make_sample

    tmp = tmp_path_factory.mktemp("quantize")
    paths = []
    for k in range(3):
        p = tmp / f"s{k}.h5ad"
        make_sample(tmp, f"s{k}", seed=k).write_h5ad(p)
        paths.append(p)
    wd = tmp / "wd"
    # --tta 1: the toy net's 8-view graph (issue 21's default) moves int8 means by a median 10 %
    # (1-view: < 5 %); a real backbone with TTA is held to the gate in test_int8_on_her2st_tiles
    assert main(["train", "--quiet", "--data", *map(str, paths[:2]), "--workdir", str(wd), "--backbone", "tiny",
                 "--tile-px", "32", "--lr", "3e-2", "--max-epochs", "5", "--genes", "A,B,C", "--members", "2", "--tta", "1"]) == 0
    assert main(["export-onnx", "--quiet", "--model", str(wd), "--out", str(tmp / "fp32.onnx")]) == 0
    return wd, tmp / "fp32.onnx", paths


def _meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_int8_export_gate_metadata_and_runtime(trained, tmp_path, capsys):
    wd, fp32, (s0, s1, s2) = trained
    out = tmp_path / "q.onnx"
    # a 32 px random-feature toy net is far more fragile in int8 than a real backbone at 299 px
    # (test_int8_on_her2st_tiles holds a real one to 0.01): a looser limit here
    assert main(["export-onnx", "--quiet", "--model", str(wd), "--out", str(out), "--quantize", "int8",
                 "--calibration", str(s0), str(s1), "--calibration-tiles", "100", "--validate", str(s2),
                 "--max-pcc-drop", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy gate on s2 (64 spots, 3 genes)" in printed and ": pass" in printed
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # the NB heads stay fp32: no Gemm reads a dequantised tensor
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert gemms and not any(i in dq_out for n in gemms for i in n.input)
    meta, fmeta = _meta(out), _meta(fp32)
    assert {k: v for k, v in meta.items() if k != "quantization"} == fmeta  # every fp32 key unchanged
    q = json.loads(meta["quantization"])
    assert q["scheme"] == "int8" and q["format"] == "QDQ" and "per-channel" in q["weights"]
    cal = q["calibration"]
    assert [s["file"] for s in cal["sections"]] == ["s0.h5ad", "s1.h5ad"]
    assert [s["sha256"] for s in cal["sections"]] == [file_digest(s0), file_digest(s1)]
    # tissue-filtered: every kept tile is a spot with tissue, at most the requested count
    assert 0 < cal["tiles"] <= 100 and all(0 < s["tissue_spots"] <= s["spots"] == 64 for s in cal["sections"])
    assert q["gate"]["passed"] and q["gate"]["held_out"] and q["gate"]["files"][0]["sha256"] == file_digest(s2)
    assert abs(q["gate"]["pcc_drop"]) <= 0.05 and q["gate"]["max_drop"] == 0.05

    # int8 outputs close to fp32 on the held-out tiles (toy net, 32 px: a loose bound)
    from data_pipelines.slides import read_h5ad
    from data_pipelines.tiles import spot_tiles

    tiles = np.asarray(spot_tiles(read_h5ad(s2), tile_px=32, progress=False))
    a, b = OnnxEnsemble(fp32).params(tiles)["mu"], OnnxEnsemble(out).params(tiles)["mu"]
    rel = np.abs(b - a) / np.abs(a)
    assert np.median(rel) < 0.05 and rel.max() < 0.5

    # the JAX-free runtime runs it unchanged and says it was int8
    pred = tmp_path / "p.h5ad"
    code = textwrap.dedent(f"""
        import sys
        for name in ("jax", "jaxlib", "flax", "optax", "orbax", "jax2onnx"):
            sys.modules[name] = None
        from export.predict import main
        sys.exit(main(["--quiet", "--model", {str(out)!r}, "--data", {str(s2)!r}, "--out", {str(pred)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    p = ad.read_h5ad(pred)
    assert p.uns["stimage"]["prediction"]["quantization"] == "int8" and p.shape == (64, 3)

    # an existing fp32 .onnx quantises without JAX, and into a Triton repository too
    repo = tmp_path / "repo"
    assert main(["export-onnx", "--quiet", "--model", str(fp32), "--triton-repo", str(repo), "--name", "q",
                 "--quantize", "int8", "--calibration", str(s0)]) == 0
    served = onnx.load(str(repo / "q" / "1" / "model.onnx"))
    smeta = {p.key: p.value for p in served.metadata_props}
    assert json.loads(smeta["quantization"])["scheme"] == "int8"
    assert "QuantizeLinear" in {n.op_type for n in served.graph.node}


def test_gate_refuses_a_bad_quantisation_unless_forced(trained, tmp_path, capsys, monkeypatch):
    import export.quantize as qmod

    wd, fp32, (s0, s1, s2) = trained
    real = qmod.calibration_tiles

    def black(*args, **kw):  # ranges calibrated on black tiles: every real activation saturates
        tiles, info = real(*args, **kw)
        return np.zeros_like(tiles), info

    monkeypatch.setattr(qmod, "calibration_tiles", black)
    out = tmp_path / "bad.onnx"
    args = ["export-onnx", "--model", str(fp32), "--out", str(out), "--quantize", "int8",
            "--calibration", str(s0), "--validate", str(s2)]
    assert main(["--quiet", *args]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stimage: error: int8 model refused: mean PCC drops by")
    assert ": FAIL" in cap.out and not out.exists() and not list(tmp_path.glob("*.tmp*"))
    assert main(["--quiet", *args, "--force"]) == 0
    gate = json.loads(_meta(out)["quantization"])["gate"]
    assert gate["forced"] and not gate["passed"] and gate["pcc_drop"] > 0.01
    # the real calibration passes where the black one was refused
    monkeypatch.setattr(qmod, "calibration_tiles", real)
    assert main(["--quiet", *args, "--overwrite", "--max-pcc-drop", "0.05"]) == 0
    assert json.loads(_meta(out)["quantization"])["gate"]["passed"]


@pytest.mark.parametrize("extra, message", [
    (["--calibration", "X.h5ad"], "--calibration go with --quantize int8"),
    (["--quantize", "int8"], "--quantize int8 needs --calibration"),
    (["--quantize", "int8", "--calibration", "missing.h5ad"], "section file missing.h5ad not found"),
    (["--quantize", "int8", "--calibration", "{s0}", "--calibration-tiles", "0"], "--calibration-tiles must be"),
    (["--quantize", "int8", "--calibration", "{s0}", "--max-pcc-drop", "-1"], "--max-pcc-drop must lie in"),
])
def test_bad_quantize_arguments_are_one_line(trained, tmp_path, capsys, extra, message):
    wd, fp32, (s0, _, _) = trained
    out = tmp_path / "q.onnx"
    extra = [e.format(s0=s0) for e in extra]
    assert main(["export-onnx", "--model", str(fp32), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_bad_quantization_metadata_is_one_line(trained, tmp_path):
    _, fp32, _ = trained
    proto = onnx.load(str(fp32))
    proto.metadata_props.add(key="quantization", value=json.dumps({"scheme": "int3"}))
    onnx.save(proto, tmp_path / "bad.onnx")
    with pytest.raises(StimageError, match="metadata 'quantization' must be a JSON object with 'scheme' one of int8"):
        OnnxEnsemble(tmp_path / "bad.onnx")
    from export.quantize import quantize_int8

    with pytest.raises(StimageError, match="already quantised"):
        quantize_int8(proto, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(StimageError, match=r"calibration tiles must be uint8 \(N >= 1, 32, 32, 3\)"):
        quantize_int8(fp32, np.zeros((2, 16, 16, 3), np.uint8))


@pytest.mark.real_data
@pytest.mark.slow
def test_int8_on_her2st_tiles(her2st_root, tmp_path):
    """EfficientNet-Lite0 (ImageNet weights) on HER2ST: the int8 model calibrated on C3 tissue
    tiles predicts held-out C4 close to fp32 and passes the 0.01 gate; fp32 ONNX still equals JAX."""
    import jax.numpy as jnp

    from data_pipelines.slides import read_h5ad
    from data_pipelines.tiles import spot_tiles
    from export.to_onnx import graph_function
    from stimage_jax.ensemble.model import EnsembleModel

    data = tmp_path / "her2st"
    assert main(["read", "her2st", str(her2st_root), "--sections", "C3,C4", "--out", str(data)]) == 0
    wd = tmp_path / "wd"
    assert main(["train", "--quiet", "--data", str(data / "C3.h5ad"), "--genes", "markers", "--backbone",
                 "efficientnet_lite0", "--tile-px", str(PX), "--members", "2", "--max-epochs", "30", "--lr", "1e-3",
                 "--workdir", str(wd)]) == 0  # the defaults: 8 views (with 1 view this toy model's int8 PCC drop is 0.015)
    fp32, q = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert main(["export-onnx", "--quiet", "--model", str(wd), "--out", str(fp32)]) == 0
    assert main(["export-onnx", "--quiet", "--model", str(fp32), "--out", str(q), "--quantize", "int8",
                 "--calibration", str(data / "C3.h5ad"), "--calibration-tiles", "128",
                 "--validate", str(data / "C4.h5ad")]) == 0
    gate = json.loads(_meta(q)["quantization"])["gate"]
    assert gate["passed"] and gate["pcc_drop"] <= 0.01
    tiles = np.asarray(spot_tiles(read_h5ad(data / "C4.h5ad"), tile_px=PX, progress=False))[:64]
    a, b = OnnxEnsemble(fp32).params(tiles)["mu"], OnnxEnsemble(q).params(tiles)["mu"]
    # per gene, the int8 means follow the fp32 means across spots
    r = [np.corrcoef(np.log(a[m, :, g]), np.log(b[m, :, g]))[0, 1] for m in range(a.shape[0])
         for g in range(a.shape[2])]
    assert np.median(r) > R_MIN, np.median(r)
    assert np.median(np.abs(b - a) / np.abs(a)) < REL_MAX
    mu_j, _ = graph_function(EnsembleModel.load(wd))(jnp.asarray(tiles))
    assert np.max(np.abs(a - np.asarray(mu_j)) / np.abs(np.asarray(mu_j))) <= 1e-4  # fp32 parity stays


# The heads standardise each feature by its training spread, so int8 noise on a low-spread feature moves
# single means by ~10-15 % (median, 2 members on one section) while the ranking across spots, what PCC
# and the gate read, holds (r > 0.9).
PX, R_MIN, REL_MAX = 160, 0.9, 0.25


def _scaled_conv_graph(rng, bias: bool):
    """A backbone's start in miniature: Cast → Div(127.5) → Sub(1) → Pad(0) → Transpose → Conv,
    on uint8 (N, 9, 9, 3) tiles; returns (graph, tiles (2, 9, 9, 3), onnxruntime runner)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32) if bias else np.zeros(4, np.float32)
    inits = [numpy_helper.from_array(np.array([127.5], np.float32), "c"),
             numpy_helper.from_array(np.array([1.0], np.float32), "d"),
             numpy_helper.from_array(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), "pads"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    nodes = [helper.make_node("Cast", ["tiles"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["f", "c"], ["s"]), helper.make_node("Sub", ["s", "d"], ["x"]),
             helper.make_node("Pad", ["x", "pads", "zero"], ["p"]),
             helper.make_node("Transpose", ["p"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "W", "B"], ["y"], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["N", 9, 9, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.integers(0, 256, (2, 9, 9, 3), dtype=np.uint8)

    def run(p):
        return ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"tiles": x})[0]

    return proto, x, run


def test_fold_input_scaling_is_exact_and_removes_the_scaling():
    """Cast → Div(c) → Sub(d) → Pad(0) → Transpose → Conv(W, B) becomes Cast → Pad → Transpose →
    Conv(W/c, B − d·ΣW) with the pad value moved to the raw scale: same outputs, border included."""

    from export.quantize import fold_input_scaling

    proto, x, run = _scaled_conv_graph(np.random.default_rng(0), bias=True)
    ref = run(proto)
    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    assert fold_input_scaling(folded)
    onnx.checker.check_model(folded)
    assert [n.op_type for n in folded.graph.node] == ["Cast", "Pad", "Transpose", "Conv"]
    assert {"c", "d", "W", "B"}.isdisjoint(t.name for t in folded.graph.initializer)
    np.testing.assert_allclose(run(folded), ref, rtol=1e-5, atol=1e-4)
    # anything else (here: a Mul instead of Div) is left alone
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    other.graph.node[1].op_type = "Mul"
    assert not fold_input_scaling(other) and len(other.graph.node) == 6


def test_uint8_input_path_pads_raw_tiles_and_centres_the_first_convolution():
    """uint8_path: tiles → Pad(128) → Transpose → Cast → Sub(128) → Conv; outputs away from the
    padding equal the original graph's, padded ones differ by the rounded pad value only."""
    from onnx import numpy_helper

    from export.quantize import fold_input_scaling

    proto, x, run = _scaled_conv_graph(np.random.default_rng(1), bias=False)
    w = next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == "W")
    ref = run(proto)
    # quantised whole: the input's Cast/Sub/QuantizeLinear are gone, the Conv's DequantizeLinear
    # reads the padded, transposed uint8 tiles themselves
    from export.quantize import TileReader, quantize_qdq

    q = quantize_qdq(proto, TileReader(x, 2, False, "tiles"))
    ops = [n.op_type for n in q.graph.node]
    assert "Cast" not in ops and "Sub" not in ops and ops.count("QuantizeLinear") == 1  # the Conv's output only
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "t")
    assert dq.output[0] in next(n for n in q.graph.node if n.op_type == "Conv").input
    assert np.max(np.abs(run(q) - ref)) <= 0.02 * np.max(np.abs(ref))  # int8: a few output steps
    assert fold_input_scaling(proto, uint8_path=True) == "x"  # the centred input, read by the Conv
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node] == ["Pad", "Transpose", "Cast", "Sub", "Conv"]
    got = run(proto)
    np.testing.assert_allclose(got[:, :, 1:4, 1:4], ref[:, :, 1:4, 1:4], rtol=1e-5, atol=1e-4)
    # on padded taps the pad value 127.5 became 128: 0.5/127.5 per tap at most
    assert np.max(np.abs(got - ref)) <= 0.5 / 127.5 * np.abs(w).sum(axis=(1, 2, 3)).max() + 1e-4
