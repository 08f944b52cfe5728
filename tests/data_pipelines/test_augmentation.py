"""Training augmentation in JAX: each op against an independent reference (NumPy, SciPy,
scikit-image, OpenCV), then the pipeline's contracts (identity, determinism, per-tile
sampling, batching) and real HER2ST crops."""

from __future__ import annotations

import dataclasses

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage import color

from data_pipelines.augmentation import (
    RUIFROK_HE, AugmentConfig, affine_warp, apply_params, augment, augment_rows, augment_views, gaussian_blur,
    hed_jitter, sample_params,
)
from data_pipelines.errors import StimageError
from data_pipelines.stain_normalisation import Reference

OFF = AugmentConfig.disabled


def tiles_u8(b: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3), dtype=np.uint8)


def smooth_tiles(b: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random tiles blurred (σ 2) and stretched: H&E-like smooth structure, values ~20-240."""
    x = ndi.gaussian_filter(np.random.default_rng(seed).random((b, size, size, 3)), (0, 2, 2, 0))
    x = (x - x.min()) / (x.max() - x.min())
    return np.rint(20 + 220 * x).astype(np.uint8)


def he_tiles(b: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    """Synthetic H&E: OD = C @ [H; E] (Ruifrok), C ≥ 0 smooth; glass where C ≈ 0."""
    rng = np.random.default_rng(seed)
    s = np.asarray(RUIFROK_HE) / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)
    c = ndi.gaussian_filter(rng.gamma(1.0, 0.5, (b, size, size, 2)), (0, 1, 1, 0)) * 2
    rgb = 256 * np.exp(-(c @ s)) - 1
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def as_np(x) -> np.ndarray:
    return np.asarray(x)


# Every op on, each tile drawing each op with probability 0.6: one compiled graph shared by
# the contract tests (compiling dominates their run time).
FULL = AugmentConfig(affine_p=0.6, photometric="independent", blur_p=0.6, blur_sigma=(0.0, 1.0), noise_p=0.6,
                     hsv_p=0.6, grey_p=0.6, value_scale=0.1, stain_p=0.6)


def x4() -> np.ndarray:
    return he_tiles(4, 32, seed=9)


# --- pipeline contracts -------------------------------------------------------------------
def test_disabled_config_is_bit_exact_identity():
    x = tiles_u8(4, 32)
    y = augment(jax.random.key(0), x, OFF())
    assert y.dtype == jnp.uint8 and y.shape == x.shape and np.array_equal(as_np(y), x)
    # strengths of zero leave the op out of the graph too
    zero = OFF(hsv_p=1.0, hue_shift=0.0, saturation_scale=0.0, value_scale=0.0, blur_p=0.5, blur_sigma=(0.0, 0.0),
               noise_p=0.5, noise_std=(0.0, 0.0), grey_p=0.0, photometric="independent")
    assert not (zero.uses_hsv or zero.uses_blur or zero.uses_noise)
    assert np.array_equal(as_np(augment(jax.random.key(1), x, zero)), x)


def test_deterministic_per_key():
    x = x4()
    a, b, c = (as_np(augment(jax.random.key(s), x, FULL)) for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == x.shape and not np.array_equal(a, x)


def test_raw_uint32_keys_work():
    x = tiles_u8(4, 32)
    cfg = OFF(noise_p=1.0, noise_std=(5.0, 5.0))
    r1, r2, r3 = (as_np(augment(k, x, cfg)) for k in (jax.random.PRNGKey(3), jax.random.PRNGKey(3), jax.random.PRNGKey(4)))
    assert np.array_equal(r1, r2) and not np.array_equal(r1, r3)


def test_299_px_tiles_with_the_default_config():
    x = he_tiles(8, 299)  # the real-data test below reuses this compiled shape and config
    y = as_np(augment(jax.random.key(0), x, AugmentConfig()))
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert sum(not np.array_equal(a, b) for a, b in zip(x, y)) >= 6  # about 31/32 change at all


def test_augment_views_are_augment_with_split_keys():
    x = tiles_u8(4, 32)
    cfg = OFF(flip_p=0.5, rot90=True, grey_p=0.5)
    key = jax.random.key(11)
    v = augment_views(key, x, 3, cfg)
    assert v.shape == (3, 4, 32, 32, 3) and v.dtype == jnp.uint8
    for i, k in enumerate(jax.random.split(key, 3)):
        assert np.array_equal(as_np(v[i]), as_np(augment(k, x, cfg)))
    assert not np.array_equal(as_np(v[0]), as_np(v[1]))


def test_rows_of_a_batch_augment_as_in_the_whole_batch():
    """A process holding rows 1 and 3 of a 4-tile batch (several hosts) augments them exactly
    as one process augmenting the whole batch — every op on, noise fields included."""
    x = x4()
    key = jax.random.key(5)
    whole = as_np(augment(key, x, FULL))
    rows = np.array([1, 3])
    got = as_np(augment_rows(key, x[rows], rows, 4, FULL))
    assert np.array_equal(got, whole[rows])
    assert not np.array_equal(got, as_np(augment(key, x[rows], FULL)))  # not a 2-tile batch of its own


def test_map_and_vmap_batching_give_the_same_tiles():
    x = x4()
    a = as_np(augment(jax.random.key(2), x, FULL)).astype(int)  # CPU: "auto" is "map"
    b = as_np(augment(jax.random.key(2), x, dataclasses.replace(FULL, batching="vmap"))).astype(int)
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.999  # float rounding only
    assert not np.array_equal(a, x)


def test_one_of_sampling_frequencies_and_exclusivity():
    n = 8_000
    p = sample_params(jax.random.key(0), n, AugmentConfig())
    flags = np.stack([as_np(p.blur), as_np(p.noise), as_np(p.hsv), as_np(p.grey)])
    assert flags.sum(0).max() == 1                       # at most one photometric op per tile
    np.testing.assert_allclose(flags.mean(1), 0.125, atol=0.015)
    assert abs(as_np(p.affine).mean() - 0.5) < 0.02 and not as_np(p.stain).any()  # stain off by default
    assert as_np(p.blur_sigma).min() >= 0 and as_np(p.blur_sigma).max() <= 3.0
    s = as_np(p.scale)
    assert s.min() >= 0.8 and s.max() <= 1.2 and np.corrcoef(s[:, 0], s[:, 1])[0, 1] < 0.05  # per axis
    ang = as_np(p.angle_deg)
    assert ang.min() >= -45 and ang.max() <= 45
    # dihedral: all 8 (transpose, flip_rows, flip_cols) combinations about equally often
    code = 4 * as_np(p.transpose) + 2 * as_np(p.flip_rows) + as_np(p.flip_cols)
    np.testing.assert_allclose(np.bincount(code, minlength=8) / n, 1 / 8, atol=0.015)
    ind = sample_params(jax.random.key(1), n, AugmentConfig(photometric="independent", blur_p=0.5, hsv_p=0.5))
    both = as_np(ind.blur) & as_np(ind.hsv)
    assert abs(both.mean() - 0.25) < 0.02


# --- geometry -----------------------------------------------------------------------------
def dihedral_set(t: np.ndarray) -> list[np.ndarray]:
    return [f(np.rot90(t, k)) for k in range(4) for f in (lambda a: a, np.fliplr)]


def test_flips_and_rot90_give_exact_dihedral_transforms_all_eight_occur():
    x = tiles_u8(16, 32, seed=1)
    cfg = OFF(flip_p=0.5, rot90=True)
    seen = set()
    for s in range(8):
        y = as_np(augment(jax.random.key(s), x, cfg))
        for t, o in zip(x, y):
            hits = [i for i, d in enumerate(dihedral_set(t)) if np.array_equal(d, o)]
            assert len(hits) == 1
            seen.add(hits[0])
    assert seen == set(range(8))


def test_flips_only_never_transpose():
    x = tiles_u8(16, 32, seed=2)
    y = as_np(augment(jax.random.key(0), x, OFF(flip_p=0.5)))
    for t, o in zip(x, y):
        assert any(np.array_equal(o, d) for d in (t, t[::-1], t[:, ::-1], t[::-1, ::-1]))


def test_affine_with_unit_scale_and_zero_angle_is_identity():
    x = tiles_u8(4, 32)
    y = as_np(augment(jax.random.key(0), x, OFF(affine_p=1.0, scale_range=(1.0, 1.0), rotation_deg=(0.0, 0.0))))
    assert np.abs(y.astype(int) - x).max() <= 1


@pytest.mark.parametrize("fill", ["white", "reflect"])
def test_affine_rotation_by_90_degrees_is_np_rot90(fill):
    x = tiles_u8(4, 33)
    y = as_np(augment(jax.random.key(0), x, OFF(affine_p=1.0, scale_range=(1.0, 1.0), rotation_deg=(90.0, 90.0),
                                                 fill=fill)))
    ref = np.rot90(x, 1, axes=(1, 2))
    assert np.abs(y.astype(int) - ref)[:, 2:-2, 2:-2].max() <= 2


def test_affine_zoom_out_fills_white():
    x = np.zeros((2, 40, 40, 3), np.uint8)
    y = as_np(augment(jax.random.key(0), x, OFF(affine_p=1.0, scale_range=(0.5, 0.5), rotation_deg=(0.0, 0.0))))
    assert (y[:, :8] == 255).all() and (y[:, :, -8:] == 255).all()   # outside the shrunk tile: glass
    assert (y[:, 12:28, 12:28] == 0).all()                           # the tile itself, half size


@pytest.mark.parametrize("fill,scipy_mode,jax_mode", [("white", "grid-constant", "constant"),
                                                      ("reflect", "reflect", "reflect")])
def test_affine_warp_equals_map_coordinates(fill, scipy_mode, jax_mode):
    x = tiles_u8(3, 31, seed=5).astype(np.float32)
    ang = np.array([17.0, -40.0, 133.0])
    sc = np.array([[0.8, 1.2], [1.1, 1.1], [0.9, 0.85]])
    got = as_np(affine_warp(x, ang, sc, fill=fill))
    n = x.shape[1]
    c = (n - 1) / 2
    u, v = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")
    for b in range(3):
        t = np.deg2rad(ang[b])
        r = c + (np.cos(t) * u + np.sin(t) * v) / sc[b, 0]
        q = c + (-np.sin(t) * u + np.cos(t) * v) / sc[b, 1]
        for ch in range(3):
            ref = ndi.map_coordinates(x[b, ..., ch].astype(np.float64), [r, q], order=1, mode=scipy_mode, cval=255.0)
            np.testing.assert_allclose(got[b, ..., ch], ref, atol=0.05)
            ref_jax = jax.scipy.ndimage.map_coordinates(jnp.asarray(x[b, ..., ch]), [jnp.asarray(r, jnp.float32),
                                                        jnp.asarray(q, jnp.float32)], order=1, mode=jax_mode, cval=255.0)
            np.testing.assert_allclose(got[b, ..., ch], as_np(ref_jax), atol=0.02)


# --- photometric --------------------------------------------------------------------------
def test_blur_equals_scipy_gaussian_filter_and_opencv():
    x = tiles_u8(3, 40)
    cfg = OFF(blur_p=1.0, blur_sigma=(1.5, 1.5))
    r = cfg.blur_radius
    assert r == int(4 * 1.5 + 0.5)
    y = as_np(augment(jax.random.key(0), x, cfg)).astype(float)
    ref = np.stack([ndi.gaussian_filter(t.astype(np.float64), (1.5, 1.5, 0), mode="reflect", truncate=r / 1.5)
                    for t in x])
    assert np.abs(y - np.rint(ref)).max() <= 1                       # whole tile: same borders as SciPy
    np.testing.assert_allclose(as_np(gaussian_blur(x, np.full(3, 1.5), radius=r)), ref, atol=2e-3)
    ocv = np.stack([cv2.GaussianBlur(t.astype(np.float32), (2 * r + 1, 2 * r + 1), 1.5) for t in x])
    assert np.abs(y - ocv)[:, r:-r, r:-r].max() <= 0.51              # interior: OpenCV reflects differently
    # each tile its own σ; σ = 0 is the identity
    sig = np.array([0.0, 0.7, 2.5])
    got = as_np(gaussian_blur(x, sig, radius=10))
    assert np.array_equal(got[0], x[0].astype(np.float32))
    for b in (1, 2):
        ref_b = ndi.gaussian_filter(x[b].astype(np.float64), (sig[b], sig[b], 0), mode="reflect", truncate=10 / sig[b])
        np.testing.assert_allclose(got[b], ref_b, atol=2e-3)


@pytest.mark.parametrize("per_channel", [0.0, 1.0])
def test_additive_gaussian_noise_std_and_channel_sharing(per_channel):
    x = np.full((4, 64, 64, 3), 128, np.uint8)
    cfg = OFF(noise_p=1.0, noise_std=(6.0, 6.0), noise_per_channel_p=per_channel)
    d = as_np(augment(jax.random.key(0), x, cfg)).astype(float) - 128
    assert abs(d.std() - 6.0) < 0.3 and abs(d.mean()) < 0.2
    same = (d[..., 0] == d[..., 1]) & (d[..., 1] == d[..., 2])
    assert same.all() if per_channel == 0.0 else same.mean() < 0.2


def test_hsv_with_neutral_parameters_is_identity():
    x = tiles_u8(4, 32)
    cfg = OFF(hsv_p=1.0, value_scale=0.3)
    p = sample_params(jax.random.key(0), 4, cfg)._replace(hue=jnp.zeros(4), saturation=jnp.ones(4), value=jnp.ones(4))
    assert as_np(p.hsv).all()
    assert np.array_equal(as_np(apply_params(x, p, cfg)), x)


def skimage_hsv_jitter(t: np.ndarray, dh: float, fs: float, fv: float) -> np.ndarray:
    hsv = color.rgb2hsv(t.astype(np.float64) / 255)
    hsv[..., 0] = (hsv[..., 0] + dh) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * fs, 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * fv, 0, 1)
    return color.hsv2rgb(hsv) * 255


@pytest.mark.parametrize("kind", ["value", "all"])
def test_hsv_jitter_matches_skimage(kind):
    x = tiles_u8(6, 32, seed=3)
    cfg = (OFF(hsv_p=1.0, hue_shift=0.0, saturation_scale=0.0, value_scale=0.4) if kind == "value"
           else OFF(hsv_p=1.0, hue_shift=0.2, saturation_scale=0.5, value_scale=0.4))
    p = sample_params(jax.random.key(4), 6, cfg)
    y = as_np(apply_params(x, p, cfg)).astype(float)
    for b in range(6):
        ref = skimage_hsv_jitter(x[b], float(p.hue[b]), float(p.saturation[b]), float(p.value[b]))
        assert np.abs(y[b] - np.rint(ref)).max() <= 1
    if kind == "value":
        assert np.all(as_np(p.hue) == 0) and np.all(as_np(p.saturation) == 1)
        assert as_np(p.value).min() >= 0.6 and as_np(p.value).max() <= 1.4 and np.ptp(as_np(p.value)) > 0.1


def test_greyscale_is_bt601_luma():
    x = tiles_u8(4, 32)
    y = as_np(augment(jax.random.key(0), x, OFF(grey_p=1.0, grey_alpha=(1.0, 1.0)))).astype(int)
    assert (y[..., 0] == y[..., 1]).all() and (y[..., 1] == y[..., 2]).all()
    luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(y[..., 0] - luma).max() <= 0.5 + 1e-3
    # partial greyscale: a blend with the luma
    cfg = OFF(grey_p=1.0, grey_alpha=(0.2, 0.8))
    p = sample_params(jax.random.key(1), 4, cfg)
    z = as_np(apply_params(x, p, cfg)).astype(float)
    a = as_np(p.grey_alpha)[:, None, None, None]
    assert np.abs(z - (x + a * (luma[..., None] - x))).max() <= 0.5 + 1e-3


# --- stain (HED) jitter -------------------------------------------------------------------
def reference_concentrations(rgb: np.ndarray, stain_matrix) -> np.ndarray:
    """Independent NumPy decomposition: OD = −log((I+1)/256) on [H, E, H×E] (unit rows)."""
    s = np.asarray(stain_matrix, np.float64)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    r = np.cross(s[0], s[1])
    m = np.vstack([s, r / np.linalg.norm(r)])
    od = -np.log((np.asarray(rgb, np.float64) + 1) / 256)
    return od @ np.linalg.inv(m)


def test_stain_sigma_zero_is_identity_within_rounding():
    x = he_tiles(4, 32)
    y = as_np(augment(jax.random.key(0), x, OFF(stain_p=1.0, stain_sigma=0.0))).astype(int)
    assert np.abs(y - x).max() <= 1 and (y == x).mean() > 0.99


@pytest.mark.parametrize("matrix", ["ruifrok", "custom", "reference"])
def test_hed_jitter_concentrations_are_alpha_c_plus_beta(matrix):
    custom = np.array([[0.80, 0.55, 0.24], [0.25, 0.90, 0.35]]) * 2.0  # rows need not be unit
    stains = {"ruifrok": None, "custom": custom,
              "reference": Reference("macenko", custom / np.linalg.norm(custom, axis=1, keepdims=True),
                                     np.ones(2), np.zeros(0), np.zeros(0), np.asarray(240.0))}[matrix]
    ref_matrix = RUIFROK_HE if stains is None else custom
    x = he_tiles(3, 24)
    alpha = np.array([[1.2, 0.8], [0.9, 1.1], [1.0, 1.0]])
    beta = np.array([[0.1, -0.05], [-0.1, 0.2], [0.0, 0.0]])
    y = as_np(hed_jitter(x, alpha, beta, stains)).astype(np.float64)
    c_in, c_out = reference_concentrations(x, ref_matrix), reference_concentrations(y, ref_matrix)
    np.testing.assert_allclose(c_out[..., :2], alpha[:, None, None] * c_in[..., :2] + beta[:, None, None], atol=2e-4)
    np.testing.assert_allclose(c_out[..., 2], c_in[..., 2], atol=2e-4)  # residual kept
    np.testing.assert_allclose(y[2], x[2], atol=2e-3)                  # α = 1, β = 0: identity


def test_stain_augmentation_in_pipeline_uses_the_sampled_parameters():
    x = he_tiles(6, 32, seed=4)
    cfg = OFF(stain_p=1.0, stain_sigma=0.2)
    p = sample_params(jax.random.key(5), 6, cfg)
    a, b = as_np(p.stain_alpha), as_np(p.stain_beta)
    assert a.min() >= 0.8 and a.max() <= 1.2 and b.min() >= -0.2 and b.max() <= 0.2 and np.ptp(a) > 0.05
    y8 = as_np(augment(jax.random.key(5), x, cfg))
    assert np.array_equal(as_np(apply_params(x, p, cfg)), y8)  # augment = apply_params ∘ sample_params
    y = y8.astype(np.float64)
    c_in, c_out = reference_concentrations(x, RUIFROK_HE), reference_concentrations(y, RUIFROK_HE)
    ok = ((y > 10) & (y < 250)).all(-1)  # not clipped; uint8 rounding bounds the OD error by 0.5/(I+1)
    want = a[:, None, None] * c_in[..., :2] + b[:, None, None]
    err = np.abs(c_out[..., :2] - want)[ok]
    assert ok.mean() > 0.5 and err.max() < 0.1 and np.median(err) < 0.01


# --- configuration ------------------------------------------------------------------------
def test_config_is_frozen_hashable_and_validated():
    cfg = AugmentConfig()
    assert hash(cfg) == hash(AugmentConfig()) and cfg == AugmentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.flip_p = 0.0  # type: ignore[misc]
    np.testing.assert_allclose(np.linalg.norm(cfg.stain_matrix, axis=1), 1.0)
    ref = Reference("vahadane", np.array([[0.8, 0.55, 0.24], [0.25, 0.9, 0.35]]), np.ones(2), np.zeros(0),
                    np.zeros(0), np.asarray(240.0))
    assert AugmentConfig(stain_matrix=ref) == AugmentConfig(stain_matrix=ref.stain_matrix.tolist())
    assert (cfg.blur_radius, cfg.hue_shift, cfg.stain_p) == (12, 20 / 255, 0.0)
    bad = [dict(flip_p=1.5), dict(blur_p=0.5, noise_p=0.5, hsv_p=0.5), dict(scale_range=(1.2, 0.8)),
           dict(stain_matrix=np.eye(3)), dict(stain_matrix=[[1, 0, 0], [2, 0, 0]]), dict(fill="black"),
           dict(grey_alpha=(0.0, 2.0)), dict(batching="pmap"), dict(stain_sigma=-0.1)]
    for kw in bad:
        with pytest.raises(StimageError):
            AugmentConfig(**kw)
    with pytest.raises(StimageError):
        augment(jax.random.key(0), np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(StimageError):
        augment(jax.random.key(0), np.zeros((2, 8, 12, 3), np.uint8))  # rot90 needs square tiles


# --- real data ----------------------------------------------------------------------------
TILE = 299


@pytest.fixture(scope="module")
def her2st_crops(her2st_root) -> np.ndarray:
    """Eight 299-px crops centred on HER2ST section C2 spots (full-resolution H&E JPEG)."""
    imgs = her2st_root / "data" / "ST-imgs" / "C" / "C2"
    jpgs = sorted(imgs.glob("*.jpg"))
    assert jpgs, f"no HER2ST C2 image under {imgs}"
    img = cv2.cvtColor(cv2.imread(str(jpgs[0])), cv2.COLOR_BGR2RGB)
    spots = np.loadtxt(her2st_root / "data" / "ST-spotfiles" / "C2_selection.tsv", skiprows=1, usecols=(4, 5))
    out = []
    for cx, cy in spots[::20][:8]:
        x0, y0 = int(round(cx)) - TILE // 2, int(round(cy)) - TILE // 2
        out.append(img[y0:y0 + TILE, x0:x0 + TILE])
    return np.stack(out)


def mean_od(t: np.ndarray) -> np.ndarray:
    """Mean over pixels of the summed RGB optical density, per tile."""
    return (-np.log((t.astype(np.float64) + 1) / 256)).sum(-1).mean(axis=(-1, -2))


@pytest.mark.real_data
def test_her2st_crops_stay_in_tissue_colour_range(her2st_crops):
    x = her2st_crops
    assert x.shape == (8, TILE, TILE, 3) and mean_od(x).min() > 0.8  # tissue, not glass
    views = np.stack([as_np(augment(k, x, AugmentConfig())) for k in jax.random.split(jax.random.key(0), 8)])
    assert views.shape == (8,) + x.shape and views.dtype == np.uint8
    ratio = mean_od(views) / mean_od(x)[None]
    assert 0.5 < ratio.min() and ratio.max() < 1.5           # white fill of rotated corners lowers it
    assert 0.75 < ratio.mean(0).min() and ratio.mean(0).max() < 1.1
    od_in = (-np.log((x.astype(np.float64) + 1) / 256)).mean(axis=(1, 2))
    od_out = (-np.log((views.astype(np.float64) + 1) / 256)).mean(axis=(2, 3))
    cos = (od_in * od_out).sum(-1) / np.linalg.norm(od_in, axis=-1) / np.linalg.norm(od_out, axis=-1)
    assert cos.min() > 0.93                                  # still H&E coloured on average
    assert sum(not np.array_equal(v, t) for vs in views for v, t in zip(vs, x)) > 0.9 * 64
    # HED-light (Tellez et al., σ = 0.05) changes the amount of stain by a few per cent
    rng = np.random.default_rng(0)
    alpha, beta = rng.uniform(0.95, 1.05, (8, 2)), rng.uniform(-0.05, 0.05, (8, 2))
    hed = np.clip(np.rint(as_np(hed_jitter(x, alpha, beta))), 0, 255)
    r = mean_od(hed) / mean_od(x)
    assert 0.8 < r.min() and r.max() < 1.25 and np.abs(hed - x).mean() > 1
