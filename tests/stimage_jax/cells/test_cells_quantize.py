"""INT8 cell model (issue 19): ``stimage cells export-onnx --quantize int8`` on a real MoNuSeg
tile — model written, metadata recorded, segmentation close to fp32 by the gate's own
measures (recomputed here), the gate's refusal and ``--force``, ``cells predict`` running
the int8 file, one-line errors. A tiny network trained for a few steps on the tile keeps it fast."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pandas as pd
import pytest

from data_pipelines.fingerprint import file_digest
from stimage_jax.cli import main

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.real_data]

SIZE = 64


def run(*argv: str) -> int:
    """``stimage cells ...`` through the main CLI (StimageError → one line, exit 2)."""
    return main(["cells", *argv])


@pytest.fixture(scope="module")
def tiles(shared, tmp_path_factory):
    """Two 128² crops of a real MoNuSeg training tile (image, instances, random types per
    nucleus so the TC branch exists): one to train and calibrate on, one held out."""
    from data_pipelines.monuseg import list_monuseg, load_monuseg_pair
    from stimage_jax.cells.instance_metrics import centroids, remap_label

    rgb, inst = load_monuseg_pair(*list_monuseg(shared / "data" / "monuseg", "train")[0])
    root = tmp_path_factory.mktemp("monuseg_crops")
    rng = np.random.default_rng(0)
    for name, (r, c) in {"cal": (250, 100), "val": (650, 0)}.items():
        d = root / name
        d.mkdir()
        lab = remap_label(inst[r:r + 128, c:c + 128]).astype(np.int32)
        cv2.imwrite(str(d / "tile.png"), cv2.cvtColor(rgb[r:r + 128, c:c + 128], cv2.COLOR_RGB2BGR))
        np.save(d / "tile_instances.npy", lab)
        xy = centroids(lab)
        pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "type": rng.integers(1, 5, len(xy))}).to_csv(
            d / "tile_types.csv", index=False)
    return root / "cal", root / "val"


@pytest.fixture(scope="module")
def trained(tiles, tmp_path_factory):
    cal, _ = tiles
    tmp = tmp_path_factory.mktemp("cells_q")
    wd = tmp / "wd"
    assert run("train", "--quiet", "--data", str(cal), "--workdir", str(wd), "--backbone", "tiny", "--patch-size",
               str(SIZE), "--stride", "32", "--batch-size", "4", "--lr", "1e-2", "--steps", "100",
               "--checkpoint-every", "100", "--augment", "none") == 0
    fp32 = tmp / "fp32.onnx"
    assert run("export-onnx", "--quiet", "--model", str(wd), "--out", str(fp32), "--size", str(SIZE)) == 0
    return wd, fp32


def _meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_int8_export_gate_metadata_and_prediction(tiles, trained, tmp_path, capsys):
    from stimage_jax.cells.instance_metrics import aji
    from stimage_jax.cells.onnx_model import OnnxCellModel
    from stimage_jax.cells.quantize import output_convs

    cal, val = tiles
    wd, fp32 = trained
    out = tmp_path / "int8.onnx"
    # the fp32 export quantised (a workdir --model exports in memory first: the same proto), gated on the held-out crop
    assert run("export-onnx", "--model", str(fp32), "--out", str(out), "--quantize", "int8",
               "--calibration", str(cal), "--validate", str(val / "tile.png")) == 0
    printed = capsys.readouterr().out
    assert "accuracy gate on 1 image(s): nucleus-mask agreement" in printed and ": pass" in printed
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # each output's last convolution stays fp32: its weight is a plain initialiser, not dequantised
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    heads = set(output_convs(proto))
    assert len(heads) == 3  # np, hv, tc
    assert all(n.input[1] not in dq_out for n in proto.graph.node if n.name in heads)
    rec = json.loads(_meta(out)["quantization"])
    assert rec["scheme"] == "int8" and rec["format"] == "QDQ" and rec["fp32_sha256"]
    assert rec["calibration"]["images"] == [{"file": "tile.png", "sha256": file_digest(cal / "tile.png"),
                                             "windows": 4}]
    assert rec["calibration"]["tiles"] == 4 and rec["calibration"]["size"] == SIZE
    gate = rec["gate"]
    assert gate["passed"] and gate["held_out"] and not gate["forced"] and gate["annotated"] == 1
    assert gate["files"] == [{"file": "tile.png", "sha256": file_digest(val / "tile.png")}]
    assert _meta(out)["format"] == _meta(fp32)["format"] and _meta(out)["size"] == str(SIZE)

    # the gate's figures, recomputed independently with the runtime on the held-out crop
    rgb = cv2.cvtColor(cv2.imread(str(val / "tile.png")), cv2.COLOR_BGR2RGB)
    f, q = OnnxCellModel(fp32).segment(rgb), OnnxCellModel(out).segment(rgb)
    assert f.instances.max() >= 5  # the tiny model did learn nuclei
    agree = float(np.mean((f.np_prob >= 0.5) == (q.np_prob >= 0.5)))
    assert gate["np_agreement"] == pytest.approx(agree, abs=1e-6) and agree >= 0.98
    m = f.np_prob >= 0.5
    assert gate["tc_agreement"] == pytest.approx(float(np.mean(f.tc_prob[m].argmax(-1) == q.tc_prob[m].argmax(-1))))
    truth = np.load(val / "tile_instances.npy")
    assert gate["aji_fp32"] == pytest.approx(aji(f.instances, truth))
    assert gate["aji_fp32"] - gate["aji_int8"] <= 0.01
    assert np.max(np.abs(q.hv - f.hv)) < 0.5 and np.mean(np.abs(q.np_prob - f.np_prob)) < 0.02

    # `cells predict` runs the int8 file as it runs the fp32 one
    pred = tmp_path / "pred.png"
    assert run("predict", "--quiet", "--model", str(out), "--image", str(val / "tile.png"), "--out", str(pred)) == 0
    table = pd.read_csv(tmp_path / "pred_types.csv")
    assert len(table) == int(q.instances.max()) and "type_name" in table


def test_onnx_runtime_matches_the_jax_model(tiles, trained):
    """On an image of exactly the export's side (one window, no padding), the fp32 ONNX maps
    are the JAX model's."""
    from stimage_jax.cells.model import CellModel
    from stimage_jax.cells.onnx_model import OnnxCellModel

    cal, _ = tiles
    wd, fp32 = trained
    rgb = cv2.cvtColor(cv2.imread(str(cal / "tile.png")), cv2.COLOR_BGR2RGB)[:SIZE, :SIZE]
    for a, b in zip(OnnxCellModel(fp32).predict_maps(rgb), CellModel.load(wd).predict_maps(rgb)):
        assert a.shape == b.shape and np.max(np.abs(a - b)) < 1e-4


