"""HoVer-Net network: multi-scale encoder = the backbone's own forward, output shapes, losses
against hand/NumPy computations, frozen levels, pretrained weights, ONNX parity."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.ndimage import correlate

from data_pipelines.errors import StimageError
from stimage_jax.cells.hovernet import (TYPE_NAMES, HoverOutput, MultiScaleEncoder, create_hovernet, dice_loss,
                                        export_cells_onnx, hovernet_loss, hv_gradient, init_random, mse_loss,
                                        msge_loss, probabilities, sobel_kernels, xentropy_loss)
from stimage_jax.features import create_backbone
from stimage_jax.features.tiny import TinyCNN

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tiny():
    return create_hovernet("tiny", seed=0)


@nnx.jit
def forward(net, x):
    return net(x)


@nnx.jit
def encode(bb, x):
    """The multi-scale maps and the backbone's own output, in one compiled call."""
    return MultiScaleEncoder(bb)(x), bb(x)


def _build(make, seed=0):
    """A module with NumPy-drawn arrays (JAX random init compiles per shape: slow on CPU)."""
    m = nnx.eval_shape(make)
    init_random(m, seed)
    m.eval()
    return m


def _tiles(b=2, size=64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, size, size, 3), dtype=np.uint8))


# --- network ------------------------------------------------------------------------------------------

def test_tiny_outputs_have_the_input_size_and_ranges(tiny):
    out = forward(tiny, _tiles())
    assert isinstance(out, HoverOutput)
    assert out.np.shape == (2, 64, 64, 2) and out.hv.shape == (2, 64, 64, 2) and out.tc.shape == (2, 64, 64, 5)
    assert float(jnp.max(jnp.abs(out.hv))) <= 1.0
    p_np, hv, p_tc = probabilities(out)
    assert p_np.shape == (2, 64, 64) and np.all((np.asarray(p_np) >= 0) & (np.asarray(p_np) <= 1))
    np.testing.assert_allclose(np.asarray(p_tc).sum(-1), 1.0, atol=1e-5)
    assert len(TYPE_NAMES) == 5 and TYPE_NAMES[0] == "background"
    no_tc = create_hovernet("tiny", num_types=0)
    assert jax.eval_shape(lambda x: no_tc(x), _tiles(1)).tc is None and no_tc.tc_decoder is None
    with pytest.raises(StimageError, match="multiples of 32"):
        tiny(_tiles(1, 48))
    with pytest.raises(StimageError, match="num_types"):
        create_hovernet("tiny", num_types=1)
    with pytest.raises(StimageError, match="unknown cells backbone"):
        create_hovernet("vgg16")
    with pytest.raises(StimageError, match="no pretrained"):
        create_hovernet("tiny", weights="default")


def test_encoder_maps_are_the_backbones_own_forward_at_strides_2_to_32():
    # TinyCNN with five stride-2 convs: the encoder's last map, pooled, is the backbone's output.
    bb = _build(lambda: TinyCNN(rngs=nnx.Rngs(0), widths=(4, 8, 8, 16, 16)))
    x = _tiles(2, 64)
    feats, ref = encode(bb, x)
    assert [f.shape[1] for f in feats] == [32, 16, 8, 4, 2] and MultiScaleEncoder(bb).channels == (4, 8, 8, 16, 16)
    np.testing.assert_allclose(np.asarray(jnp.mean(feats[-1], (1, 2))), np.asarray(ref), rtol=1e-5, atol=1e-6)
    # ResNet: stem (stride 2) then the four stages; the pooled last map is the backbone's features.
    rn = _build(lambda: create_backbone("resnet_tiny", rngs=nnx.Rngs(0)), seed=1)
    feats, ref = encode(rn, x)
    assert [f.shape[1] for f in feats] == [32, 16, 8, 4, 2] and MultiScaleEncoder(rn).channels == (4, 16, 32, 64, 128)
    np.testing.assert_allclose(np.asarray(jnp.mean(feats[-1], (1, 2))), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.real_data
def test_efficientnet_encoder_reuses_the_pretrained_backbone(shared):
    # The real Lite0 weights: the encoder's 320-channel stride-32 map, through the backbone's
    # own head and pooling, gives exactly the backbone's features; the stem kernel is the file's.
    bb = create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0), weights=shared / "weights" /
                         "efficientnet_lite0_imagenet.safetensors")
    assert MultiScaleEncoder(bb).channels == (16, 24, 40, 112, 320)
    x = _tiles(1, 64, seed=3)
    feats, ref = encode(bb, x)
    assert [f.shape[1] for f in feats] == [32, 16, 8, 4, 2]
    pooled = jnp.mean(bb.head(feats[-1]), axis=(1, 2))
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(ref), rtol=1e-4, atol=1e-5)
    net = create_hovernet("efficientnet_lite0", weights="default", num_types=0)
    np.testing.assert_array_equal(np.asarray(net.encoder.stem.conv.kernel[...]), np.asarray(bb.stem.conv.kernel[...]))
    assert not hasattr(net.encoder, "head")  # the unused 1280-channel head is not trained


