"""Backbones: shapes, input scaling, parameter counts, ImageNet behaviour, weight import."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from scipy.signal import correlate
from skimage import data
from skimage.transform import resize

from data_pipelines.errors import StimageError
from stimage_jax.features import BACKBONES, DEFAULT_WEIGHTS, create_backbone, load_weights
from stimage_jax.features.registry import shared_dir

# torchvision's constants, written out here rather than imported from the code under test
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@nnx.jit
def forward(model, x):
    return model(x)


# --- a torchvision-layout state dict generator and an independent NumPy ResNet --------------

def torchvision_like_state_dict(rng, stages=(1, 1, 1, 1), width=4, classes=5):
    """Random ResNet (Bottleneck, v1.5) weights with torchvision names and OIHW layout."""
    sd = {}

    def conv(name, o, i, k):
        sd[name] = (rng.standard_normal((o, i, k, k), np.float32) / np.sqrt(i * k * k)).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.asarray(7, np.int64)

    conv("conv1.weight", width, 3, 7)
    bn("bn1", width)
    cin = width
    for i, n in enumerate(stages):
        w = width * 2**i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            conv(f"{p}.conv1.weight", w, cin, 1), bn(f"{p}.bn1", w)
            conv(f"{p}.conv2.weight", w, w, 3), bn(f"{p}.bn2", w)
            conv(f"{p}.conv3.weight", 4 * w, w, 1), bn(f"{p}.bn3", 4 * w)
            if j == 0:
                conv(f"{p}.downsample.0.weight", 4 * w, cin, 1), bn(f"{p}.downsample.1", 4 * w)
            cin = 4 * w
    sd["fc.weight"] = rng.normal(0, 0.1, (classes, cin)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.1, classes).astype(np.float32)
    return sd


def _conv(x, w, stride, pad):
    """x (C, H, W), w (O, I, k, k) → (O, H', W'), cross-correlation like torch.nn.Conv2d."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out = np.stack([sum(correlate(x[i], w[o, i], mode="valid") for i in range(w.shape[1]))
                    for o in range(w.shape[0])])
    return out[:, ::stride, ::stride]


