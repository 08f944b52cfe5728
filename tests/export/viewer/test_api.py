"""The viewer's JSON API on real HER2ST C6 (no browser): numbers equal an independent
``export.predict``-path prediction, overlays paint the spots' colours, bad requests get one
4xx line and the server keeps serving, uploads are validated and size-capped, and
predictions and explanations are cached by content."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from tests.export.viewer.conftest import Viewer

pytestmark = [pytest.mark.real_data]


@pytest.fixture(scope="module")
def truth(c6_model):
    from data_pipelines.slides import read_h5ad
    from export.runtime.onnx_model import OnnxEnsemble
    from export.runtime.prediction import predict_adata

    data, model = c6_model
    return predict_adata(read_h5ad(data), OnnxEnsemble(model), progress=False)


def test_genes_spots_and_spot_numbers_are_the_prediction(viewer, truth):
    code, g = viewer.get("/api/genes")
    assert code == 200 and g["genes"] == list(truth.var_names) and g["ready"]
    assert g["layers"] == ["mean", "var_epistemic", "var_aleatoric", "observed"]
    code, s = viewer.get("/api/spots?gene=FASN&layer=var_aleatoric")
    assert code == 200 and s["ids"] == list(truth.obs_names)
    j = truth.var_names.get_loc("FASN")
    np.testing.assert_array_equal(np.asarray(s["values"], np.float32), truth.layers["var_aleatoric"][:, j])
    np.testing.assert_array_equal(np.c_[s["x"], s["y"]], truth.obsm["spatial"])
    spot = truth.obs_names[17]
    x, y = truth.obsm["spatial"][17]
    code, by_xy = viewer.get(f"/api/spot?x={x + 20}&y={y - 20}&gene=FASN")  # inside the spot's disc
    code2, by_id = viewer.get(f"/api/spot?id={spot}&gene=FASN")
    assert code == code2 == 200 and by_xy == by_id
    assert by_id["mean"] == float(truth.X[17, j])
    for k in ("q_lo", "q_hi", "var_aleatoric", "var_epistemic"):
        assert by_id[k] == float(truth.layers[k][17, j]), k
    assert by_id["tissue_coverage"] == float(truth.obs["tissue_coverage"].iloc[17])
    assert by_id["interval"] == 0.8
    assert viewer.get("/api/spot?x=1&y=1&gene=FASN") == (200, {"spot": None, "gene": "FASN"})  # glass


def test_overlay_paints_each_spot_with_its_viridis_colour(viewer, truth):
    code, png = viewer.get("/api/overlay.png?gene=CD74&layer=mean", raw=True)
    assert code == 200
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    _, st = viewer.get("/api/status")
    s = 2048 / max(st["width"], st["height"])
    assert img.shape[:2] == (round(st["height"] * s), round(st["width"] * s))
    v = np.asarray(truth[:, "CD74"].X).ravel().astype(np.float64)
    lo, hi = np.percentile(v, [1, 99])
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_VIRIDIS)[:, 0, ::-1]
    for i in (0, 50, 100, 177):
        cx, cy = (np.asarray(truth.obsm["spatial"][i]) * s).round().astype(int)
        t = np.clip((v[i] - lo) / (hi - lo), 0, 1)
        assert img[cy, cx, 3] == 255
        np.testing.assert_array_equal(img[cy, cx, :3], lut[int(round(t * 255))])
    assert img[2, 2, 3] == 0  # glass stays transparent
    assert (img[..., 3] > 0).mean() > 0.02


def test_bad_requests_get_one_line_4xx_and_the_server_keeps_serving(viewer):
    cases = [("/api/spots?gene=NOPE", 400, "not predicted"), ("/api/spots?gene=CD74&layer=bogus", 400, "unknown layer"),
             ("/api/spots", 400, "missing query parameter 'gene'"), ("/api/spot?x=abc&y=1&gene=CD74", 400, "number"),
             ("/api/spot?x=nan&y=1&gene=CD74", 400, "finite"), ("/api/spot?id=nope&gene=CD74", 400, "not in this"),
             ("/api/explain/0123abcd", 404, "no such"), ("/api/overlay.png?gene=CD74&layer=observed%00", 400, "layer")]
    for path, status, words in cases:
        code, body = viewer.get(path)
        assert code == status and words in body["error"] and "\n" not in body["error"], (path, body)
    assert viewer.get("/slide_files/99/0_0.jpeg")[0] == 404
    assert viewer.get("/slide_files/3/999_999.jpeg")[0] == 404
    assert viewer.post("/api/explain", b"{not json")[0] == 400
    assert viewer.post("/api/explain", b'{"spot": 3}')[0] == 400
    code, body = viewer.post("/api/explain", b'{"spot": "x", "gene": "CD74"}', headers={"X-Stimage": "0"})
    assert code == 400 and "X-Stimage" in body["error"]
    assert viewer.get("/api/status", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding
    assert viewer.get("/api/status")[1]["state"] == "ready"


def test_deep_zoom_descriptor_and_a_tile(viewer):
    code, xml = viewer.get("/slide.dzi", raw=True)
    assert code == 200 and b'TileSize="254"' in xml and b'Width="9288"' in xml
    code, jpg = viewer.get("/slide_files/14/20_20.jpeg", raw=True)
    assert code == 200 and jpg[:3] == b"\xff\xd8\xff"
    assert cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR).shape == (256, 256, 3)


def test_explanation_is_cached_by_content(viewer, truth):
    spot = str(truth.obs_names[40])
    code, job = viewer.post("/api/explain", json.dumps({"spot": spot, "gene": "FASN", "samples": 20}).encode())
    assert code in (200, 202)
    for _ in range(600):
        job = viewer.get(f"/api/explain/{job['job']}")[1]
        if job["state"] in ("done", "error"):
            break
        import time

        time.sleep(0.1)
    assert job["state"] == "done", job
    assert job["samples"] == 20 and len(job["rows"]) == job["n_nuclei"]
    assert all(r["area_um2"] == pytest.approx(r["area_px"] * job["mpp"] ** 2) for r in job["rows"])
    code, csv = viewer.get(f"/api/explain/{job['job']}/nuclei.csv", raw=True)
    assert code == 200 and csv.decode().count("\n") == 1 + job["n_nuclei"]
    again = viewer.post("/api/explain", json.dumps({"spot": spot, "gene": "FASN", "samples": 20}).encode())
    assert again == (200, job)  # the same key: answered from the cache at once


def test_model_upload_is_validated_size_capped_and_switches_models(viewer, c6_model, tmp_path):
    _, model = c6_model
    code, body = viewer.post("/api/model", b"\x08\x01garbage" * 20, headers={"X-Filename": "junk.onnx"})
    assert code == 400 and body["error"].startswith("model upload: junk.onnx is not an ONNX model")
    code, body = viewer.post("/api/model", b"0" * 60_000, headers={"X-Filename": "big.onnx"})
    assert code == 413 and "0.05 MB" in body["error"]
    assert viewer.post("/api/model", b"")[0] == 400
    gen = viewer.get("/api/status")[1]["generation"]
    code, body = viewer.post("/api/model", model.read_bytes(), headers={"X-Filename": "again.onnx"})
    assert code == 200 and body["model"] == "again.onnx" and len(body["genes"]) == 14
    import time

    for _ in range(300):
        st = viewer.get("/api/status")[1]
        if st["generation"] == gen + 1 and st["state"] == "ready" and st["model"] == "again.onnx":
            break
        time.sleep(0.1)
    # the same model bytes: its predictions come from the content-keyed cache
    assert st["model"] == "again.onnx" and st["source"] == "cache", st
    assert not list(viewer_cache(viewer).glob(".upload.*"))  # no temporary left behind


def viewer_cache(viewer):
    from pathlib import Path

    args = viewer.proc.args
    return Path(args[args.index("--cache") + 1])


def test_restart_reads_the_cache_and_pred_file_is_served(c6_model, viewer, truth, tmp_path):
    from data_pipelines.io import write_h5ad

    data, model = c6_model
    v = Viewer("--model", model, "--data", data, "--cache", viewer_cache(viewer))
    try:
        st = v.wait_ready()
        assert st["state"] == "ready" and st["source"] == "cache"
    finally:
        assert v.stop() == 0
    write_h5ad(truth, tmp_path / "pred.h5ad")
    v = Viewer("--model", model, "--data", data, "--pred", tmp_path / "pred.h5ad", "--cache", tmp_path / "c")
    try:
        assert v.wait_ready()["source"] == "pred"
        assert v.get(f"/api/spot?id={truth.obs_names[3]}&gene=CD74")[1]["mean"] == float(truth[3, "CD74"].X[0, 0])
    finally:
        v.stop()


def test_slide_mode_grid_tiles_numbers_overlay_and_explain(c6_model, make_slide, tmp_path):
    """An H&E-only slide: the tile grid is predicted by predict_slide's path, clicks land on
    grid squares, the overlay paints squares, and a tile is explained from the slide."""
    import time

    from data_pipelines.wsi import open_slide
    from export.runtime.onnx_model import OnnxEnsemble
    from export.runtime.prediction import predict_slide
    from export.viewer.deepzoom import DeepZoom
    from export.viewer.state import ViewerState, model_digest, open_section

    _, model = c6_model
    make_slide(tmp_path / "s.tif", mpp=0.1, size=(4000, 4000))  # 100 µm tiles = 1000 px
    want = predict_slide(open_slide(tmp_path / "s.tif"), OnnxEnsemble(model), min_coverage=0.5, progress=False)
    state = ViewerState(open_section(slide=tmp_path / "s.tif", min_coverage=0.5), OnnxEnsemble(model), "m.onnx",
                        model_digest(model), tmp_path / "cache", samples=10, progress=False)
    state.deepzoom = DeepZoom(state.section.slide)
    state.start(wait=True)
    assert state.status["state"] == "ready" and state.status["source"] == "predicted", state.status
    spots = state.spots("CD74", "mean")
    assert spots["shape"] == "square" and spots["diameter_px"] == pytest.approx(1000.0)
    assert spots["ids"] == list(want.obs_names) and len(spots["ids"]) >= 4
    x, y = want.obsm["spatial"][0]
    sid = state.spot_at(x + 450, y - 450)  # a corner of the square, outside its inscribed disc
    assert sid == want.obs_names[0]
    s = state.spot(sid, "CD74")
    assert s["mean"] == float(want[sid, "CD74"].X[0, 0]) and s["observed"] is None
    assert s["tissue_coverage"] == float(want.obs["tissue_coverage"].iloc[0])
    img = cv2.imdecode(np.frombuffer(state.overlay_png("CD74", "var_epistemic"), np.uint8), cv2.IMREAD_UNCHANGED)
    k = 2048 / 4000
    assert img[int((y - 450) * k), int((x + 450) * k), 3] == 255  # squares, corners painted
    job = state.explain(sid, "CD74")
    for _ in range(600):
        if job.state in ("done", "error"):
            break
        time.sleep(0.1)
    assert job.state == "done", job.error
    assert job.result["png"][:4] == b"\x89PNG" and job.result["samples"] == 10
    state.close()
