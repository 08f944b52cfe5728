"""Whole-slide cohort fixtures: pyramidal TIFFs cut from the shipped HER2ST C-section H&E
images (plus a truncated and a non-TIFF one), and a tiny exported-format ONNX ensemble
built with onnx.helper (real onnxruntime, real metadata validation, no JAX)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest

GENES = ["ERBB2", "CD74", "B2M", "FASN"]


def build_tiny_onnx(path, *, genes=GENES, tile_px=16, tile_um=100.0, members=2, seed=0):
    """uint8 tiles (B, px, px, 3) → mean colour → per-member log-linear mu and r, (M, B, G)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    g = len(genes)
    w_mu = rng.normal(0, 2, (members, 3, g)).astype(np.float32)
    w_r = rng.normal(0, 1, (members, 3, g)).astype(np.float32)
    b = rng.normal(1, 0.5, (members, 1, g)).astype(np.float32)
    inits = [numpy_helper.from_array(w_mu, "w_mu"), numpy_helper.from_array(w_r, "w_r"),
             numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(255, np.float32), "s")]
    nodes = [helper.make_node("Cast", ["tiles"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("Div", ["m", "s"], ["x"]),
             helper.make_node("MatMul", ["x", "w_mu"], ["lmu0"]),
             helper.make_node("Add", ["lmu0", "b"], ["lmu"]),
             helper.make_node("Exp", ["lmu"], ["mu"]),
             helper.make_node("MatMul", ["x", "w_r"], ["lr"]),
             helper.make_node("Exp", ["lr"], ["r"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["B", tile_px, tile_px, 3])],
        [helper.make_tensor_value_info("mu", TensorProto.FLOAT, [members, "B", g]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [members, "B", g])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {"format": "stimage-jax-onnx/1", "genes": json.dumps(list(genes)), "tile_um": str(tile_um),
            "tile_px": str(tile_px), "provenance": json.dumps({"backbone": "tiny-test"}), "members": str(members)}
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def write_pyramid(path, img: np.ndarray, mpp: float) -> Path:
    """A tiled pyramidal TIFF (2 levels, SubIFDs) with the resolution tags (µm per px)."""
    import tifffile

    kw = dict(tile=(128, 128), photometric="rgb", compression="zlib", metadata=None)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subifds=1, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **kw)
        tw.write(np.ascontiguousarray(img[::4, ::4]), subfiletype=1, **kw)
    return Path(path)


def her2st_crops(shared: Path, n: int, side: int = 512) -> list[np.ndarray]:
    """Central side×side crops of the C2..C6 H&E images read at 1/4 resolution (RGB)."""
    import cv2

    files = sorted(glob.glob(str(shared / "data" / "her2st" / "data" / "ST-imgs" / "C" / "C*" / "*.jpg")))
    assert files, "HER2ST C-section images missing"
    out = []
    for i in range(n):
        im = cv2.imread(files[i % len(files)], cv2.IMREAD_REDUCED_COLOR_4)[:, :, ::-1]
        h, w = im.shape[:2]
        dy = (i // len(files)) * side // 2  # a later crop of the same section is shifted
        y0, x0 = (h - side) // 2 + dy - side // 4, (w - side) // 2
        out.append(np.ascontiguousarray(im[y0:y0 + side, x0:x0 + side]))
    return out


@pytest.fixture(scope="session")
def cohort_inputs(shared, tmp_path_factory):
    """{dir, model, csv (4 good slides + truncated + not-a-tiff), good ids, bad ids}."""
    d = tmp_path_factory.mktemp("cohort_inputs")
    model = build_tiny_onnx(d / "tiny.onnx")
    (d / "slides").mkdir()
    ids = []
    for i, img in enumerate(her2st_crops(shared, 4)):
        write_pyramid(d / "slides" / f"s{i}.tif", img, mpp=2.0)
        ids.append(f"s{i}")
    full = (d / "slides" / "s0.tif").read_bytes()
    (d / "slides" / "trunc.tif").write_bytes(full[: len(full) // 3])
    (d / "slides" / "junk.tif").write_bytes(os.urandom(4096))
    rows = ["slide_id,path,mpp"] + [f"{s},slides/{s}.tif," for s in ids] + \
        ["trunc,slides/trunc.tif,2.0", "junk,slides/junk.tif,2.0"]
    (d / "slides.csv").write_text("\n".join(rows) + "\n")
    (d / "good.csv").write_text("\n".join(rows[:1 + len(ids)]) + "\n")
    return {"dir": d, "model": model, "csv": d / "slides.csv", "good_csv": d / "good.csv", "good": ids,
            "bad": ["trunc", "junk"]}


@pytest.fixture(scope="session")
def tiny_onnx():
    """Factory: tiny_onnx(path, seed=...) → a tiny exported-format ONNX ensemble."""
    return build_tiny_onnx