def _bn(x, sd, p, eps=1e-5):
    g, b, m, v = (sd[f"{p}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + eps) * g[:, None, None] + b[:, None, None]


def _maxpool(x):
    """torch MaxPool2d(3, stride=2, padding=1) on (C, H, W)."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    return np.stack([[[x[c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(w)] for i in range(h)]
                     for c in range(x.shape[0])])


def numpy_resnet(img_chw, sd, stages):
    """torchvision ResNet v1.5 forward (stride on conv2) → logits (classes,)."""
    relu = lambda a: np.maximum(a, 0)
    x = _maxpool(relu(_bn(_conv(img_chw, sd["conv1.weight"], 2, 3), sd, "bn1")))
    for i, n in enumerate(stages):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            s = 2 if (j == 0 and i > 0) else 1
            h = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], 1, 0), sd, f"{p}.bn1"))
            h = relu(_bn(_conv(h, sd[f"{p}.conv2.weight"], s, 1), sd, f"{p}.bn2"))
            h = _bn(_conv(h, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3")
            idt = (_bn(_conv(x, sd[f"{p}.downsample.0.weight"], s, 0), sd, f"{p}.downsample.1")
                   if f"{p}.downsample.0.weight" in sd else x)
            x = relu(h + idt)
    return sd["fc.weight"] @ x.mean((1, 2)) + sd["fc.bias"]


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """(path, state dict) of a random resnet_tiny (width 4, 5 classes) in torchvision layout."""
    sd = torchvision_like_state_dict(np.random.default_rng(0))
    path = tmp_path_factory.mktemp("weights") / "resnet_tiny.safetensors"
    save_file(sd, str(path))
    return path, sd


@pytest.fixture(scope="module")
def models(resnet_file):
    """tiny (random init) and resnet_tiny (imported, ImageNet head dropped) as feature extractors."""
    return {"tiny": create_backbone("tiny", rngs=nnx.Rngs(0)),
            "resnet_tiny": create_backbone("resnet_tiny", rngs=nnx.Rngs(0), weights=resnet_file[0])}


# --- shapes, scaling, eval mode ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "resnet_tiny"])
@pytest.mark.parametrize("batch", [1, 3])
def test_feature_shapes(models, name, batch):
    m = models[name]
    x = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    out = np.asarray(forward(m, jnp.asarray(x)))
    assert out.shape == (batch, m.num_features)
    assert np.isfinite(out).all() and np.ptp(out) > 0  # not a constant (dead) output
    assert m.num_features == {"tiny": 16, "resnet_tiny": 128}[name]


def test_eval_mode_jit_and_odd_sizes(models):
    """Eval BatchNorm makes a tile's features independent of its batch; jit equals eager."""
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, 45, 33, 3), dtype=np.uint8))
    for name, m in models.items():
        batched = np.asarray(forward(m, x))
        single = np.asarray(m(x[1:2]) if name == "tiny" else forward(m, x[1:2]))  # tiny: eager
        np.testing.assert_allclose(single[0], batched[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_normalize(name):
    m = nnx.eval_shape(lambda: BACKBONES[name](rngs=nnx.Rngs(0)))  # normalize needs no weights
    lo_hi = {"efficientnet_lite0": (np.full(3, -1.0), np.full(3, 1.0)),
             "resnet50": (-MEAN / STD, (1 - MEAN) / STD), "resnet_tiny": (-MEAN / STD, (1 - MEAN) / STD),
             "tiny": (np.zeros(3), np.ones(3))}[name]
    for dtype in (np.uint8, np.float32):
        x = jnp.asarray(np.array([0, 255], dtype)[:, None, None, None] * np.ones((2, 1, 1, 3), dtype))
        y = m.normalize(x)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y)[:, 0, 0], np.stack(lo_hi), rtol=1e-6, atol=1e-6)


def test_default_weights_point_at_shared(monkeypatch):
    assert DEFAULT_WEIGHTS["resnet50"] is None
    assert DEFAULT_WEIGHTS["efficientnet_lite0"] == shared_dir() / "weights" / "efficientnet_lite0_imagenet.safetensors"
    monkeypatch.setenv("STIMAGE_SHARED", "/somewhere/else")
    assert shared_dir() == Path("/somewhere/else")
    monkeypatch.delenv("STIMAGE_SHARED")
    assert shared_dir() == Path(__file__).resolve().parents[3].parent / "shared"


# --- parameter counts -------------------------------------------------------------------------

def test_efficientnet_lite0_parameter_count():
    lite = nnx.eval_shape(lambda: BACKBONES["efficientnet_lite0"](rngs=nnx.Rngs(0), num_classes=1000))
    assert n_params(lite) == 4_652_008  # d-li14/efficientnet-lite.pytorch: "4.652M"
    assert lite.num_features == 1280


def test_resnet50_count_import_and_features(tmp_path):
    """Full-size ResNet50 against a torchvision-layout file: 25,557,032 parameters, (B, 2048)."""
    sd = torchvision_like_state_dict(np.random.default_rng(0), stages=(3, 4, 6, 3), width=64, classes=1000)
    in_file = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert in_file == 25_557_032  # torchvision.models.resnet50(): sum(p.numel() for p in m.parameters())
    path = tmp_path / "resnet50.safetensors"
    save_file(sd, str(path))
    del sd
    assert n_params(create_backbone("resnet50", rngs=nnx.Rngs(0), weights=path, num_classes=1000)) == 25_557_032
    m = create_backbone("resnet50", rngs=nnx.Rngs(0), weights=path)  # fc in the file is skipped
    out = np.asarray(forward(m, jnp.zeros((2, 64, 64, 3), jnp.uint8) + 128))
    assert m.num_features == 2048 and out.shape == (2, 2048) and np.isfinite(out).all()


# --- weight import ------------------------------------------------------------------------------

