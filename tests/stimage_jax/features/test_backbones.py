"""Backbones: shapes, input scaling, parameter counts, ImageNet behaviour, weight import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from scipy.signal import correlate
from skimage import data
from skimage.transform import resize

from data_pipelines.errors import StimageError
from stimage_jax.features import BACKBONES, DEFAULT_WEIGHTS, create_backbone, load_weights
from stimage_jax.features.resnet import IMAGENET_MEAN, IMAGENET_STD


def n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["tiny", "resnet_tiny"])
@pytest.mark.parametrize("batch", [1, 3])
def test_feature_shapes(name, batch):
    m = create_backbone(name, rngs=nnx.Rngs(0))
    out = m(jnp.zeros((batch, 32, 32, 3), jnp.uint8))
    assert out.shape == (batch, m.num_features) and np.isfinite(np.asarray(out)).all()


def test_input_scaling():
    x = jnp.asarray([0.0, 255.0])
    np.testing.assert_allclose(BACKBONES["efficientnet_lite0"].normalize(x), [-1.0, 1.0])
    r = BACKBONES["resnet50"].func.normalize(jnp.zeros((1, 1, 1, 3)))
    np.testing.assert_allclose(np.asarray(r).ravel(), -np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD), rtol=1e-6)
    np.testing.assert_allclose(BACKBONES["tiny"].normalize(x), [0.0, 1.0])


def test_parameter_counts_match_pytorch():
    # torchvision resnet50: 25,557,032 parameters (BN running stats are buffers, not counted)
    assert n_params(create_backbone("resnet50", rngs=nnx.Rngs(0), num_classes=1000)) == 25_557_032
    lite = create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0), num_classes=1000)
    # the shared file holds 4,694,073 numbers: parameters + BN running mean/var + one
    # num_batches_tracked scalar per BN layer (49 of them)
    stats = jax.tree.leaves(nnx.state(lite, nnx.BatchStat))
    assert n_params(lite) == 4_652_008
    assert n_params(lite) + sum(x.size for x in stats) + len(stats) // 2 == 4_694_073
    assert create_backbone("resnet50", rngs=nnx.Rngs(0))(jnp.zeros((2, 64, 64, 3))).shape == (2, 2048)


@pytest.mark.real_data
def test_efficientnet_lite0_imagenet_classes(shared):
    m = create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0), num_classes=1000,
                        weights=shared / "weights" / "efficientnet_lite0_imagenet.safetensors")
    for img, cls, p_ref in ((data.chelsea(), 285, 0.79), (data.coffee(), 967, 0.91)):
        x = resize(img, (224, 224), anti_aliasing=True) * 255.0
        p = jax.nn.softmax(m.classify(m(jnp.asarray(x[None], jnp.float32))))[0]
        assert int(p.argmax()) == cls
        assert float(p.max()) == pytest.approx(p_ref, abs=0.02)


# --- an independent NumPy ResNet (torchvision v1.5 semantics) for the importer --------------

def _conv(x, w, stride, pad):
    """x (C, H, W), w (O, I, k, k) → (O, H', W'), cross-correlation like torch.nn.Conv2d."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out = np.stack([sum(correlate(x[i], w[o, i], mode="valid") for i in range(w.shape[1])) for o in range(w.shape[0])])
    return out[:, ::stride, ::stride]


