"""``stimage serve``: a model repository over the Open Inference Protocol (KServe v2 REST,
with Triton's binary-tensor extension), dynamic batching and Prometheus metrics.

aiohttp (the HTTP stack ``tritonclient.http.aio`` already brings) with onnxruntime in one
worker thread; no JAX. Why not MLServer or PyTriton: see the README's "Serving" section.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from aiohttp import web

from data_pipelines.errors import StimageError
from export.serving.batcher import Batcher
from export.serving.metrics import Metrics
from export.serving.model import DEFAULT_OUTPUTS, EXTRA_OUTPUTS, Repository, ServedModel
from export.serving.protocol import HEADER_LENGTH, ProtocolError, encode_infer_response, parse_infer_request, \
    requested_outputs

__all__ = ["make_app", "serve", "DEFAULT_MAX_BODY", "is_loopback"]

log = logging.getLogger("stimage.serve")
DEFAULT_MAX_BODY = 64 * 1024 * 1024
VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")  # probes need no token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tiles(m: ServedModel, arrays: dict, datatypes: dict) -> np.ndarray:
    """The one input a model takes, checked (REST and gRPC alike): uint8 (N, px, px, 3), N >= 1."""
    if set(arrays) != {"tiles"}:
        raise ProtocolError(f"model {m.name!r} takes one input 'tiles', the request gives "
                            f"{', '.join(sorted(arrays)) or 'none'}")
    tiles = arrays["tiles"]
    if datatypes.get("tiles") != "UINT8":
        raise ProtocolError(f"input 'tiles' has datatype {datatypes.get('tiles')}; the model takes UINT8 RGB tiles")
    if tiles.ndim != 4 or tiles.shape[1:] != (m.tile_px, m.tile_px, 3):
        raise ProtocolError(f"input 'tiles' has shape {list(tiles.shape)}; the model takes "
                            f"[N, {m.tile_px}, {m.tile_px}, 3] (tiles cut at {m.tile_um} um, resized to "
                            f"{m.tile_px} px)")
    if len(tiles) == 0:
        raise ProtocolError("input 'tiles' has no tiles")
    return np.ascontiguousarray(tiles)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _Server:
    def __init__(self, repo: Repository, *, token: str | None, max_body: int, batching: bool,
                 grpc_address: str | None = None):
        self.repo, self.token, self.max_body, self.batching = repo, token, max_body, batching
        self.grpc_address, self.grpc = grpc_address, None
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")  # one batch at a time
        self.aux = ThreadPoolExecutor(2, thread_name_prefix="interval")  # q_lo/q_hi (scipy), off the event loop
        self.batchers: dict[tuple[str, str], Batcher] = {}
        self.ready = False

    def _label(self, request) -> str:
        """A failure's model label: only loaded names, so random names cannot grow the metrics."""
        name = request.match_info.get("name", "")
        return name if name in self.repo.models else ("" if not name else "_unknown")

    # -- middleware ---------------------------------------------------------------------------------------------
    @web.middleware
    async def guard(self, request: web.Request, handler):
        if self.token is not None and request.path not in OPEN_PATHS:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
                self.metrics.failure(self._label(request), 401)
                return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except ProtocolError as e:
            self.metrics.failure(self._label(request), e.status)
            return _error(e.status, str(e))
        except web.HTTPRequestEntityTooLarge:
            self.metrics.failure(self._label(request), 413)
            return _error(413, f"request body over the {self.max_body}-byte cap (--max-body-mb)")
        except web.HTTPException as e:  # aiohttp's own 404/405 for unknown paths and methods
            if e.status >= 400:
                return _error(e.status, e.reason or "error")
            raise
        except Exception as e:  # noqa: BLE001 - a bug answers 500 and the server keeps serving
            log.exception("request %s %s failed", request.method, request.path)
            self.metrics.failure(self._label(request), 500)
            return _error(500, f"internal error: {type(e).__name__}")

    # -- health and metadata ------------------------------------------------------------------------------------
    async def live(self, request):
        return web.json_response({"live": True})

    async def ready_(self, request):
        return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

    async def server_metadata(self, request):
        return web.json_response({"name": "stimage", "version": VERSION, "extensions": EXTENSIONS})

    def _model(self, request) -> ServedModel:
        return self.lookup(request.match_info["name"], request.match_info.get("version"))

    async def model_metadata(self, request):
        return web.json_response(self._model(request).metadata())

    async def model_ready(self, request):
        self._model(request)
        return web.json_response({"name": request.match_info["name"], "ready": True})

    async def model_config(self, request):  # Triton's configuration extension, read-only
        m = self._model(request)
        return web.json_response({"name": m.name, "platform": "onnxruntime_onnx", "max_batch_size": m.max_batch_size,
                                  "input": [{"name": "tiles", "data_type": "TYPE_UINT8", "dims": m.input_shape[1:]}],
                                  "output": [{"name": n, "data_type": "TYPE_FP32", "dims": m.shapes[n][1:]}
                                             for n in m.outputs],
                                  "dynamic_batching": {"max_queue_delay_microseconds": m.max_delay_us}})

    async def repository_index(self, request):
        rows = [{"name": n, "version": v, "state": "READY"} for n, vs in self.repo.models.items() for v in vs]
        rows += [{"name": k.split("/")[0], **({"version": k.split("/")[1]} if "/" in k else {}), "state": "UNAVAILABLE",
                  "reason": why} for k, why in self.repo.failed.items()]
        return web.json_response(rows)

    async def metrics_(self, request):
        n = sum(len(v) for v in self.repo.models.values())
        return web.Response(text=self.metrics.render(n), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    # -- inference ----------------------------------------------------------------------------------------------
    async def infer(self, request: web.Request):
        t0 = time.perf_counter()
        m = self._model(request)
        if request.content_length is not None and request.content_length > self.max_body:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body, actual_size=request.content_length)
        enc = request.headers.get("Content-Encoding", "identity").lower()
        if enc not in ("identity", ""):
            raise ProtocolError(f"Content-Encoding {enc!r} is not supported (send the body uncompressed)", 415)
        body = await request.read()
        header, arrays = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
        if set(arrays) != {"tiles"}:
            raise ProtocolError(f"model {m.name!r} takes one input 'tiles', the request gives "
                                f"{', '.join(sorted(arrays))}")
        tiles = check_tiles(m, arrays, {t["name"]: t["datatype"] for t in header["inputs"]})
        wanted = requested_outputs(header, m.outputs, DEFAULT_OUTPUTS)
        if not self.ready:
            raise ProtocolError("the server is shutting down", 503)
        out = await self.predict(m, tiles, [n for n, _ in wanted])
        reply = {"model_name": m.name, "model_version": m.version}
        if isinstance(header.get("id"), str):
            reply["id"] = header["id"]
        body, hlen = encode_infer_response(reply, [(n, out[n], b) for n, b in wanted])
        binary = hlen is not None
        self.metrics.request(m.name, m.version, "binary" if request.headers.get(HEADER_LENGTH) or binary else "json",
                             time.perf_counter() - t0, len(tiles))
        return web.Response(body=body, content_type="application/octet-stream" if binary else "application/json",
                            headers={HEADER_LENGTH: str(hlen)} if binary else None)

    async def predict(self, m: ServedModel, tiles: np.ndarray, names) -> dict[str, np.ndarray]:
        if not self.ready:
            raise ProtocolError("the server is shutting down", 503)
        out = await self.batchers[(m.name, m.version)].submit(tiles)
        if any(n in EXTRA_OUTPUTS for n in names):
            out = {**out, **await asyncio.get_running_loop().run_in_executor(self.aux, m.interval, out["mu"], out["r"])}
        return out

    def lookup(self, name: str, version: str | None) -> ServedModel:
        m = self.repo.get(name, version)
        if m is None:
            if name not in self.repo.models:
                why = self.repo.failed.get(name) or next((v for k, v in self.repo.failed.items()
                                                          if k.startswith(name + "/")), None)
                raise ProtocolError(f"unknown model {name!r}" + (f" (not loaded: {why})" if why else ""), 404)
            raise ProtocolError(f"model {name!r} has no version {version!r} (versions: "
                                f"{', '.join(sorted(self.repo.models[name], key=int))})", 404)
        return m

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def on_startup(self, app):
        for name, versions in self.repo.models.items():
            for v, m in versions.items():
                self.batchers[(name, v)] = Batcher(m, self.executor, self.metrics, enabled=self.batching)
        if self.grpc_address:
            from export.serving.grpc_server import start_grpc

            self.grpc, self.grpc_port = await start_grpc(self, self.grpc_address)
        self.ready = True

    async def on_shutdown(self, app):
        self.ready = False  # new requests get 503; queued ones finish below
        if self.grpc is not None:
            await self.grpc.stop(grace=30.0)  # in-flight gRPC calls finish
        await asyncio.gather(*(b.drain() for b in self.batchers.values()))

    async def on_cleanup(self, app):
        self.executor.shutdown(wait=True)
        self.aux.shutdown(wait=True)