def test_frozen_levels_stop_gradients_into_the_first_encoder_levels(tiny):
    x = _tiles(2)
    np_t = jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, 64, 64)))
    hv_t = jnp.zeros((2, 64, 64, 2))

    @nnx.jit(static_argnames="k")
    def grads(m, k):
        return nnx.grad(lambda m: hovernet_loss(m(x, k), np_t, hv_t)[0])(m)

    g0, g2 = grads(tiny, k=0), grads(tiny, k=2)
    first = lambda g, i: np.abs(np.asarray(g["encoder"]["convs"][i]["conv"]["kernel"][...])).sum()  # noqa: E731
    assert first(g0, 0) > 0 and first(g0, 1) > 0
    assert first(g2, 0) == 0 and first(g2, 1) == 0 and first(g2, 2) > 0


def test_a_few_adam_steps_fit_a_fixed_batch(tiny):
    net = create_hovernet("tiny", seed=1, num_types=0)
    net.train()
    opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)
    x = _tiles(2, seed=5)
    np_t = (jnp.asarray(x)[..., 0] > 128).astype(jnp.int32)  # a learnable target: the red channel
    hv_t = jnp.zeros((2, 64, 64, 2))

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(lambda m: hovernet_loss(m(x), np_t, hv_t)[0])(m)
        o.update(m, g)
        return loss

    losses = [float(step(net, opt)) for _ in range(15)]
    assert losses[-1] < 0.6 * losses[0]


# --- losses against hand computations --------------------------------------------------------------------

def test_cross_entropy_and_dice_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 3, 4))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    onehot = np.eye(3)[labels]
    ce = -np.mean(np.sum(onehot * np.log(p), -1))
    np.testing.assert_allclose(float(xentropy_loss(jnp.asarray(logits), jnp.asarray(labels))), ce, rtol=1e-5)
    inter, sp, st = (p * onehot).sum((0, 1, 2)), p.sum((0, 1, 2)), onehot.sum((0, 1, 2))
    dice = np.sum(1 - (2 * inter + 1e-3) / (sp + st + 1e-3))
    np.testing.assert_allclose(float(dice_loss(jnp.asarray(logits), jnp.asarray(labels))), dice, rtol=1e-5)
    # A perfect, confident prediction: CE → 0, Dice → 0
    sure = jnp.asarray(onehot * 50.0)
    assert float(xentropy_loss(sure, jnp.asarray(labels))) < 1e-6
    assert float(dice_loss(sure, jnp.asarray(labels))) < 1e-4
    # Masked: pixels outside the mask (labels −1 there) do not count
    mask = labels != 2
    lab_m = np.where(mask, labels, -1)
    ce_m = -np.sum(np.sum(onehot * np.log(p), -1) * mask) / mask.sum()
    np.testing.assert_allclose(float(xentropy_loss(jnp.asarray(logits), jnp.asarray(lab_m), jnp.asarray(mask))),
                               ce_m, rtol=1e-5)
    pm, tm = p * mask[..., None], onehot * mask[..., None]
    dice_m = np.sum(1 - (2 * (pm * tm).sum((0, 1, 2)) + 1e-3) / (pm.sum((0, 1, 2)) + tm.sum((0, 1, 2)) + 1e-3))
    np.testing.assert_allclose(float(dice_loss(jnp.asarray(logits), jnp.asarray(lab_m), jnp.asarray(mask))),
                               dice_m, rtol=1e-5)
    assert float(mse_loss(jnp.asarray([1.0, 3.0]), jnp.asarray([0.0, 1.0]))) == pytest.approx(2.5)