def test_resnet_import_matches_numpy_reference(resnet_file):
    path, sd = resnet_file
    m = create_backbone("resnet_tiny", rngs=nnx.Rngs(0), num_classes=5, weights=path)
    img = np.random.default_rng(3).integers(0, 256, size=(33, 37, 3)).astype(np.float32)  # odd: padding
    got = np.asarray(m.classify(m(jnp.asarray(img[None]))))[0]
    ref = numpy_resnet(((img / 255.0 - MEAN) / STD).transpose(2, 0, 1), sd, (1, 1, 1, 1))
    assert np.abs(ref).max() > 0.1  # the comparison is not between near-zeros
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_import_errors(resnet_file, tmp_path):
    path, sd = resnet_file

    def write(d, name="x.safetensors"):
        save_file(d, str(tmp_path / name))
        return tmp_path / name

    def load(p, name="resnet_tiny", **kw):
        create_backbone(name, rngs=nnx.Rngs(0), weights=p, **kw)

    with pytest.raises(StimageError, match=r"^unknown backbone 'vgg16'; choose from efficientnet_lite0, resnet50"):
        create_backbone("vgg16", rngs=nnx.Rngs(0))
    with pytest.raises(StimageError, match=r"1 weight\(s\) missing for resnet_tiny, first 'layer2.0.conv2.weight'"):
        load(write({k: v for k, v in sd.items() if k != "layer2.0.conv2.weight"}))
    no_fc = write({k: v for k, v in sd.items() if not k.startswith("fc.")})
    with pytest.raises(StimageError, match="missing.*'fc.weight'"):  # a classifier was asked for
        load(no_fc, num_classes=5)
    load(no_fc)  # a feature extractor needs no fc
    with pytest.raises(StimageError, match=r"'fc.weight' has shape \(5, 3\), expected \(5, 128\)"):
        load(write(dict(sd, **{"fc.weight": np.zeros((5, 3), np.float32)})), num_classes=5)
    with pytest.raises(StimageError, match=r"'conv1.weight' has shape \(4, 147\), expected \(4, 3, 7, 7\)"):
        load(write(dict(sd, **{"conv1.weight": sd["conv1.weight"].reshape(4, -1)})))
    with pytest.raises(StimageError, match=r"unexpected weight\(s\) for resnet_tiny, first 'layer9.0.conv1.weight'"):
        load_weights(nnx.eval_shape(lambda: BACKBONES["resnet_tiny"](rngs=nnx.Rngs(0), num_classes=5)),
                     write(dict(sd, **{"layer9.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})),
                     name="resnet_tiny")
    with pytest.raises(StimageError, match="missing for efficientnet_lite0, first '_conv_stem.weight'"):
        load(path, name="efficientnet_lite0")
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(StimageError, match=f"weights file {trunc} is not a readable safetensors file"):
        load(trunc)
    with pytest.raises(StimageError, match="not found"):
        load(tmp_path / "absent.safetensors")
    with pytest.raises(StimageError, match="no PyTorch weight mapping for TinyCNN"):
        load(path, name="tiny")
    with pytest.raises(StimageError) as info:
        load(trunc)
    assert "\n" not in str(info.value)  # the CLI prints one line


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    # torch is installed in CI (the cellpose extra): hide it, as an environment without it would
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    p = tmp_path / "resnet50.pth"
    p.write_bytes(b"not really a pickle")
    with pytest.raises(StimageError, match="torch is not installed; convert it with safetensors") as info:
        create_backbone("resnet50", rngs=nnx.Rngs(0), weights=p)
    assert "\n" not in str(info.value)


def test_pth_with_torch_loads_like_safetensors(tmp_path):
    """With torch, a .pth state dict (and a training checkpoint nesting it) reads as the same
    arrays as its safetensors copy; a damaged one is one line."""
    import torch  # the cellpose extra (in dev): a missing install fails, never skips
    from safetensors.numpy import save_file

    from stimage_jax.features.weights import read_state_dict

    rng = np.random.default_rng(0)
    sd = {"conv1.weight": rng.normal(size=(4, 3, 7, 7)).astype(np.float32), "bn1.num_batches_tracked": np.array(3)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "w.pth")
    # a float64 training checkpoint: floats come back float32, the integer counter stays integer
    torch.save({"state_dict": {k: torch.from_numpy(v.astype(np.float64) if v.dtype == np.float32 else v)
                               for k, v in sd.items()}}, tmp_path / "ckpt.pt")
    want = read_state_dict(tmp_path / "w.safetensors")
    for name in ("w.pth", "ckpt.pt"):
        got = read_state_dict(tmp_path / name)
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not really a pickle")
    with pytest.raises(StimageError, match="is not a readable PyTorch checkpoint") as info:
        read_state_dict(bad)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jax2onnx's own use of Variable.value
def test_resnet_exports_to_onnx(models):
    """ResNet's padded max-pool survives jax2onnx (tuple padding on max_pool would be dropped)."""
    ort = pytest.importorskip("onnxruntime")
    from jax2onnx import to_onnx

    m = models["resnet_tiny"]
    proto = to_onnx(lambda x: m(x), [("B", 33, 37, 3)], model_name="resnet_tiny")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).uniform(0, 255, (2, 33, 37, 3)).astype(np.float32)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, np.asarray(m(jnp.asarray(x))), rtol=1e-4, atol=1e-5)


# --- EfficientNet-Lite0 with the shared ImageNet weights ------------------------------------------

@pytest.fixture(scope="module")
def lite0(shared):
    return create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0), num_classes=1000,
                           weights=shared / "weights" / "efficientnet_lite0_imagenet.safetensors")


