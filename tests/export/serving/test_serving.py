"""The exported ensemble behind the Open Inference Protocol, driven by the unmodified
tritonclient on real HER2ST C6 tiles: repository, metadata, infer (binary and JSON tensors),
16 concurrent clients, bad requests, metrics, token, graceful shutdown."""

from __future__ import annotations

import http.client
import json
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from export.runtime.moments import ensemble_moments_np, predictive_interval
from export.runtime.onnx_model import OnnxEnsemble
from export.serving.repo import GRAPH_OUTPUTS, SERVING_FORMAT, serving_graph

from .conftest import Server

pytestmark = [pytest.mark.real_data]
ALL = ("mu", "r", "mean", "var_aleatoric", "var_epistemic", "q_lo", "q_hi")


def _expected(onnx_path, tiles):
    """What export.predict computes for these tiles, batch-major."""
    p = OnnxEnsemble(onnx_path).params(tiles, batch_size=64)
    m = ensemble_moments_np(p["mu"], p["r"])
    lo, hi = predictive_interval(p["mu"], p["r"], 0.8)
    return {"mu": p["mu"].transpose(1, 0, 2), "r": p["r"].transpose(1, 0, 2), "mean": m["mean"],
            "var_aleatoric": m["var_aleatoric"], "var_epistemic": m["var_epistemic"], "q_lo": lo, "q_hi": hi}


def _close(got, want, name, mean=None):
    """1e-5 relative. The epistemic variance, avg (mu_m - mean)^2, is a difference of nearby
    float32 numbers whose last bits onnxruntime changes with the batch's composition: it is
    held to 1e-5 of its natural scale, mean^2 (measured: up to 1e-4 relative at 1e-7 relative in mu)."""
    atol = 1e-6 if mean is None else 1e-5 * np.square(mean) + 1e-6
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= atol + 1e-5 * np.abs(want)), (name, float(err.max()))


def _infer(client, tiles, outputs=ALL, binary=True, **kw):
    inp = httpclient.InferInput("tiles", list(tiles.shape), "UINT8")
    inp.set_data_from_numpy(tiles, binary_data=binary)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs]
    return client.infer("her2st", [inp], outputs=outs, **kw)


