"""The Open Inference Protocol over gRPC (Triton's ``inference.GRPCInferenceService``), on the
same event loop, batchers and metrics as the REST server. The service definition is the one
``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2``), so the unmodified
``tritonclient.grpc`` is a client. Health, metadata and ``ModelInfer`` (raw or typed input
contents) are served; the other methods answer UNIMPLEMENTED."""

from __future__ import annotations

import hmac
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from export.serving.model import DEFAULT_OUTPUTS
from export.serving.protocol import DTYPES, NUMPY_TO_OIP, ProtocolError

__all__ = ["start_grpc"]

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
_TYPED = {"UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
          "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
          "FP32": "fp32_contents", "FP64": "fp64_contents", "BOOL": "bool_contents"}


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server):
        self.s = server

    async def _guard(self, context, name: str = ""):
        if self.s.token is None:
            return
        got = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.s.token}".encode()):
            self.s.metrics.failure(name if name in self.s.repo.models else "_unknown", 401)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def _fail(self, context, e: ProtocolError, name: str):
        self.s.metrics.failure(name if name in self.s.repo.models else "_unknown", e.status)
        await context.abort(_CODES.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), str(e))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.s.ready)

    async def ServerMetadata(self, request, context):
        await self._guard(context)
        return pb.ServerMetadataResponse(name="stimage", version="0.1.0", extensions=["model_repository"])

    async def ModelReady(self, request, context):
        await self._guard(context, request.name)
        return pb.ModelReadyResponse(ready=self.s.repo.get(request.name, request.version or None) is not None)

    async def ModelMetadata(self, request, context):
        await self._guard(context, request.name)
        try:
            m = self.s.lookup(request.name, request.version or None)
        except ProtocolError as e:
            await self._fail(context, e, request.name)
        md = m.metadata()
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name, versions=[m.version], platform=md["platform"],
            inputs=[T(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in md["inputs"]],
            outputs=[T(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in md["outputs"]])

    async def ModelInfer(self, request, context):
        t0 = time.perf_counter()
        await self._guard(context, request.model_name)
        try:
            m = self.s.lookup(request.model_name, request.model_version or None)
            raw = list(request.raw_input_contents)
            if raw and len(raw) != len(request.inputs):
                raise ProtocolError(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
            arrays, dtypes = {}, {}
            for i, t in enumerate(request.inputs):
                if t.datatype not in DTYPES:
                    raise ProtocolError(f"input {t.name!r}: datatype {t.datatype!r} is not one of {', '.join(DTYPES)}")
                if any(d < 0 for d in t.shape):
                    raise ProtocolError(f"input {t.name!r}: negative dims in shape {list(t.shape)}")
                dtype, count = np.dtype(DTYPES[t.datatype]), int(np.prod(t.shape, dtype=np.int64))
                if raw:
                    if len(raw[i]) != count * dtype.itemsize:
                        raise ProtocolError(f"input {t.name!r}: shape {list(t.shape)} of {t.datatype} is "
                                            f"{count * dtype.itemsize} bytes, raw_input_contents has {len(raw[i])}")
                    a = np.frombuffer(raw[i], dtype)
                else:
                    values = getattr(t.contents, _TYPED.get(t.datatype, "bytes_contents"))
                    if len(values) != count:
                        raise ProtocolError(f"input {t.name!r}: shape {list(t.shape)} needs {count} values, "
                                            f"contents has {len(values)}")
                    a = np.asarray(values)
                    if dtype.kind in "ui" and len(a) and (a.min() < np.iinfo(dtype).min or a.max() > np.iinfo(dtype).max):
                        raise ProtocolError(f"input {t.name!r}: values out of {t.datatype}'s range")
                    a = a.astype(dtype)
                arrays[t.name], dtypes[t.name] = a.reshape(tuple(t.shape)), t.datatype
            from export.serving.server import check_tiles

            tiles = check_tiles(m, arrays, dtypes)
            names = [o.name for o in request.outputs] or list(DEFAULT_OUTPUTS)
            unknown = [n for n in names if n not in m.outputs]
            if unknown:
                raise ProtocolError(f"unknown output {unknown[0]!r}; the model offers {', '.join(m.outputs)}")
            out = await self.s.predict(m, tiles, names)
        except ProtocolError as e:
            await self._fail(context, e, request.model_name)
        reply = pb.ModelInferResponse(model_name=m.name, model_version=m.version, id=request.id)
        for n in names:
            a = np.ascontiguousarray(out[n])
            reply.outputs.add(name=n, datatype=NUMPY_TO_OIP[a.dtype], shape=list(a.shape))
            reply.raw_output_contents.append(a.tobytes())
        self.s.metrics.request(m.name, m.version, "grpc", time.perf_counter() - t0, len(tiles))
        return reply


async def start_grpc(server, address: str):
    """Start the gRPC service on ``address`` ("host:port", port 0 picks one); returns (server, port)."""
    g = grpc.aio.server(options=[("grpc.max_receive_message_length", server.max_body),
                                 ("grpc.max_send_message_length", 1 << 30)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(server), g)
    port = g.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"cannot bind gRPC to {address}")
    await g.start()
    return g, port