def test_sobel_kernels_and_hv_gradient_by_hand():
    kx, ky = sobel_kernels(5)
    assert kx[2, 3] == pytest.approx(1.0) and kx[2, 4] == pytest.approx(0.5) and kx[0, 4] == pytest.approx(0.25)
    assert kx[2, 2] == 0 and kx[1, 2] == 0 and kx[2, 0] == pytest.approx(-0.5)
    np.testing.assert_array_equal(ky, kx.T)  # ky increases down the rows
    # A map rising by 1 per column: inside, ∂x = Σ h·kx = Σ h²/(h²+v²); ∂y of a row ramp likewise.
    cols = np.tile(np.arange(12, dtype=np.float32), (10, 1))             # rises along x
    rows = np.tile(np.arange(10, dtype=np.float32)[:, None], (1, 12))    # rises along y
    hv = np.stack([cols, rows], -1)
    g = np.asarray(hv_gradient(jnp.asarray(hv[None])))[0]
    h = np.arange(-2, 3, dtype=np.float64)[None, :].repeat(5, 0)
    v = h.T
    expect = np.sum(h * h / (h * h + v * v + 1e-15))
    np.testing.assert_allclose(g[2:-2, 2:-2, 0], expect, rtol=1e-5)
    np.testing.assert_allclose(g[2:-2, 2:-2, 1], expect, rtol=1e-5)
    # Everywhere (borders included, zero padding): SciPy's correlation of each channel
    np.testing.assert_allclose(g[..., 0], correlate(hv[..., 0], kx, mode="constant"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g[..., 1], correlate(hv[..., 1], ky, mode="constant"), rtol=1e-5, atol=1e-5)


def test_msge_and_total_loss_match_numpy():
    rng = np.random.default_rng(2)
    pred = rng.uniform(-1, 1, (2, 9, 11, 2)).astype(np.float32)
    true = rng.uniform(-1, 1, (2, 9, 11, 2)).astype(np.float32)
    focus = rng.integers(0, 2, (2, 9, 11))
    kx, ky = sobel_kernels(5)
    err = 0.0
    for b in range(2):
        for c, k in ((0, kx), (1, ky)):
            d = correlate(pred[b, ..., c], k, mode="constant") - correlate(true[b, ..., c], k, mode="constant")
            err += np.sum(focus[b] * d * d)
    msge = err / (2 * focus.sum() + 1e-8)
    got = float(msge_loss(jnp.asarray(pred), jnp.asarray(true), jnp.asarray(focus)))
    np.testing.assert_allclose(got, msge, rtol=1e-5)
    # Total = sum of the six terms; TC pixels of unknown type (−1) do not move the loss
    logits = rng.normal(size=(2, 9, 11, 2)).astype(np.float32)
    tc = rng.normal(size=(2, 9, 11, 5)).astype(np.float32)
    tc_t = rng.integers(-1, 5, (2, 9, 11))
    out = HoverOutput(jnp.asarray(logits), jnp.asarray(pred), jnp.asarray(tc))
    total, terms = hovernet_loss(out, jnp.asarray(focus), jnp.asarray(true), jnp.asarray(tc_t))
    assert set(terms) == {"np_ce", "np_dice", "hv_mse", "hv_msge", "tc_ce", "tc_dice"}
    np.testing.assert_allclose(float(total), sum(float(v) for v in terms.values()), rtol=1e-6)
    np.testing.assert_allclose(float(terms["hv_msge"]), msge, rtol=1e-5)
    tc2 = tc.copy()
    tc2[tc_t < 0] = 100.0 * rng.normal(size=tc2[tc_t < 0].shape)
    total2, _ = hovernet_loss(HoverOutput(out.np, out.hv, jnp.asarray(tc2)), jnp.asarray(focus), jnp.asarray(true),
                              jnp.asarray(tc_t))
    np.testing.assert_allclose(float(total2), float(total), rtol=1e-6)
    _, no_tc = hovernet_loss(HoverOutput(out.np, out.hv, None), jnp.asarray(focus), jnp.asarray(true))
    assert set(no_tc) == {"np_ce", "np_dice", "hv_mse", "hv_msge"}


# --- ONNX ---------------------------------------------------------------------------------------------------

def test_onnx_export_matches_jax(tmp_path):
    import onnx
    import onnxruntime as ort

    net = create_hovernet("tiny", seed=3)
    # Non-trivial BatchNorm statistics, so the exported normalisation is really checked
    for _, bn in nnx.iter_graph(net):
        if isinstance(bn, nnx.BatchNorm):
            bn.mean.value = jnp.full(bn.mean.shape, 0.1)
            bn.var.value = jnp.full(bn.var.shape, 1.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_cells_onnx(net, tmp_path / "cells.onnx", size=64)
    proto = onnx.load(path)
    assert len(proto.graph.value_info) == 0 and proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["num_types"] == "5" and "immune" in meta["type_names"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["np", "hv", "tc"]
    for b in (1, 3):
        x = np.asarray(_tiles(b, 64, seed=b))
        got = sess.run(None, {"tiles": x})
        ref = [np.asarray(a) for a in probabilities(forward(net, jnp.asarray(x)))]
        for g, r in zip(got, ref):
            assert g.shape == r.shape
            assert np.max(np.abs(g - r)) / np.max(np.abs(r)) <= 1e-4  # max error relative to the output's scale
    with pytest.raises(StimageError, match="already exists"):
        export_cells_onnx(net, path, size=64)
    with pytest.raises(StimageError, match="multiple of 32"):
        export_cells_onnx(net, tmp_path / "x.onnx", size=50)