def test_config_pbtxt_parses_with_tritons_proto_and_matches_the_graph(exported):
    _, repo = exported
    cfg = text_format.Parse((repo / "her2st" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    graph = onnx.load(str(repo / "her2st" / "1" / "model.onnx"))
    assert cfg.name == "her2st" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    dims = {t.name: [d.dim_value if d.dim_value else -1 for d in t.type.tensor_type.shape.dim]
            for t in [*graph.graph.input, *graph.graph.output]}
    assert [(i.name, list(i.dims), i.data_type) for i in cfg.input] == \
        [("tiles", dims["tiles"][1:], model_config_pb2.TYPE_UINT8)]
    assert [o.name for o in cfg.output] == list(GRAPH_OUTPUTS)
    for o in cfg.output:
        assert list(o.dims) == dims[o.name][1:] and o.data_type == model_config_pb2.TYPE_FP32
        assert dims[o.name][0] == -1  # the batch axis is dynamic
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["format"] == SERVING_FORMAT
    genes = json.loads(cfg.parameters["genes"].string_value)
    assert genes == json.loads(meta["genes"]) and len(genes) == dims["mean"][1]
    assert cfg.parameters["tile_px"].string_value == "32" and float(cfg.parameters["tile_um"].string_value) > 0


def test_serving_graph_equals_the_plain_export_and_numpy_moments(exported, c6_tiles):
    onnx_path, repo = exported
    sess = ort.InferenceSession(str(repo / "her2st" / "1" / "model.onnx"))
    for b in (1, 7, 64):
        got = dict(zip(GRAPH_OUTPUTS, sess.run(list(GRAPH_OUTPUTS), {"tiles": c6_tiles[:b]})))
        want = _expected(onnx_path, c6_tiles[:b])
        for n in GRAPH_OUTPUTS:
            assert got[n].shape[0] == b
            _close(got[n], want[n], n)
    with pytest.raises(Exception, match="plain"):  # a serving graph is not made twice
        serving_graph(repo / "her2st" / "1" / "model.onnx")


def test_health_metadata_and_a_model_that_failed_to_load(server):
    c = httpclient.InferenceServerClient(server.url)
    assert c.is_server_live() and c.is_server_ready()
    assert c.get_server_metadata()["name"] == "stimage"
    assert c.is_model_ready("her2st") and c.is_model_ready("her2st", "1")
    assert not c.is_model_ready("broken") and not c.is_model_ready("her2st", "9")
    meta = c.get_model_metadata("her2st")
    assert meta["inputs"] == [{"name": "tiles", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert {o["name"] for o in meta["outputs"]} == set(ALL)
    assert len(meta["parameters"]["genes"]) == 14 and meta["parameters"]["tile_px"] == 32
    assert c.get_model_config("her2st")["max_batch_size"] == 64
    index = {(m["name"], m["state"]) for m in c.get_model_repository_index()}
    assert ("her2st", "READY") in index and ("broken", "UNAVAILABLE") in index
    assert any("broken" in line for line in server.log)  # reported at start


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_export_predict_on_her2st_tiles(server, exported, c6_tiles, binary):
    c = httpclient.InferenceServerClient(server.url)
    tiles = c6_tiles[:9]
    res = _infer(c, tiles, binary=binary, request_id="c6")
    want = _expected(exported[0], tiles)
    for n in ALL:
        _close(res.as_numpy(n), want[n], n)
    assert res.get_response()["id"] == "c6"
    # no outputs named: the ensemble moments (binary, as tritonclient asks by default)
    inp = httpclient.InferInput("tiles", list(tiles.shape), "UINT8")
    inp.set_data_from_numpy(tiles, binary_data=binary)
    res = c.infer("her2st", [inp], model_version="1")
    assert {o["name"] for o in res.get_response()["outputs"]} == {"mean", "var_aleatoric", "var_epistemic"}
    _close(res.as_numpy("mean"), want["mean"], "mean")


def test_16_concurrent_clients_each_get_their_own_rows(server, exported, c6_tiles):
    want = _expected(exported[0], c6_tiles[:64])
    barrier, errors, results = threading.Barrier(16), [], {}

    def client(i):
        try:
            c = httpclient.InferenceServerClient(server.url)
            rows = slice(4 * i, 4 * i + 1 + i % 4)  # 1..4 tiles each, all different
            barrier.wait(timeout=30)
            for _ in range(3):
                res = _infer(c, c6_tiles[rows], outputs=("mean", "var_epistemic", "mu"), binary=i % 2 == 0)
                results[(i, _)] = True
                for n in ("mean", "var_epistemic", "mu"):
                    _close(res.as_numpy(n), want[n][rows], f"client {i} {n}",
                           want["mean"][rows] if n == "var_epistemic" else None)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{i}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 48
    text = _get(server, "/metrics")[1].decode()
    batches = _metric(text, 'stimage_batch_size_tiles_count{model="her2st",version="1"}')
    requests = _metric(text, 'stimage_inference_requests_total{model="her2st",version="1",protocol="binary"}') + \
        _metric(text, 'stimage_inference_requests_total{model="her2st",version="1",protocol="json"}')
    assert requests >= 48 and batches < requests  # concurrent requests were coalesced


def _metric(text, key):
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key + " "))


def _get(server, path, method="GET", body=None, headers=None):
    host, port = server.url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _binary_body(header: dict, blob: bytes):
    js = json.dumps(header).encode()
    return js + blob, {"Inference-Header-Content-Length": str(len(js)), "Content-Type": "application/octet-stream"}


def _bad_requests(tiles):
    one = tiles[:1]
    good = {"inputs": [{"name": "tiles", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                        "parameters": {"binary_data_size": one.nbytes}}]}
    infer = "/v2/models/her2st/infer"

    def js(d):
        return json.dumps(d).encode(), {"Content-Type": "application/json"}

    def tensor(**kw):
        return js({"inputs": [{"name": "tiles", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12, **kw}]})

    yield "unknown model", infer.replace("her2st", "nope"), *_binary_body(good, one.tobytes()), 404
    yield "model that failed to load", infer.replace("her2st", "broken"), *_binary_body(good, one.tobytes()), 404
    yield "unknown version", "/v2/models/her2st/versions/7/infer", *_binary_body(good, one.tobytes()), 404
    yield "unknown version metadata", "/v2/models/her2st/versions/7", None, {}, 404
    yield "wrong dtype", infer, *_binary_body({"inputs": [{**good["inputs"][0], "datatype": "FP32",
                                                            "parameters": {"binary_data_size": 4 * one.size}}]},
                                              one.astype(np.float32).tobytes()), 400
    yield "wrong tile size", infer, *tensor(), 400
    yield "wrong rank", infer, *js({"inputs": [{"name": "tiles", "datatype": "UINT8", "shape": [3072],
                                                 "data": [0] * 3072}]}), 400
    yield "wrong input name", infer, *js({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                                       "data": one.reshape(-1).tolist()}]}), 400
    yield "data/shape mismatch", infer, *tensor(shape=[1, 32, 32, 3]), 400
    yield "values out of uint8", infer, *js({"inputs": [{"name": "tiles", "datatype": "UINT8",
                                                          "shape": [1, 32, 32, 3], "data": [300] * 3072}]}), 400
    yield "unknown datatype", infer, *tensor(datatype="RGB8"), 400
    yield "unknown output", infer, *js({**json.loads(tensor()[0]), "outputs": [{"name": "p_high"}]}), 400
    yield "no inputs", infer, *js({"inputs": []}), 400
    yield "malformed JSON", infer, b'{"inputs": [', {"Content-Type": "application/json"}, 400
    yield "JSON not an object", infer, b"[1, 2]", {}, 400
    yield "JSON nested too deeply", infer, b'{"inputs": ' + b"[" * 100_000, {}, 400
    yield "binary without header length", infer, _binary_body(good, one.tobytes())[0], {}, 400
    yield "header length not a number", infer, _binary_body(good, one.tobytes())[0], \
        {"Inference-Header-Content-Length": "ten"}, 400
    yield "header length past the body", infer, _binary_body(good, one.tobytes())[0], \
        {"Inference-Header-Content-Length": "999999"}, 400
    yield "header length cuts the JSON", infer, _binary_body(good, one.tobytes())[0], \
        {"Inference-Header-Content-Length": "10"}, 400
    yield "binary data too short", infer, *_binary_body(good, one.tobytes()[:-5]), 400
    yield "binary data too long", infer, *_binary_body(good, one.tobytes() + b"xx"), 400
    yield "binary size disagrees with shape", infer, *_binary_body(
        {"inputs": [{**good["inputs"][0], "parameters": {"binary_data_size": 17}}]}, b"x" * 17), 400
    yield "compressed body", infer, b"\x1f\x8b", {"Content-Encoding": "gzip"}, 415
    yield "body over the cap", infer, b"{" + b" " * (1024 * 1024 + 10) + b"}", {}, 413
    yield "GET on infer", infer.replace("/infer", "/infer"), None, {}, 405
    yield "unknown path", "/v2/nothing", None, {}, 404


