"""The viewer's ASGI app (Starlette): the page, its static assets (OpenSeadragon is shipped
inside the package: the viewer works offline), Deep Zoom tiles and the JSON API.

Bad requests get a 4xx with ``{"error": "..."}`` (one line) and the server keeps serving;
requests before the predictions are ready get 503. Only loopback ``Host`` headers are
answered (no DNS rebinding), and POSTs must carry ``X-Stimage: 1`` (a custom header a
cross-site page cannot send without a CORS preflight, which is never granted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from data_pipelines.errors import StimageError
from export.viewer.state import ViewerState, _NotReady

__all__ = ["build_app", "STATIC", "LOOPBACK_HOSTS"]

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
log = logging.getLogger(__name__)


def _error(status: int, message) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _guard(fn):
    """StimageError → 400, not ready → 503, anything else → 500 with one line; never a traceback page."""
    async def wrapped(request: Request):
        try:
            return await fn(request)
        except StimageError as e:
            return _error(400, e)
        except _NotReady as e:
            return _error(503, e)
        except Exception as e:
            log.exception("%s failed", request.url.path)
            return _error(500, f"{type(e).__name__}: {e}")
    return wrapped


def _arg(request: Request, name: str, default=None) -> str:
    v = request.query_params.get(name, default)
    if v is None:
        raise StimageError(f"missing query parameter {name!r}")
    return v


def _number(request: Request, name: str) -> float:
    try:
        v = float(_arg(request, name))
    except ValueError:
        raise StimageError(f"query parameter {name!r} must be a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise StimageError(f"query parameter {name!r} must be finite")
    return v


def build_app(state: ViewerState, *, max_upload_mb: float = 512.0, allowed_hosts=None) -> Starlette:
    """The app over a :class:`~export.viewer.state.ViewerState`."""
    from starlette.concurrency import run_in_threadpool

    dz = state.deepzoom

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def dzi(request):
        return Response(dz.dzi(), media_type="application/xml")

    async def tile(request):
        p = request.path_params
        try:
            col, row = (int(v) for v in p["address"].split("_"))
            data = await run_in_threadpool(dz.tile, int(p["level"]), col, row)
        except ValueError:
            return _error(404, "no such tile")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @_guard
    async def status(request):
        st = dict(state.status)
        st.update({"section": state.section.name, "kind": state.section.kind, "model": state.current.name,
                   "width": state.section.slide.width, "height": state.section.slide.height,
                   "mpp": state.section.slide.mpp})
        return JSONResponse(st)

    @_guard
    async def genes(request):
        return JSONResponse(state.genes())

    @_guard
    async def spots(request):
        return JSONResponse(await run_in_threadpool(state.spots, _arg(request, "gene"),
                                                    request.query_params.get("layer", "mean")))

    @_guard
    async def spot(request):
        gene = _arg(request, "gene")
        sid = request.query_params.get("id")
        if sid is None:
            sid = state.spot_at(_number(request, "x"), _number(request, "y"))
            if sid is None:
                return JSONResponse({"spot": None, "gene": gene})
        return JSONResponse(state.spot(sid, gene))

    @_guard
    async def overlay(request):
        data = await run_in_threadpool(state.overlay_png, _arg(request, "gene"),
                                       request.query_params.get("layer", "mean"))
        return Response(data, media_type="image/png")

    def _check_post(request):
        if request.headers.get("x-stimage") != "1":
            raise StimageError("POST requests need the header X-Stimage: 1")

    @_guard
    async def explain(request):
        _check_post(request)
        try:
            body = await request.json()
        except ValueError:
            raise StimageError("the body must be JSON: {\"spot\": ..., \"gene\": ...}") from None
        if not isinstance(body, dict) or not isinstance(body.get("spot"), str) or not isinstance(body.get("gene"), str):
            raise StimageError("the body must be JSON: {\"spot\": ..., \"gene\": ...}")
        samples, seed = body.get("samples"), body.get("seed", 0)
        if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool)):
            raise StimageError("samples must be an integer")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise StimageError("seed must be an integer")
        job = state.explain(body["spot"], body["gene"], samples, seed)
        return JSONResponse(job.status(), status_code=202 if job.state != "done" else 200)

    def _job(request):
        job = state.jobs.get(request.path_params["job"])
        if job is None:
            raise LookupError
        return job

    def _finished(request):
        """(job, None) for a finished explanation, else (None, the 404/409 answer)."""
        try:
            job = _job(request)
        except LookupError:
            return None, _error(404, "no such explanation")
        if job.state != "done":
            return None, _error(409, f"the explanation is {job.state}")
        return job, None

    async def explain_status(request):
        try:
            return JSONResponse(_job(request).status())
        except LookupError:
            return _error(404, "no such explanation")

    async def explain_image(request):
        job, answer = _finished(request)
        if job is None:
            return answer
        return Response(job.result["png"], media_type="image/png")

    async def explain_csv(request):
        import csv
        import io

        job, answer = _finished(request)
        if job is None:
            return answer
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=job.result["columns"], lineterminator="\n")
        w.writeheader()
        w.writerows(job.result["rows"])
        name = f"{job.spot}_{job.gene}_lime.csv"
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @_guard
    async def upload(request):
        """The raw body is an .onnx file (``curl --data-binary @m.onnx -H 'X-Stimage: 1'``);
        validated as ``export.predict`` validates it, size-capped."""
        _check_post(request)
        cap = int(max_upload_mb * (1 << 20))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return _error(413, f"model upload: the file is larger than the {max_upload_mb:g} MB limit")
        name = os.path.basename(request.headers.get("x-filename", "uploaded.onnx")) or "uploaded.onnx"
        state.cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload.", suffix=".onnx", dir=state.cache)
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        return _error(413, f"model upload: the file is larger than the {max_upload_mb:g} MB limit")
                    f.write(chunk)
            if size == 0:
                raise StimageError("model upload: the file is empty")
            model, digest = await run_in_threadpool(_load_onnx, Path(tmp), name)
            final = state.cache / f"model-{digest[:32]}.onnx"
            os.replace(tmp, final)
            model.path = final
            state.switch_model(model, name, digest)
            return JSONResponse({"model": name, "genes": list(model.genes), "digest": digest})
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    routes = [
        Route("/", index),
        Route("/slide.dzi", dzi),
        Route("/slide_files/{level:int}/{address}.jpeg", tile),
        Route("/api/status", status),
        Route("/api/genes", genes),
        Route("/api/spots", spots),
        Route("/api/spot", spot),
        Route("/api/overlay.png", overlay),
        Route("/api/explain", explain, methods=["POST"]),
        Route("/api/explain/{job}", explain_status),
        Route("/api/explain/{job}/image.png", explain_image),
        Route("/api/explain/{job}/nuclei.csv", explain_csv),
        Route("/api/model", upload, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_HOSTS)]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.close()

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def _load_onnx(path: Path, name: str):
    """An uploaded file → (OnnxEnsemble, sha256); errors name the upload, not the temp file."""
    from data_pipelines.fingerprint import file_digest
    from export.runtime.onnx_model import OnnxEnsemble

    try:
        model = OnnxEnsemble(path)
    except StimageError as e:
        raise StimageError("model upload: " + str(e).replace(str(path), name)) from None
    return model, file_digest(path)