@pytest.mark.real_data
def test_efficientnet_lite0_imagenet_classes(lite0):
    # shared/README.md, measured with the PyTorch package: chelsea → 285 p≈0.79, coffee → 967 p≈0.91
    # (skimage resize with anti-aliasing: 0.793 / 0.908; cv2 INTER_AREA: 0.784 / 0.908)
    for img, cls, p_ref in ((data.chelsea(), 285, 0.79), (data.coffee(), 967, 0.91)):
        x = resize(img, (224, 224), anti_aliasing=True) * 255.0
        p = np.asarray(jax.nn.softmax(lite0.classify(forward(lite0, jnp.asarray(x[None], jnp.float32)))))[0]
        assert int(p.argmax()) == cls
        assert float(p.max()) == pytest.approx(p_ref, abs=0.02)


@pytest.mark.real_data
def test_efficientnet_lite0_file_and_small_tiles(lite0, shared):
    sd = load_file(str(shared / "weights" / "efficientnet_lite0_imagenet.safetensors"))
    buffers = [k for k in sd if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    # README's "4.69 M" counts the BN buffers too: 4,652,008 parameters + 41,967 running stats + 49 counters
    assert sum(v.size for v in sd.values()) == 4_694_073
    assert sum(v.size for k, v in sd.items() if k not in buffers) == n_params(lite0) == 4_652_008
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 49
    x = np.random.default_rng(5).integers(0, 256, (3, 32, 47, 3), dtype=np.uint8)  # smallest side 32
    out = np.asarray(forward(lite0, jnp.asarray(x)))
    assert out.shape == (3, 1280) and np.isfinite(out).all() and np.ptp(out) > 0


def test_depthwise_shift_add_equals_grouped_conv():
    # the CPU fast path must compute exactly what the exported grouped convolution computes
    from stimage_jax.features.layers import ConvBN

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 13, 6)), jnp.float32)
    for k, s in ((3, 1), (5, 2), (3, 2)):
        layer = ConvBN(6, 6, k, s, groups=6, rngs=nnx.Rngs(1), pad_mode="tf_same")
        layer.eval()
        outs = {}
        for impl in ("shift", "conv"):
            layer.depthwise_impl = impl
            outs[impl] = np.asarray(layer(x))
        np.testing.assert_allclose(outs["shift"], outs["conv"], rtol=1e-5, atol=1e-5)