def test_every_bad_request_is_4xx_with_an_error_and_the_server_stays_ready(server, c6_tiles):
    for what, path, body, headers, status in _bad_requests(c6_tiles):
        method = "GET" if body is None else "POST"
        got, reply = _get(server, path, method, body, headers)
        assert got == status, (what, got, reply[:300])
        assert isinstance(json.loads(reply)["error"], str) and json.loads(reply)["error"], what
        assert server.ready(), what
    # and through tritonclient: its exception carries the server's message
    c = httpclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException, match=r"\[32, 32, 3\]|32, 32, 3"):
        _infer(c, c6_tiles[:2, :16, :16], outputs=("mean",))
    bad = httpclient.InferInput("tiles", [1, 32, 32, 3], "FP32")
    bad.set_data_from_numpy(c6_tiles[:1].astype(np.float32))
    with pytest.raises(InferenceServerException, match="UINT8"):
        c.infer("her2st", [bad])
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.infer("nope", [bad])
    assert c.is_server_ready() and _infer(c, c6_tiles[:1], outputs=("mean",)).as_numpy("mean").shape == (1, 14)
    text = _get(server, "/metrics")[1].decode()
    assert _metric(text, 'stimage_inference_failures_total{model="her2st",code="400"}') >= 15
    assert 'code="500"' not in text
    assert _metric(text, 'stimage_inference_failures_total{model="_unknown",code="404"}') >= 2  # no label per name