def test_gate_refuses_a_bad_quantisation_unless_forced(tiles, trained, tmp_path, capsys, monkeypatch):
    import stimage_jax.cells.quantize as cq

    cal, val = tiles
    _, fp32 = trained
    real = cq.calibration_windows

    def black(*args, **kw):  # ranges calibrated on black windows: every real activation saturates
        t, info = real(*args, **kw)
        return np.zeros_like(t), info

    monkeypatch.setattr(cq, "calibration_windows", black)
    out = tmp_path / "bad.onnx"
    args = ["export-onnx", "--model", str(fp32), "--out", str(out), "--quantize", "int8", "--calibration", str(cal)]
    assert run("--quiet", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stimage: error: int8 cell model refused by the accuracy gate")
    assert not out.exists() and not list(tmp_path.iterdir())
    assert run("--quiet", *args, "--force") == 0
    gate = json.loads(_meta(out)["quantization"])["gate"]
    assert gate["forced"] and not gate["passed"] and not gate["held_out"]


@pytest.mark.parametrize("extra, message", [
    (["--calibration", "{cal}"], "--calibration go with --quantize int8"),
    (["--quantize", "int8"], "--quantize int8 needs --calibration"),
    (["--quantize", "int8", "--calibration", "missing.png"], "image missing.png not found"),
    (["--quantize", "int8", "--calibration", "{cal}", "--max-aji-drop", "2"], "--max-aji-drop must lie in"),
    (["--quantize", "int8", "--calibration", "{cal}", "--min-agreement", "-1"], "--min-agreement must lie in"),
    ([], "already an ONNX export"),
])
def test_bad_quantize_arguments_are_one_line(tiles, trained, tmp_path, capsys, extra, message):
    cal, _ = tiles
    _, fp32 = trained
    out = tmp_path / "q.onnx"
    assert run("export-onnx", "--model", str(fp32), "--out", str(out), *[e.format(cal=cal) for e in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()
