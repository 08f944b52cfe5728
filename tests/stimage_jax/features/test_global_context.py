"""Global context features (issue 21): the field around a spot equals a manual crop and
resize of the image; the PCA equals the covariance's eigendecomposition; the combinations
are what they say."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_pipelines import keys
from data_pipelines.errors import StimageError
from stimage_jax.features.global_context import apply_pca, combine_global, field_tiles, fit_pca
from tests.conftest import make_sample


def manual_field(img: np.ndarray, cx: float, cy: float, side: int, px: int) -> np.ndarray:
    """Independent crop: white canvas, paste the image at the crop's offset, INTER_AREA."""
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    canvas = np.full((side + 2 * img.shape[0], side + 2 * img.shape[1], 3), 255, np.uint8)
    oy, ox = img.shape[0], img.shape[1]  # image placed at (ox, oy) on the big white canvas
    canvas[oy:oy + img.shape[0], ox:ox + img.shape[1]] = img
    crop = canvas[oy + y0:oy + y0 + side, ox + x0:ox + x0 + side]
    return cv2.resize(crop, (px, px), interpolation=cv2.INTER_AREA)


def test_field_is_a_larger_crop_resized(tmp_path):
    a = make_sample(tmp_path, "s0", seed=0)  # mpp 1 µm/px, image scale 1, spots 40 px apart from (40, 40)
    a.obs[keys.TILE_BORDER_FRAC] = 0.25
    img = cv2.cvtColor(cv2.imread(str(tmp_path / "s0.png")), cv2.COLOR_BGR2RGB)
    got = field_tiles(a, 120.0, 32, cache_dir=tmp_path / "cache", progress=False)
    assert got.shape == (a.n_obs, 32, 32, 3) and got.dtype == np.uint8
    for i in (0, 9, a.n_obs - 1):  # a corner spot (field past the image edge, padded white) and inner ones
        x, y = a.obsm[keys.SPATIAL][i]
        np.testing.assert_array_equal(got[i], manual_field(img, x, y, 120, 32))
    assert (a.obs[keys.TILE_BORDER_FRAC] == 0.25).all()  # the spot tiles' QC column is not overwritten
    # cached by content: a second call reads the same tiles back
    np.testing.assert_array_equal(field_tiles(a, 120.0, 32, cache_dir=tmp_path / "cache", progress=False), got)
    with pytest.raises(StimageError, match="positive size"):
        field_tiles(a, 0.0, 32, progress=False)


def test_pca_equals_eigendecomposition_of_the_covariance(rng):
    x = rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12)) + 3.0
    mean, comp = fit_pca(x, 4)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-5)
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False))
    ref = vecs[:, ::-1][:, :4].T  # leading eigenvectors, largest eigenvalue first
    sign = np.sign((comp * ref).sum(1))  # eigenvectors are defined up to sign
    assert (np.abs(sign) == 1).all()
    np.testing.assert_allclose(comp * sign[:, None], ref, atol=1e-4)
    scores = apply_pca(x, mean, comp)
    np.testing.assert_allclose(scores.var(0, ddof=1), vals[::-1][:4], rtol=1e-4)  # explained variances
    np.testing.assert_allclose(scores, (x - x.mean(0)) @ comp.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    # deterministic sign: the largest-|loading| entry of each component is positive
    assert (comp[np.arange(4), np.abs(comp).argmax(1)] > 0).all()
    assert fit_pca(x[:3], 10)[1].shape == (3, 12)  # at most N components


def test_combine_modes(rng):
    own, glob = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_array_equal(combine_global(own, glob, "concat"), np.hstack([own, glob]))
    np.testing.assert_allclose(combine_global(own, glob, "mean"), (own + glob) / 2, rtol=1e-6)
    pca = fit_pca(glob, 2)
    got = combine_global(own, glob, "pca", pca)
    assert got.shape == (5, 8)
    np.testing.assert_array_equal(got[:, :6], own)
    np.testing.assert_allclose(got[:, 6:], (glob - glob.mean(0)) @ pca[1].T, rtol=1e-4, atol=1e-5)
    with pytest.raises(StimageError, match="fitted projection"):
        combine_global(own, glob, "pca")
    with pytest.raises(StimageError, match="unknown global context mode"):
        combine_global(own, glob, "max")
    with pytest.raises(StimageError, match="equal"):
        combine_global(own, glob[:4], "mean")


@pytest.mark.real_data
def test_field_on_her2st_equals_manual_crop(her2st_root):
    """300 µm fields of HER2ST C6 spots equal a crop of the JPEG read by OpenCV, resized."""
    from data_pipelines.slides import read_her2st

    a = read_her2st(her2st_root, "C6", require_image=True)[[0, 50, 100]].copy()
    meta = a.uns[keys.SPATIAL_UNS]["C6"]["metadata"]
    mpp, scale = a.uns[keys.STIMAGE_UNS][keys.MPP], float(a.uns[keys.STIMAGE_UNS].get("image_scale", 1.0))
    img = cv2.cvtColor(cv2.imread(str(meta[keys.IMAGE_PATH])), cv2.COLOR_BGR2RGB)
    got = field_tiles(a, 300.0, 64, progress=False)
    side = int(round(300.0 / mpp * scale))
    for i in range(a.n_obs):
        x, y = a.obsm[keys.SPATIAL][i] * scale
        np.testing.assert_array_equal(got[i], manual_field(img, x, y, side, 64))