def test_fuzzed_requests_never_answer_5xx(server, c6_tiles):
    """200 seeded mutations of a valid binary request: 2xx or 4xx, never 5xx; still ready."""
    import random

    rng = random.Random(0)
    blob = c6_tiles[0].tobytes()
    for _ in range(200):
        header = {"inputs": [{"name": "tiles", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                              "parameters": {"binary_data_size": len(blob)}}]}
        kind = rng.randrange(6)
        if kind == 0:
            header["inputs"][0][rng.choice(["name", "datatype", "shape", "parameters"])] = rng.choice(
                [None, 7, "x", [], {}, [1, -1], [2 ** 40], {"binary_data_size": -3}, "FP64", [1, 2], {"a": 1}, [[1]]])
        elif kind == 1:
            header = rng.choice([[], 3, "s", None, {"inputs": None}, {"inputs": [None]}, {"outputs": [{"name": 1}]},
                                 {"inputs": header["inputs"], "outputs": [{"name": "mean", "parameters": [1]}]},
                                 {"inputs": header["inputs"], "parameters": {"binary_data_output": {"x": 1}}}])
        js = json.dumps(header).encode()
        body, headers = bytearray(js + blob), {"Inference-Header-Content-Length": str(len(js))}
        if kind == 2:
            for _ in range(rng.randint(1, 20)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        elif kind == 3:
            body = body[:rng.randrange(len(body))]
        elif kind == 4:
            headers["Inference-Header-Content-Length"] = rng.choice(["-1", "x", str(len(body) + 5), "0", ""])
        status, reply = _get(server, "/v2/models/her2st/infer", "POST", bytes(body), headers)
        assert status < 500, (kind, header, reply[:300])
    assert server.ready()


def test_grpc_infer_health_and_bad_requests(server, exported, c6_tiles):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.grpc_url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("her2st")
    assert not c.is_model_ready("broken")
    meta = c.get_model_metadata("her2st")
    assert [(t.name, list(t.shape)) for t in meta.inputs] == [("tiles", [-1, 32, 32, 3])]
    tiles = c6_tiles[10:15]
    inp = grpcclient.InferInput("tiles", list(tiles.shape), "UINT8")
    inp.set_data_from_numpy(tiles)
    res = c.infer("her2st", [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in ALL], request_id="g")
    want = _expected(exported[0], tiles)
    for n in ALL:
        _close(res.as_numpy(n), want[n], n)
    res = c.infer("her2st", [inp], model_version="1")  # no outputs named: the moments
    assert sorted(o.name for o in res.get_response().outputs) == ["mean", "var_aleatoric", "var_epistemic"]
    for bad, dtype, model, match in [(c6_tiles[:1, :16, :16], "UINT8", "her2st", "INVALID_ARGUMENT.*32, 32, 3"),
                                     (c6_tiles[:1].astype(np.float32), "FP32", "her2st", "INVALID_ARGUMENT.*UINT8"),
                                     (c6_tiles[:1], "UINT8", "nope", "NOT_FOUND.*unknown model")]:
        i = grpcclient.InferInput("tiles", list(bad.shape), dtype)
        i.set_data_from_numpy(bad)
        with pytest.raises(InferenceServerException, match=match):
            c.infer(model, [i])
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        c.infer("her2st", [inp], model_version="3")
    assert c.is_server_ready() and server.ready()


def test_metrics_are_prometheus_text(server, c6_tiles):
    c = httpclient.InferenceServerClient(server.url)
    _infer(c, c6_tiles[:3], outputs=("mean",))
    status, body = _get(server, "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("stimage_inference_requests_total", "stimage_inference_failures_total",
                 "stimage_request_duration_seconds", "stimage_batch_size_tiles", "stimage_inference_tiles_total"):
        assert f"# TYPE {name} " in text
    assert _metric(text, 'stimage_request_duration_seconds_bucket{model="her2st",version="1",le="+Inf"}') >= 1
    assert _metric(text, "stimage_models_ready") == 1
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_token_required_and_sigterm_finishes_in_flight_requests(exported, c6_tiles):
    s = Server(exported[1], "--max-delay-us", "200000", env={"STIMAGE_SERVE_TOKEN": "s3cret"})
    try:
        assert s.ready()  # probes need no token
        c = httpclient.InferenceServerClient(s.url)
        with pytest.raises(InferenceServerException, match="bearer"):
            c.get_model_metadata("her2st")
        with pytest.raises(InferenceServerException, match="bearer"):
            c.get_model_metadata("her2st", headers={"Authorization": "Bearer wrong"})
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get_model_metadata("her2st", headers=auth)["name"] == "her2st"
        # requests queued for a 200 ms batch window are answered although SIGTERM arrives meanwhile
        done = []

        def call(i):
            r = _infer(httpclient.InferenceServerClient(s.url), c6_tiles[i:i + 1], outputs=("mean",), headers=auth)
            done.append(r.as_numpy("mean").shape)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        import time

        time.sleep(0.1)
        assert s.stop() == 0
        for t in threads:
            t.join(30)
        assert done == [(1, 14)] * 4
    finally:
        s.stop()


def test_non_loopback_host_needs_a_token(exported, capsys):
    from stimage_jax.cli import main

    assert main(["serve", "--repo", str(exported[1]), "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["serve", "--repo", str(exported[1] / "missing")]) == 2
    assert main(["export-onnx", "--model", str(exported[0]), "--triton-repo", str(exported[1])]) == 2
    assert "--name" in capsys.readouterr().err


def test_served_ensemble_is_a_predictor_and_predicts_the_section_as_the_file_does(server, exported, her2st_c6):
    from export.runtime.prediction import predict_adata
    from export.runtime.predictor import Predictor
    from export.serving.client import ServedEnsemble

    served = ServedEnsemble(server.url, "her2st")
    assert isinstance(served, Predictor) and served.tile_px == 32 and len(served.genes) == 14
    sub = her2st_c6[:40].copy()
    a = predict_adata(sub, served, progress=False)
    b = predict_adata(sub, OnnxEnsemble(exported[0]), progress=False)
    assert list(a.var_names) == list(b.var_names)
    _close(np.asarray(a.X), np.asarray(b.X), "X")
    for k in ("var_aleatoric", "q_lo", "q_hi"):
        _close(np.asarray(a.layers[k]), np.asarray(b.layers[k]), k)
    # The model's defaults (issue 21) travel through the server's metadata: TTA runs inside the
    # served graph, smoothing in the client over the section's spots, as with the local file.
    assert served.tta == 8 and served.smoothing == {"alpha": 0.5, "k": 6} == OnnxEnsemble(exported[0]).smoothing
    assert a.uns["stimage"]["prediction"]["smoothing"] == {"alpha": 0.5, "k": 6}
    raw = predict_adata(sub, served, progress=False, smooth=0.0)
    assert not np.allclose(np.asarray(raw.X), np.asarray(a.X), rtol=1e-3)
    with pytest.raises(Exception, match="unknown model"):
        ServedEnsemble(server.url, "nope")