def _bn(x, sd, p, eps=1e-5):
    g, b, m, v = (sd[f"{p}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + eps) * g[:, None, None] + b[:, None, None]


def _maxpool(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    return np.stack([[[x[c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(w)] for i in range(h)]
                     for c in range(x.shape[0])])


def _numpy_resnet(img_chw, sd, stages):
    relu = lambda a: np.maximum(a, 0)
    x = relu(_bn(_conv(img_chw, sd["conv1.weight"], 2, 3), sd, "bn1"))
    x = _maxpool(x)
    for i, n in enumerate(stages):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            s = 2 if (j == 0 and i > 0) else 1
            h = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], 1, 0), sd, f"{p}.bn1"))
            h = relu(_bn(_conv(h, sd[f"{p}.conv2.weight"], s, 1), sd, f"{p}.bn2"))
            h = _bn(_conv(h, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3")
            idt = _bn(_conv(x, sd[f"{p}.downsample.0.weight"], s, 0), sd, f"{p}.downsample.1") \
                if f"{p}.downsample.0.weight" in sd else x
            x = relu(h + idt)
    feats = x.mean((1, 2))
    return sd["fc.weight"] @ feats + sd["fc.bias"]


def _torchvision_like_state_dict(rng, stages=(1, 1, 1, 1), width=4, classes=5):
    sd = {}
    def conv(name, o, i, k):
        sd[name] = (rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k)).astype(np.float32)
    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.asarray(7, np.int64)
    conv("conv1.weight", width, 3, 7); bn("bn1", width)
    cin = width
    for i, n in enumerate(stages):
        w = width * 2**i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            conv(f"{p}.conv1.weight", w, cin, 1); bn(f"{p}.bn1", w)
            conv(f"{p}.conv2.weight", w, w, 3); bn(f"{p}.bn2", w)
            conv(f"{p}.conv3.weight", 4 * w, w, 1); bn(f"{p}.bn3", 4 * w)
            if j == 0:
                conv(f"{p}.downsample.0.weight", 4 * w, cin, 1); bn(f"{p}.downsample.1", 4 * w)
            cin = 4 * w
    sd["fc.weight"] = rng.normal(0, 0.1, (classes, cin)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.1, classes).astype(np.float32)
    return sd


@pytest.fixture
def resnet_file(tmp_path, rng):
    sd = _torchvision_like_state_dict(rng)
    path = tmp_path / "resnet_tiny.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_resnet_import_matches_numpy_reference(resnet_file, rng):
    path, sd = resnet_file
    m = create_backbone("resnet_tiny", rngs=nnx.Rngs(0), num_classes=5, weights=path)
    img = rng.integers(0, 256, size=(33, 37, 3)).astype(np.float32)  # odd sizes exercise padding
    got = np.asarray(m.classify(m(jnp.asarray(img[None]))))[0]
    x = ((img / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)).transpose(2, 0, 1)
    ref = _numpy_resnet(x, sd, (1, 1, 1, 1))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_import_errors(resnet_file, tmp_path):
    path, sd = resnet_file
    with pytest.raises(StimageError, match="unknown backbone 'vgg16'"):
        create_backbone("vgg16", rngs=nnx.Rngs(0))
    partial = {k: v for k, v in sd.items() if k != "layer2.0.conv2.weight"}
    save_file(partial, str(tmp_path / "p.safetensors"))
    with pytest.raises(StimageError, match="missing .*layer2.0.conv2.weight"):
        create_backbone("resnet_tiny", rngs=nnx.Rngs(0), num_classes=5, weights=tmp_path / "p.safetensors")
    wrong = dict(sd, **{"fc.weight": np.zeros((5, 3), np.float32)})
    save_file(wrong, str(tmp_path / "w.safetensors"))
    with pytest.raises(StimageError, match="'fc.weight' has shape"):
        create_backbone("resnet_tiny", rngs=nnx.Rngs(0), num_classes=5, weights=tmp_path / "w.safetensors")
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(StimageError, match="not a readable safetensors"):
        create_backbone("resnet_tiny", rngs=nnx.Rngs(0), weights=trunc)
    with pytest.raises(StimageError, match="missing"):  # ResNet weights into EfficientNet
        create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0), weights=path)
    extra = dict(sd, **{"layer9.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
    save_file(extra, str(tmp_path / "e.safetensors"))
    with pytest.raises(StimageError, match="unexpected weight.*layer9"):
        load_weights(create_backbone("resnet_tiny", rngs=nnx.Rngs(0), num_classes=5), tmp_path / "e.safetensors")
