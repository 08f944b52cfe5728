"""ONNX export and the JAX-free runtime: parity with JAX, the jax2onnx traps, bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anndata as ad
import jax.numpy as jnp
import numpy as np
import pandas as pd
import onnx
import pytest

from data_pipelines import keys
from data_pipelines.errors import StimageError
from export.predict import OnnxEnsemble
from export.to_onnx import export_onnx, graph_function
from stimage_jax.cli import main
from stimage_jax.ensemble.model import EnsembleModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jax2onnx internals


def _train(paths, wd, *extra):
    args = ["train", "--quiet", "--data", *map(str, paths), "--workdir", str(wd), "--backbone", "tiny",
            "--tile-px", "32", "--lr", "3e-2", "--max-epochs", "5", "--genes", "A,B,C", *extra]
    assert main(args) == 0
    return wd


def _max_rel(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))


@pytest.mark.parametrize("extra", [["--members", "2"], ["--members", "2", "--fine-tune"],
                                   ["--members", "1", "--backbone", "tiny,resnet_tiny"]],
                         ids=["frozen", "fine-tuned", "two-backbones"])
def test_parity_with_jax_at_batch_1_7_64(synthetic_study, tmp_path, extra):
    wd = _train(synthetic_study[:2], tmp_path / "wd", *extra)
    assert main(["export-onnx", "--model", str(wd), "--out", str(tmp_path / "m.onnx")]) == 0
    model = EnsembleModel.load(wd)
    onx = OnnxEnsemble(tmp_path / "m.onnx")
    assert onx.genes == ["A", "B", "C"] and onx.tile_px == 32
    tiles = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    fn = graph_function(model)
    for b in (1, 7, 64):
        mu_j, r_j = (np.asarray(v) for v in fn(jnp.asarray(tiles[:b])))
        out = onx.params(tiles[:b], batch_size=b)
        mu_o, r_o = out["mu"], out["r"]
        assert mu_o.shape == (2, b, 3)
        # Fine-tuned members each carry their own convolutions: a vmap'ed export would differ here
        assert _max_rel(mu_o, mu_j) <= 1e-4 and _max_rel(r_o, r_j) <= 1e-4


def test_saved_graph_has_no_stale_value_info_and_carries_metadata(synthetic_study, tmp_path):
    wd = _train(synthetic_study[:2], tmp_path / "wd")
    path = export_onnx(EnsembleModel.load(wd), tmp_path / "m.onnx")
    proto = onnx.load(path)
    assert len(proto.graph.value_info) == 0
    meta = {p.key: p.value for p in proto.metadata_props}
    for k in ("format", "genes", "tile_um", "tile_px", "backbone", "nb_parameterisation", "provenance", "stain_reference"):
        assert k in meta
    inp = proto.graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8 and inp.shape.dim[0].dim_param  # dynamic batch
    with pytest.raises(StimageError, match="already exists"):
        export_onnx(EnsembleModel.load(wd), path)


def test_onnx_runtime_needs_no_jax_and_matches_jax_predict(synthetic_study, tmp_path):
    wd = _train(synthetic_study[:2], tmp_path / "wd", "--members", "3")
    onnx_path = tmp_path / "m.onnx"
    export_onnx(EnsembleModel.load(wd), onnx_path)
    jax_out, onnx_out = tmp_path / "jax.h5ad", tmp_path / "onnx.h5ad"
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(synthetic_study[2]), "--out", str(jax_out)]) == 0
    code = textwrap.dedent(f"""
        import sys
        for name in ("jax", "jaxlib", "flax", "optax", "orbax", "jax2onnx"):
            sys.modules[name] = None  # importing any of them now fails
        from export.predict import main
        sys.exit(main(["--quiet", "--model", {str(onnx_path)!r}, "--data", {str(synthetic_study[2])!r},
                       "--out", {str(onnx_out)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = ad.read_h5ad(jax_out), ad.read_h5ad(onnx_out)
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    assert set(a.layers) == set(b.layers) == {keys.VAR_ALEATORIC, keys.VAR_EPISTEMIC, keys.Q_LO, keys.Q_HI}
    np.testing.assert_allclose(b.X, a.X, rtol=1e-4)
    np.testing.assert_allclose(b.layers[keys.VAR_EPISTEMIC], a.layers[keys.VAR_EPISTEMIC], rtol=1e-3, atol=1e-6)
    assert b.uns[keys.STIMAGE_UNS]["prediction"]["runtime"] == "onnxruntime"
    assert a.uns[keys.STIMAGE_UNS]["prediction"]["runtime"] == "jax"
    # The whole AnnData agrees, not only the numbers: one prediction path for both runtimes.
    assert keys.TISSUE_COVERAGE in a.obs
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert set(a.obsm) == set(b.obsm) == {keys.SPATIAL, keys.MEMBER_MU, keys.MEMBER_R}
    np.testing.assert_array_equal(a.obsm[keys.SPATIAL], b.obsm[keys.SPATIAL])
    for k in (keys.MEMBER_MU, keys.MEMBER_R):
        np.testing.assert_allclose(b.obsm[k], a.obsm[k], rtol=1e-4)
    for k in a.layers:
        np.testing.assert_allclose(b.layers[k], a.layers[k], rtol=1e-3, atol=1e-5)
    assert set(a.uns) == set(b.uns) and set(a.uns[keys.STIMAGE_UNS]) == set(b.uns[keys.STIMAGE_UNS])
    pa, pb = dict(a.uns[keys.STIMAGE_UNS]["prediction"]), dict(b.uns[keys.STIMAGE_UNS]["prediction"])
    pb.pop("providers")
    pa.pop("runtime"), pb.pop("runtime")
    assert set(pa) == set(pb)
    for k in pa:
        np.testing.assert_equal(np.asarray(pa[k]), np.asarray(pb[k]))


def test_stimage_predict_delegates_to_onnx(synthetic_study, tmp_path, capsys):
    wd = _train(synthetic_study[:2], tmp_path / "wd")
    export_onnx(EnsembleModel.load(wd), tmp_path / "m.onnx")
    assert main(["predict", "--quiet", "--model", str(tmp_path / "m.onnx"), "--data", str(synthetic_study[2]),
                 "--out", str(tmp_path / "p.h5ad")]) == 0
    assert "CPUExecutionProvider" in capsys.readouterr().out


def test_bad_models_and_tiles(synthetic_study, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(StimageError, match="not an ONNX model"):
        OnnxEnsemble(junk)
    from onnx import helper, TensorProto
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(StimageError, match="not a stimage model"):
        OnnxEnsemble(tmp_path / "plain.onnx")
    wd = _train(synthetic_study[:2], tmp_path / "wd")
    onx = OnnxEnsemble(export_onnx(EnsembleModel.load(wd), tmp_path / "m.onnx"))
    with pytest.raises(StimageError, match=r"tiles have shape \(16, 16, 3\), the model expects \(32, 32, 3\)"):
        onx.params(np.zeros((2, 16, 16, 3), np.uint8))
    assert main(["predict", "--model", str(junk), "--data", str(synthetic_study[2]),
                 "--out", str(tmp_path / "x.h5ad")]) == 2


def test_large_models_use_external_data(synthetic_study, tmp_path, monkeypatch):
    import export.to_onnx as to_onnx_mod

    wd = _train(synthetic_study[:2], tmp_path / "wd")
    monkeypatch.setattr(to_onnx_mod, "TWO_GB", 1)  # pretend the tiny model is over protobuf's 2 GB
    path = export_onnx(EnsembleModel.load(wd), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 1000  # tensors >= 1 KB moved out
    tiles = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mu_j, _ = graph_function(EnsembleModel.load(wd))(jnp.asarray(tiles))
    np.testing.assert_allclose(OnnxEnsemble(path).params(tiles)["mu"], np.asarray(mu_j), rtol=1e-4)


def test_unrunnable_opset_is_a_clear_error(synthetic_study, tmp_path):
    wd = _train(synthetic_study[:2], tmp_path / "wd")
    proto = onnx.load(export_onnx(EnsembleModel.load(wd), tmp_path / "m.onnx"))
    proto.opset_import[0].version = 99  # from the future
    onnx.save(proto, tmp_path / "future.onnx")
    with pytest.raises(StimageError, match="not an ONNX model onnxruntime can run"):
        OnnxEnsemble(tmp_path / "future.onnx")


def test_export_leaves_the_models_fast_path_alone(synthetic_study, tmp_path):
    from flax import nnx

    wd = _train(synthetic_study[:2], tmp_path / "wd", "--members", "1")
    model = EnsembleModel.load(wd)
    export_onnx(model, tmp_path / "m.onnx")
    impls = {sub.depthwise_impl for _, sub in nnx.iter_graph(model.backbone) if hasattr(sub, "depthwise_impl")}
    assert impls == {"auto"}
