"""Tissue mask and tile QC: a known disc of tissue, exact coverage references, filtering, HER2ST."""

import logging
import warnings

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import library_metadata
from data_pipelines.tiles import crop_tile, tile_geometry
from data_pipelines.tissue import (TISSUE_COVERAGE, add_tissue_coverage, filter_by_coverage, spot_tissue_coverage,
                                   square_coverage, tissue_mask)

from .conftest import write_rgb

H, W, CX, CY, R = 600, 800, 420, 290, 200  # image size and the tissue disc (image px)


def he_disc(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, bool truth): noisy glass, an eosin-pink disc with dark nuclei and pale gaps."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), (238, 236, 240), np.uint8)
    truth = np.zeros((H, W), np.uint8)
    cv2.circle(truth, (CX, CY), R, 1, -1)
    img[truth > 0] = (222, 150, 196)
    for _ in range(900):  # nuclei (dark purple) and small pale gaps, all well inside the disc
        a, rr = rng.uniform(0, 2 * np.pi), (R - 12) * np.sqrt(rng.uniform())
        p = (int(CX + rr * np.cos(a)), int(CY + rr * np.sin(a)))
        pale = rng.uniform() < 0.1
        cv2.circle(img, p, int(rng.integers(2, 5)), (236, 228, 236) if pale else (95, 60, 140), -1)
    img = np.clip(img.astype(int) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    return img, truth > 0


def disc_fraction(xy, side) -> np.ndarray:
    """Fine-grained reference: fraction of each crop square inside the continuous disc.

    cv2.circle fills pixel (i, j) when its index lies in the disc, i.e. the pixel square
    [i, i+1) is centred on i + 0.5 in continuous coordinates.
    """
    n = 200
    t = (np.arange(n) + 0.5) / n * side
    out = []
    for cx, cy in np.asarray(xy, float):
        x0, y0 = np.round(cx - side / 2), np.round(cy - side / 2)
        gx, gy = np.meshgrid(x0 + t, y0 + t)
        inside_img = (gx >= 0) & (gx < W) & (gy >= 0) & (gy < H)
        out.append(np.mean(inside_img & ((gx - CX - 0.5) ** 2 + (gy - CY - 0.5) ** 2 <= R ** 2)))
    return np.array(out)


def spots_adata(path, xy, *, spot_um=40.0, mpp=1.0, image_scale=1.0, name="s") -> ad.AnnData:
    """AnnData whose spots lie at ``xy`` full-res px on the image ``path``, like the readers write it."""
    n = len(xy)
    obs = pd.DataFrame({keys.SAMPLE: pd.Categorical([name] * n)}, index=[f"{name}_{i}" for i in range(n)])
    a = ad.AnnData(sp.csr_matrix(np.ones((n, 2), np.int32)), obs=obs, var=pd.DataFrame(index=["A", "B"]))
    a.obsm[keys.SPATIAL] = np.asarray(xy, np.float64)
    a.uns[keys.SPATIAL_UNS] = {name: {"scalefactors": {}, "metadata": library_metadata(
        str(path), mpp, spot_um, image_scale, "test")}}
    a.uns[keys.STIMAGE_UNS] = {keys.MPP: mpp, keys.SPOT_DIAMETER_UM: spot_um, keys.LIBRARY_ID: name,
                               keys.IMAGE_SCALE: image_scale, keys.DROPPED: {"outside_image": 1}}
    return a


def iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("method", ["otsu", "grabcut"])
@pytest.mark.parametrize("max_side", [2048, 300])
def test_mask_finds_the_disc(method, max_side):
    img, truth = he_disc()
    mask, scale = tissue_mask(img, method=method, max_side=max_side)
    assert mask.dtype == bool and max(mask.shape) <= max_side
    assert scale == pytest.approx(mask.shape[1] / W)
    low = cv2.resize(truth.astype(np.float32), mask.shape[::-1], interpolation=cv2.INTER_AREA) > 0.5
    assert iou(mask, low) > 0.95, iou(mask, low)


def test_blank_images_have_no_tissue(tmp_path):
    with pytest.raises(StimageError, match="^no tissue found in image$"):
        tissue_mask(np.full((300, 400, 3), 255, np.uint8))
    rng = np.random.default_rng(1)  # pinkish glass with sensor noise: Otsu would split the noise
    glass = np.clip(np.array([240, 228, 236]) + rng.integers(-5, 6, (300, 400, 3)), 0, 255).astype(np.uint8)
    for method in ("otsu", "grabcut"):
        with pytest.raises(StimageError, match="no tissue found in glass.png"):
            tissue_mask(glass, method=method, what="glass.png")
    a = spots_adata(write_rgb(tmp_path / "glass.png", glass), [[100.0, 100.0]])
    with pytest.raises(StimageError, match=r"no tissue found in sample s image .*glass\.png"):
        spot_tissue_coverage(a)
    with pytest.raises(StimageError, match="unknown tissue mask method 'magic'"):
        tissue_mask(glass, method="magic")


@pytest.mark.parametrize("max_side,tol", [(2048, 0.02), (400, 0.05)])  # tol: ~1/2 mask px of boundary
def test_coverage_inside_outside_and_on_the_edge(tmp_path, max_side, tol):
    img, _ = he_disc()
    path = write_rgb(tmp_path / "disc.png", img)
    inside = [[CX, CY], [CX + 90, CY - 60], [CX - 120, CY + 50]]
    outside = [[60, 60], [740, 540], [CX - R - 40, CY]]
    edge = [[CX + R * np.cos(a), CY + R * np.sin(a)] for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
    edge += [[CX + R - 10, CY], [CX, CY - R - 12]]  # mostly in, mostly out
    xy = np.array(inside + outside + edge)
    cov = spot_tissue_coverage(spots_adata(path, xy), max_side=max_side)
    assert cov.dtype == np.float32 and cov.shape == (len(xy),)
    np.testing.assert_array_equal(cov[:3], 1.0)
    np.testing.assert_array_equal(cov[3:6], 0.0)
    ref = disc_fraction(xy[6:], 40)
    assert 0.3 < ref[:8].min() and ref[:8].max() < 0.55 and ref[8] > 0.7 and ref[9] < 0.3  # the setup is as meant
    np.testing.assert_allclose(cov[6:], ref, atol=tol)


def test_squares_partly_outside_the_image(tmp_path):
    full = np.ones((50, 80), bool)  # all tissue: coverage is the part inside the image
    xy = np.array([[0, 0], [0, 25], [80, 25], [79.9, 49.9], [40, -10], [-30, 25], [40, 25]])
    np.testing.assert_allclose(square_coverage(full, (50, 80), xy, 20), [.25, .5, .5, .25, 0, 0, 1])
    np.testing.assert_allclose(square_coverage(full[::2, ::2], (50, 80), xy, 20), [.25, .5, .5, .25, 0, 0, 1])
    # through the pipeline: tissue on the left half of an image, spots on its left edge / corner
    img = np.full((200, 300, 3), 240, np.uint8)
    img[:, :150] = (200, 110, 170)
    a = spots_adata(write_rgb(tmp_path / "half.png", img), [[0, 100], [0, 0], [299, 199], [150, 100]])
    np.testing.assert_allclose(spot_tissue_coverage(a), [0.5, 0.25, 0.0, 0.5], atol=0.01)


def _crop_tile_reference(mask_full: np.ndarray, xy, crop_px) -> np.ndarray:
    """Brute force: the very crop ``crop_tile`` cuts (tissue 0, glass 255, pad 255), averaged."""
    img = np.repeat(np.where(mask_full, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    side = max(int(round(crop_px)), 1)
    return np.array([(crop_tile(img, x, y, crop_px, side)[0][..., 0] == 0).mean() for x, y in xy])


@pytest.mark.parametrize("factor", [1, 4])
def test_integral_image_equals_brute_force_crop_mean(factor):
    rng = np.random.default_rng(3)
    low = cv2.resize(rng.uniform(size=(9, 13)), (53, 37)) > 0.5  # blobs, (37, 53) mask px
    full = np.repeat(np.repeat(low, factor, 0), factor, 1)     # the same mask at image resolution
    h, w = full.shape
    for crop_px in (1.0, 3.4, 8.5, 17.0, 30.6):
        xy = rng.uniform([-20, -20], [w + 20, h + 20], size=(200, 2))
        xy[:20] = np.round(xy[:20]) + 0.5  # exact halves: round-half-even must match crop_tile
        got = square_coverage(low, full.shape, xy, crop_px)
        np.testing.assert_allclose(got, _crop_tile_reference(full, xy, crop_px), rtol=0, atol=1e-9)


def test_integral_image_with_a_non_integer_scale():
    rng = np.random.default_rng(4)
    low = cv2.resize(rng.uniform(size=(7, 9)), (53, 37)) > 0.5
    shape = (101, 143)  # 2.73 and 2.70 image px per mask px
    sy, sx = low.shape[0] / shape[0], low.shape[1] / shape[1]
    xy = rng.uniform([-10, -10], [153, 111], size=(60, 2))
    got = square_coverage(low, shape, xy, 21.3)
    k, side = 16, 21  # reference: 16×16 samples per image px, each looked up in the mask
    ref = []
    for x, y in xy:
        x0, y0 = np.round(x - side / 2), np.round(y - side / 2)
        t = (np.arange(side * k) + 0.5) / k
        gx, gy = np.meshgrid(x0 + t, y0 + t)
        ok = (gx >= 0) & (gx < shape[1]) & (gy >= 0) & (gy < shape[0])
        i = np.clip((gx * sx).astype(int), 0, low.shape[1] - 1)
        j = np.clip((gy * sy).astype(int), 0, low.shape[0] - 1)
        ref.append(np.mean(ok & low[j, i]))
    err = np.abs(got - np.array(ref))
    assert err.max() < 0.01 and err.mean() < 0.002, (err.max(), err.mean())


def test_synthetic_study_spots_cover_their_discs(synthetic_study):
    a = ad.read_h5ad(synthetic_study[0])  # a disc of radius 13 px per spot, 26 µm tiles at 1 µm/px
    cov = spot_tissue_coverage(a)
    assert np.all(np.abs(cov - np.pi / 4) < 0.06), cov  # disc / square = π/4
    assert np.all(spot_tissue_coverage(a, tile_um=13.0) == 1.0)  # the inner square is all tissue


def test_concatenated_samples_use_their_own_image_and_scale(tmp_path):
    img, _ = he_disc()
    xy = np.array([[CX, CY], [60, 60], [CX + R, CY], [CX, CY + R + 5]])
    a = spots_adata(write_rgb(tmp_path / "a.png", img), xy, name="a")
    half = cv2.resize(img, (W // 2, H // 2), interpolation=cv2.INTER_AREA)  # like a hires image
    b = spots_adata(write_rgb(tmp_path / "b.png", half), xy, name="b", image_scale=0.5)
    both = ad.concat([a, b], uns_merge="unique")
    assert tile_geometry(both)["samples"]["b"]["crop_px"] == 20.0
    cov = spot_tissue_coverage(both)
    np.testing.assert_array_equal(cov[:4], spot_tissue_coverage(a))
    np.testing.assert_array_equal(cov[4:], spot_tissue_coverage(b))
    np.testing.assert_allclose(cov[4:], cov[:4], atol=0.05)  # same tissue, half the pixels


def test_add_tissue_coverage_writes_obs(tmp_path):
    img, _ = he_disc()
    a = spots_adata(write_rgb(tmp_path / "disc.png", img), [[CX, CY], [60, 60], [CX + R, CY]])
    assert add_tissue_coverage(a) is a  # annotated in place, like spot_tiles
    assert a.obs[TISSUE_COVERAGE].dtype == np.float32
    assert a.obs[TISSUE_COVERAGE].tolist()[:2] == [1.0, 0.0]
    view = a[:2]
    del a.obs[TISSUE_COVERAGE]
    got = add_tissue_coverage(view)
    assert not got.is_view and TISSUE_COVERAGE in got.obs and TISSUE_COVERAGE not in a.obs


def test_filter_drops_and_records_the_reason(tmp_path, caplog):
    img, _ = he_disc()
    path = write_rgb(tmp_path / "disc.png", img)
    xy = [[CX, CY], [60, 60], [CX + R, CY], [CX - 50, CY], [740, 540]]
    a = spots_adata(path, xy)
    a.uns[keys.STIMAGE_UNS][keys.DROPPED]["tissue_coverage<0.7"] = 2  # merged, not overwritten
    before = a.copy()
    with caplog.at_level(logging.INFO, logger="stimage"):
        out = filter_by_coverage(a)
    assert "3 of 5 spot(s) with < 0.7 tissue in their tile dropped (s: 3)" in caplog.text
    assert list(out.obs_names) == ["s_0", "s_3"]
    assert out.obs[TISSUE_COVERAGE].tolist() == [1.0, 1.0] and out.obs[TISSUE_COVERAGE].dtype == np.float32
    assert out.uns[keys.STIMAGE_UNS][keys.DROPPED] == {"outside_image": 1, "tissue_coverage<0.7": 5}
    # the input is untouched
    assert a.n_obs == 5 and TISSUE_COVERAGE not in a.obs
    assert a.uns[keys.STIMAGE_UNS][keys.DROPPED] == before.uns[keys.STIMAGE_UNS][keys.DROPPED]
    # a stored coverage is used as is (no image needed), and the threshold names the reason
    a.obs[TISSUE_COVERAGE] = np.array([0.9, 0.2, 0.5, 1.0, 0.0], np.float32)
    path.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = filter_by_coverage(a, min_coverage=0.5)
    assert list(out.obs_names) == ["s_0", "s_2", "s_3"]
    assert out.uns[keys.STIMAGE_UNS][keys.DROPPED]["tissue_coverage<0.5"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning, a zero count
        kept = filter_by_coverage(a, min_coverage=0.0)
    assert kept.n_obs == 5 and kept.uns[keys.STIMAGE_UNS][keys.DROPPED]["tissue_coverage<0"] == 0


def test_filter_refuses_to_drop_everything(tmp_path):
    img, _ = he_disc()
    a = spots_adata(write_rgb(tmp_path / "disc.png", img), [[60, 60], [CX + R, CY], [740, 540]])
    with pytest.raises(StimageError, match=r"^all 3 spots have < 0.7 tissue coverage \(max 0.\d\d\); "):
        filter_by_coverage(a)
    with pytest.raises(StimageError, match="min_coverage must be in"):
        filter_by_coverage(a, min_coverage=1.5)
    a.obs[TISSUE_COVERAGE] = [1.0, np.nan, 0.0]
    with pytest.raises(StimageError, match="not finite at spot s_1"):
        filter_by_coverage(a)


def test_jpeg_is_decoded_reduced_and_agrees_with_the_whole_image(tmp_path, monkeypatch):
    import data_pipelines.tissue as tissue_mod

    img, _ = he_disc()
    img = np.pad(img, ((0, 3), (0, 5), (0, 0)), mode="edge")  # 603 × 805: not a multiple of 4
    xy = np.array([[CX, CY], [60, 60], [CX + R, CY], [CX - R, CY], [CX, CY - R], [804, 602]])
    png = spots_adata(write_rgb(tmp_path / "d.png", img), xy)
    jpg_path = tmp_path / "d.jpg"
    assert cv2.imwrite(str(jpg_path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    flags = []
    real = cv2.imread
    monkeypatch.setattr(tissue_mod.cv2, "imread", lambda p, f=cv2.IMREAD_COLOR: flags.append(f) or real(p, f))
    cov_jpg = spot_tissue_coverage(spots_adata(jpg_path, xy), max_side=200)  # 1/4 decode: 151 × 202
    assert flags == [cv2.IMREAD_REDUCED_COLOR_4]
    np.testing.assert_allclose(cov_jpg, spot_tissue_coverage(png, max_side=200), atol=0.05)


@pytest.mark.real_data
def test_her2st_spots_lie_on_tissue_and_corners_do_not(her2st_root):
    from data_pipelines.slides import read_her2st
    from data_pipelines.slides.common import image_size

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = read_her2st(her2st_root, "C2", require_image=True)
    cov = spot_tissue_coverage(a)
    assert np.median(cov) > 0.9 and np.mean(cov >= 0.7) >= 0.9, (np.median(cov), np.mean(cov >= 0.7))
    # tile squares placed in the four image corners are glass
    w, h = image_size(a.uns[keys.SPATIAL_UNS]["C2"]["metadata"][keys.IMAGE_PATH])
    half = tile_geometry(a)["crop_px"] / 2
    corners = a[:4].copy()
    corners.obsm[keys.SPATIAL] = np.array([[half, half], [w - half, half], [half, h - half], [w - half, h - half]])
    assert (spot_tissue_coverage(corners) < 0.1).all()
