"""The Open Inference Protocol (KServe v2) REST body: JSON tensors and Triton's binary-tensor
extension, both ways. Pure functions on bytes and NumPy; every malformed request raises
:class:`ProtocolError` (answered 4xx with ``{"error": ...}``)."""

from __future__ import annotations

import json
import math

import numpy as np

__all__ = ["ProtocolError", "DTYPES", "parse_infer_request", "encode_infer_response", "HEADER_LENGTH"]

HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
NUMPY_TO_OIP = {np.dtype(v): k for k, v in DTYPES.items()}


class ProtocolError(ValueError):
    """A bad request: ``status`` is the HTTP code (400 unless said)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _json_header(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    if header_length is None:
        raw, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not an integer") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        raw, rest = body[:n], body[n:]
    try:
        header = json.loads(raw)
    except RecursionError:
        raise ProtocolError("the request's JSON is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"the request's JSON is malformed ({e})"
                            + ("" if header_length else f"; binary tensors need the {HEADER_LENGTH} header")) from None
    if not isinstance(header, dict):
        raise ProtocolError("the request's JSON must be an object")
    return header, memoryview(rest)


def _shape(t: dict, name: str) -> tuple[int, ...]:
    shape = t.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape)):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return tuple(shape)


def _flatten(data, name: str) -> list:
    out, stack = [], [data]
    while stack:  # iterative: a deeply nested list must not overflow the recursion limit
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            out.append(x)
    return out


def _json_values(values: list, dtype: np.dtype, name: str) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if not all(isinstance(v, int) and not isinstance(v, bool) and info.min <= v <= info.max for v in values):
            raise ProtocolError(f"input {name!r}: {NUMPY_TO_OIP[dtype]} data must be integers in "
                                f"[{info.min}, {info.max}]")
    elif dtype.kind == "b":
        if not all(isinstance(v, bool) for v in values):
            raise ProtocolError(f"input {name!r}: BOOL data must be true/false")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ProtocolError(f"input {name!r}: {NUMPY_TO_OIP[dtype]} data must be numbers")
    return np.asarray(values, dtype)


def parse_infer_request(body: bytes, header_length: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """body (+ the Inference-Header-Content-Length header) → (JSON header, {input name: array})."""
    header, rest = _json_header(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request has no 'inputs' list")
    arrays, offset = {}, 0
    for t in inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ProtocolError("every input needs a 'name'")
        name = t["name"]
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        dt = t.get("datatype")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise ProtocolError(f"input {name!r}: datatype {dt!r} is not one of {', '.join(DTYPES)}")
        dtype = np.dtype(DTYPES[dt])
        shape = _shape(t, name)
        count = math.prod(shape)
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if "data" in t:
                raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size")
            if offset + size > len(rest):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the body "
                                    f"({len(rest) - offset} bytes left)")
            if size != count * dtype.itemsize:
                raise ProtocolError(f"input {name!r}: shape {list(shape)} of {dt} is {count * dtype.itemsize} bytes, "
                                    f"binary_data_size says {size}")
            arrays[name] = np.frombuffer(rest[offset:offset + size], dtype).reshape(shape)
            offset += size
        else:
            if "data" not in t:
                raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
            values = _flatten(t["data"], name)
            if len(values) != count:
                raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} values, 'data' has {len(values)}")
            arrays[name] = _json_values(values, dtype, name).reshape(shape)
    if offset != len(rest):
        raise ProtocolError(f"the body has {len(rest) - offset} bytes after the inputs' binary data")
    return header, arrays


def requested_outputs(header: dict, available: tuple[str, ...], default: tuple[str, ...]) -> list[tuple[str, bool]]:
    """[(name, binary)] the request asks for (the model's default outputs when it names none)."""
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("the request's 'parameters' must be an object")
    binary_default = params.get("binary_data_output", False) is True
    outs = header.get("outputs")
    if outs is None:
        return [(n, binary_default) for n in default]
    if not isinstance(outs, list):
        raise ProtocolError("'outputs' must be a list")
    result = []
    for o in outs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise ProtocolError("every requested output needs a 'name'")
        if o["name"] not in available:
            raise ProtocolError(f"unknown output {o['name']!r}; the model offers {', '.join(available)}")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise ProtocolError(f"output {o['name']!r}: 'parameters' must be an object")
        if p.get("classification"):
            raise ProtocolError("the classification extension is not supported")
        result.append((o["name"], p.get("binary_data", binary_default) is True))
    return result


def encode_infer_response(header: dict, outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """{model_name, ...} + [(name, array, binary)] → (body, JSON header length or None when no binary)."""
    tensors, blobs = [], []
    for name, arr, binary in outputs:
        arr = np.ascontiguousarray(arr)
        t = {"name": name, "datatype": NUMPY_TO_OIP[arr.dtype], "shape": list(arr.shape)}
        if binary:
            blob = arr.tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    js = json.dumps({**header, "outputs": tensors}, separators=(",", ":")).encode()
    if not blobs:
        return js, None
    return b"".join([js, *blobs]), len(js)