def make_app(repo: Repository, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY,
             batching: bool = True, grpc_address: str | None = None) -> web.Application:
    s = _Server(repo, token=token, max_body=max_body, batching=batching, grpc_address=grpc_address)
    app = web.Application(client_max_size=max_body, middlewares=[s.guard])
    app["server"] = s
    r = app.router
    r.add_get("/v2/health/live", s.live)
    r.add_get("/v2/health/ready", s.ready_)
    r.add_get("/v2", s.server_metadata)
    r.add_get("/metrics", s.metrics_)
    r.add_post("/v2/repository/index", s.repository_index)
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(base, s.model_metadata)
        r.add_get(base + "/ready", s.model_ready)
        r.add_get(base + "/config", s.model_config)
        r.add_post(base + "/infer", s.infer)
    app.on_startup.append(s.on_startup)
    app.on_shutdown.append(s.on_shutdown)
    app.on_cleanup.append(s.on_cleanup)
    return app


def serve(repo_path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_body_mb: float = 64, max_batch_size: int | None = None, max_delay_us: int | None = None,
          batching: bool = True, threads: int = 0, grpc_port: int | None = None, print_fn=print) -> None:
    """Load the repository and serve until SIGINT/SIGTERM (in-flight batches finish first)."""
    if not is_loopback(host) and not token:
        raise StimageError(f"--host {host} is not a loopback address: pass --token (or STIMAGE_SERVE_TOKEN) "
                           "so that only bearers of it can call the server")
    if max_body_mb <= 0:
        raise StimageError(f"--max-body-mb must be positive, got {max_body_mb}")
    repo = Repository.load(repo_path, max_batch_size=max_batch_size, max_delay_us=max_delay_us, threads=threads)
    for k, why in repo.failed.items():
        print_fn(f"not loaded: {k}: {why}")
    if not repo.models:
        raise StimageError(f"no model in {repo_path} could be loaded"
                           + (f" ({'; '.join(f'{k}: {v}' for k, v in repo.failed.items())})" if repo.failed else ""))
    grpc_address = None if grpc_port is None else (f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}")
    app = make_app(repo, token=token, max_body=int(max_body_mb * 1024 * 1024), batching=batching,
                   grpc_address=grpc_address)

    async def main():
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=30.0, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the real port when --port 0
        names = ", ".join(f"{n} (v{','.join(sorted(vs, key=int))})" for n, vs in repo.models.items())
        grpc = f", gRPC on {host}:{app['server'].grpc_port}" if grpc_address else ""
        print_fn(f"serving {names} on http://{host}:{bound} (Open Inference Protocol v2; metrics at /metrics){grpc}",
                 flush=True)
        await stop.wait()
        # stop accepting, answer what is queued and in flight (on_shutdown drains the batchers), then close
        await runner.cleanup()

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, web.GracefulExit):
        pass
