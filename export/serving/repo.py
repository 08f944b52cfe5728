"""An exported ensemble → the batch-major serving graph and a Triton model repository (no JAX).

The serving graph is the plain export (``export.to_onnx``: ``mu``/``r`` member-major,
``(members, B, genes)``) with plain arithmetic appended, so a server that splits a batch
by request (Triton, any Open Inference Protocol server) returns per-request rows:

- ``tiles`` UINT8 ``[-1, tile_px, tile_px, 3]`` (unchanged);
- ``mu``, ``r`` FP32 ``[-1, members, genes]`` (transposed);
- ``mean``, ``var_aleatoric``, ``var_epistemic`` FP32 ``[-1, genes]``: the ensemble moments
  of :func:`export.runtime.moments.ensemble_moments_np` (float32 in the graph).

The plain export keeps its member-major layout (format ``stimage-jax-onnx/1``, read by
``export.predict`` and the Node consumer); the serving graph is derived from it (so an
existing ``.onnx`` needs no JAX to become a repository) and says ``stimage-jax-onnx-serving/1``.

``write_triton_repo`` writes ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/VERSION/model.onnx``,
a repository NVIDIA Triton loads as it is (``platform: "onnxruntime_onnx"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["SERVING_FORMAT", "MOMENT_OUTPUTS", "GRAPH_OUTPUTS", "serving_graph", "write_triton_repo", "check_repo_args",
           "config_pbtxt"]

SERVING_FORMAT = "stimage-jax-onnx-serving/1"
MOMENT_OUTPUTS = ("mean", "var_aleatoric", "var_epistemic")
GRAPH_OUTPUTS = ("mu", "r", *MOMENT_OUTPUTS)
PARAMETER_KEYS = ("genes", "tile_um", "tile_px", "members", "backbone", "stain_reference", "target",
                  "nb_parameterisation", "tta", "smoothing")


def _load(model) :
    import onnx

    if isinstance(model, onnx.ModelProto):
        return onnx.ModelProto.FromString(model.SerializeToString())  # never edit the caller's proto
    path = Path(model)
    if not path.is_file():
        raise StimageError(f"model file {path} not found")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - onnx raises protobuf's untyped errors
        raise StimageError(f"{path} is not an ONNX file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") \
            from None


def serving_graph(model) -> "onnx.ModelProto":  # noqa: F821
    """The plain export (path or ModelProto, member-major) → the batch-major serving graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.runtime.onnx_model import ONNX_FORMAT

    proto = _load(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != ONNX_FORMAT:
        raise StimageError(f"the model's format is {meta.get('format')!r}: a serving graph is made from a plain "
                           f"{ONNX_FORMAT!r} export (stimage export-onnx --out)")
    g = proto.graph
    outs = {o.name: o for o in g.output}
    if set(outs) != {"mu", "r"}:
        raise StimageError(f"the graph's outputs are {sorted(outs)}, expected mu and r")
    dims = [d.dim_value or None for d in outs["mu"].type.tensor_type.shape.dim]
    members, genes = dims[0], dims[2]
    if not members or not genes:
        raise StimageError("the graph's mu output has no static (members, genes) dims")
    inner = {"mu": "_mu_member_major", "r": "_r_member_major"}
    for node in g.node:  # rename the plain outputs; the serving names go to the new nodes
        node.output[:] = [inner.get(o, o) for o in node.output]
        node.input[:] = [inner.get(i, i) for i in node.input]
    del g.output[:]
    g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "_member_axis"))
    g.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "_zero"))
    mu, r = inner["mu"], inner["r"]
    nodes = [
        helper.make_node("Transpose", [mu], ["mu"], perm=[1, 0, 2]),
        helper.make_node("Transpose", [r], ["r"], perm=[1, 0, 2]),
        helper.make_node("ReduceMean", [mu, "_member_axis"], ["mean"], keepdims=0),
        # var_m = mu + mu^2 / r; r = inf marks a point prediction (--target log1p): no aleatoric
        # variance, as export.runtime.prediction.build_prediction says
        helper.make_node("Mul", [mu, mu], ["_mu_sq"]),
        helper.make_node("Div", ["_mu_sq", r], ["_mu_sq_over_r"]),
        helper.make_node("Add", [mu, "_mu_sq_over_r"], ["_nb_var"]),
        helper.make_node("IsInf", [r], ["_point"]),
        helper.make_node("Where", ["_point", "_zero", "_nb_var"], ["_member_var"]),
        helper.make_node("ReduceMean", ["_member_var", "_member_axis"], ["var_aleatoric"], keepdims=0),
        helper.make_node("ReduceMean", [mu, "_member_axis"], ["_mean_keep"], keepdims=1),
        helper.make_node("Sub", [mu, "_mean_keep"], ["_dev"]),
        helper.make_node("Mul", ["_dev", "_dev"], ["_dev_sq"]),
        helper.make_node("ReduceMean", ["_dev_sq", "_member_axis"], ["var_epistemic"], keepdims=0),
    ]
    g.node.extend(nodes)
    batch = g.input[0].type.tensor_type.shape.dim[0].dim_param or "B"
    g.output.extend([helper.make_tensor_value_info("mu", TensorProto.FLOAT, [batch, members, genes]),
                     helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, members, genes]),
                     *[helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, genes]) for n in MOMENT_OUTPUTS]])
    del proto.metadata_props[:]
    for k, v in {**meta, "format": SERVING_FORMAT, "layout": "batch-major"}.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    return proto


