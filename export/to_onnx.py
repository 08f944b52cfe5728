"""Trained ensemble → one ONNX file (needs JAX; the runtime in :mod:`export.runtime` does not).

Graph: ``tiles`` uint8 (B, tile_px, tile_px, 3), dynamic B → the backbone's own input
scaling → backbone (once per test-time view: the model's ``tta`` dihedral views are made
in the graph and their features averaged) → every member's NB head → ``mu`` and ``r``,
each (members, B, genes). Spatial smoothing needs the neighbours' predictions, so it runs
after the graph in NumPy (``metadata_props["smoothing"]``, export.runtime.prediction).
Stain normalisation stays outside the graph (NumPy). ``metadata_props`` carry what a
runtime needs: genes, tile geometry, backbone, NB parameterisation, provenance.

jax2onnx 0.17.1 traps handled here (each guarded by a test in tests/export):
- members are a Python loop + ``jnp.stack`` — ``jax.vmap`` over convolutions exports wrong
  numbers;
- depthwise layers use the grouped convolution, not the CPU shift-and-add path;
- the stale ``value_info`` of residual nets is cleared before saving;
- max-pool padding is explicit ``-inf`` + VALID in the model itself (features/resnet.py);
- ``relu`` arrives as ``Max(x, 0)``, which onnxruntime neither fuses into the convolution nor
  keeps in its blocked NCHWc layout (a reorder out and back in around each of ResNet50's 33):
  :func:`max0_to_relu` rewrites it to ``Relu`` (1.2-1.35x ResNet50 fp32 tiles/s, issue 19).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from flax import nnx

from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path
from export.runtime.onnx_model import ONNX_FORMAT
from stimage_jax.ensemble.model import EnsembleModel, forward, model_provenance

__all__ = ["export_onnx", "to_onnx_proto", "ONNX_FORMAT", "graph_function", "max0_to_relu", "dedupe_initializers"]

TWO_GB = 2 * 1024**3


def _set_depthwise(module, impl: str) -> None:
    for _, sub in nnx.iter_graph(module):
        if hasattr(sub, "depthwise_impl"):
            sub.depthwise_impl = impl


def graph_function(model: EnsembleModel):
    """tiles (B, H, W, 3) uint8 → (mu, r), each (M, B, G): the model's own
    :func:`~stimage_jax.ensemble.model.forward`, which is what gets exported."""
    sources = tuple(model.member_sources)
    return lambda tiles: forward(model.backbones, model.members, sources, model.point, tiles, model.tta)


def max0_to_relu(proto: onnx.ModelProto) -> int:
    """Rewrite every ``Max(x, c)`` with a rank-0 initializer ``c == 0`` to ``Relu(x)`` in place
    (and drop the initializers no node reads any more); returns how many were rewritten.
    Same numbers (max(x, 0) is relu, NaN aside), a graph onnxruntime fuses and keeps blocked."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    done = 0
    for node in g.node:
        if node.op_type != "Max" or len(node.input) != 2:
            continue
        for keep, const in ((0, 1), (1, 0)):
            c = inits.get(node.input[const])
            if c is not None and len(c.dims) == 0 and float(numpy_helper.to_array(c).reshape(-1)[0]) == 0.0:
                x = node.input[keep]
                node.op_type = "Relu"
                del node.input[:]
                node.input.append(x)
                done += 1
                break
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dead = [i for i in g.initializer if i.name not in used]
    for i in dead:
        g.initializer.remove(i)
    return done


def dedupe_initializers(proto: onnx.ModelProto) -> int:
    """Make nodes read one copy of byte-identical initializers (same type, shape and bytes) and
    drop the others, in place; returns how many were dropped. jax2onnx writes a module's
    weights once per call, so test-time augmentation (the backbone called once per view)
    would otherwise store the backbone ``tta`` times (EfficientNet-Lite0 13.7 → 107 MB)."""
    import hashlib

    from onnx import numpy_helper

    g = proto.graph
    keep: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for init in g.initializer:
        a = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), hashlib.sha256(a.tobytes()).hexdigest())
        if key in keep:
            rename[init.name] = keep[key]
        else:
            keep[key] = init.name

    def fix(graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            for attr in node.attribute:  # subgraphs (If/Loop) read outer initializers too
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    fix(sub)

    fix(g)
    for init in [i for i in g.initializer if i.name in rename]:
        g.initializer.remove(init)
    return len(rename)


def to_onnx_proto(model: EnsembleModel, *, opset: int = 23) -> onnx.ModelProto:
    """``model`` as a checked ONNX ModelProto (member-major, format ``ONNX_FORMAT``), not written."""
    cfg = model.config
    emb = model.embedding_sources()
    if emb:
        raise StimageError(f"members trained on precomputed embeddings ({', '.join(s['key'] for s in emb)}) "
                           "take features, not tiles: only tile-input models export to ONNX")
    px = int(cfg["tile_px"])
    mods = [*model.backbones.values(), *model.members]
    for mod in mods:
        _set_depthwise(mod, "conv")  # ONNX runtimes have fast grouped convolutions
        mod.eval()
    batch = jax.export.symbolic_shape("B")[0]
    spec = jax.ShapeDtypeStruct((batch, px, px, 3), jnp.uint8)
    from jax2onnx import to_onnx

    try:
        proto = to_onnx(graph_function(model), [spec], model_name="stimage", opset=opset,
                        input_names=["tiles"], output_names=["mu", "r"])
    finally:
        for mod in mods:  # the caller's model keeps its backend-chosen fast path
            _set_depthwise(mod, "auto")
    del proto.graph.value_info[:]  # jax2onnx leaves stale shapes on residual nets
    max0_to_relu(proto)
    dedupe_initializers(proto)
    meta = {"format": ONNX_FORMAT, "genes": json.dumps(cfg["genes"]), "tile_um": str(cfg["tile_um"]),
            "tile_px": str(px), "backbone": cfg["backbone"], "members": str(cfg["members"]),
            "nb_parameterisation": cfg["nb_parameterisation"], "target": cfg["train"]["loss"],
            "stain_reference": json.dumps(cfg.get("stain")),  # null: raw tiles
            "provenance": json.dumps(model_provenance(cfg)), "model_config": json.dumps(cfg),
            "tta": str(model.tta), "smoothing": json.dumps(model.smoothing)}
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: EnsembleModel, out: str | os.PathLike, *, overwrite: bool = False,
                opset: int = 23) -> Path:
    """Write ``model`` as ONNX to ``out`` (atomically) and return the path."""
    proto = to_onnx_proto(model, opset=opset)
    out = Path(out)
    with atomic_path(out, overwrite=overwrite) as tmp:
        if proto.ByteSize() > TWO_GB:  # protobuf's limit: weights go to a sidecar file
            onnx.save_model(proto, tmp, save_as_external_data=True, location=out.name + ".data")
        else:
            onnx.save_model(proto, tmp)
    return out