def _pb_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string literal is a valid protobuf text-format string literal


def config_pbtxt(proto, name: str, max_batch_size: int = 64, max_queue_delay_us: int = 2000) -> str:
    """Triton's ``config.pbtxt`` for a serving graph: dims without the batch axis, the
    model's genes / tile geometry / stain reference as ``parameters``."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != SERVING_FORMAT:
        raise StimageError(f"config.pbtxt is written for a serving graph, not {meta.get('format')!r}")
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim][1:] for o in proto.graph.output}
    inp = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:]
    if not all(inp):  # the tile size is in the metadata when the graph leaves it symbolic
        px = int(meta["tile_px"])
        inp = [px, px, 3]

    def tensor(n, dtype, dims):
        return f'  {{\n    name: "{n}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'

    lines = [f"name: {_pb_string(name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {int(max_batch_size)}",
             "input [", tensor("tiles", "TYPE_UINT8", inp), "]",
             "output [", ",\n".join(tensor(n, "TYPE_FP32", shapes[n]) for n in GRAPH_OUTPUTS), "]",
             "dynamic_batching {", f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}", "}"]
    for k in PARAMETER_KEYS:
        if k in meta:
            lines.append(f"parameters {{\n  key: {_pb_string(k)}\n  value: {{ string_value: {_pb_string(meta[k])} }}\n}}")
    return "\n".join(lines) + "\n"


def check_repo_args(name: str, version: int = 1, max_batch_size: int = 64) -> None:
    """The model's name (a folder and a URL part), version and max batch size, before any write."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", name or "") or name in (".", ".."):
        raise StimageError(f"model name {name!r}: use letters, digits, '_', '-' (it is a folder and a URL part)")
    if int(version) < 1:
        raise StimageError(f"--version must be a positive integer, got {version}")
    if not 1 <= int(max_batch_size) <= 4096:
        raise StimageError(f"--max-batch-size must be in 1..4096, got {max_batch_size}")


def write_triton_repo(model, repo: str | os.PathLike, name: str, *, version: int = 1, max_batch_size: int = 64,
                      overwrite: bool = False) -> Path:
    """Write ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/VERSION/model.onnx`` from a plain
    export (path or ModelProto); returns the model's folder."""
    import onnx

    from data_pipelines.io import atomic_path

    check_repo_args(name, version, max_batch_size)
    proto = serving_graph(model)
    folder = Path(repo) / name
    onnx_out = folder / str(int(version)) / "model.onnx"
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(onnx_out, overwrite=overwrite) as tmp:
        if proto.ByteSize() > 2 * 1024**3:  # protobuf's limit: weights go to a sidecar file
            onnx.save_model(proto, tmp, save_as_external_data=True, location="model.onnx.data")
        else:
            onnx.save_model(proto, tmp)
    with atomic_path(folder / "config.pbtxt", overwrite=True) as tmp:
        Path(tmp).write_text(config_pbtxt(proto, name, max_batch_size))
    return folder
