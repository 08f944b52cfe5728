"""Spot tiling: exact crops, border padding, physical size, per-sample geometry, cache, bad input."""

import warnings

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import data_pipelines.tiles as tiles_mod
from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.tiles import spot_tiles, tile_geometry

from .conftest import write_rgb


def test_crop_is_centred_and_physical(square_slide):
    a, img, _ = square_slide
    # 10 µm at 0.5 µm/px = 20 px crop, kept at 20 px: the square fills the middle 10×10
    t = spot_tiles(a, tile_px=20, progress=False)
    assert t.shape == (2, 20, 20, 3) and t.dtype == np.uint8
    np.testing.assert_array_equal(t[0], img[30:50, 40:60])
    assert (t[0][5:15, 5:15] == (255, 0, 0)).all() and (t[0][:5] == 128).all()
    g = tile_geometry(a, tile_px=20)
    assert {k: g[k] for k in ("tile_um", "tile_px", "mpp", "image_scale", "crop_px")} == \
        {"tile_um": 10.0, "tile_px": 20, "mpp": 0.5, "image_scale": 1.0, "crop_px": 20.0}


def test_border_padding_fraction_is_exact(square_slide):
    a, img, _ = square_slide
    t = spot_tiles(a, tile_px=20, progress=False)
    assert a.obs[keys.TILE_BORDER_FRAC].tolist() == [0.0, 0.75]
    assert (t[1][:10] == 255).all() and (t[1][:, :10] == 255).all()  # white pad
    np.testing.assert_array_equal(t[1][10:, 10:], img[:10, :10])


def test_resize_to_tile_px(square_slide):
    a, img, _ = square_slide
    t = spot_tiles(a, tile_um=20.0, tile_px=8, progress=False)  # 40 px crop → 8 px (INTER_AREA)
    assert t.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(t[0], cv2.resize(img[20:60, 30:70], (8, 8), interpolation=cv2.INTER_AREA))
    # 5x5 averaging blocks: the block over the square's centre is pure red
    np.testing.assert_array_equal(t[0][3:5, 3:5], np.broadcast_to([255, 0, 0], (2, 2, 3)))
    up = spot_tiles(a, tile_um=5.0, tile_px=30, progress=False)  # 10 px crop → 30 px (INTER_LINEAR)
    assert (up[0] == (255, 0, 0)).all()


def test_image_read_once_and_cache_reused_without_it(square_slide, tmp_path, monkeypatch):
    a, _, path = square_slide
    reads = []
    real = cv2.imread
    monkeypatch.setattr(tiles_mod.cv2, "imread", lambda *args: reads.append(args[0]) or real(*args))
    first = np.array(spot_tiles(a, tile_px=20, cache_dir=tmp_path / "c", progress=False))
    assert reads == [str(path)]  # one read for all spots
    path.rename(path.with_suffix(".gone"))
    a.obs[keys.TILE_BORDER_FRAC] = 0.5
    again = spot_tiles(a, tile_px=20, cache_dir=tmp_path / "c", progress=False)
    assert reads == [str(path)] and isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(first, again)
    assert a.obs[keys.TILE_BORDER_FRAC].tolist() == [0.0, 0.75]  # restored from the cache
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(files) == 2 and files[0].startswith("s__10um_20px__")  # tiles + border, no temp files
    with pytest.raises(StimageError, match=f"image {path} not found"):
        spot_tiles(a, tile_px=21, cache_dir=tmp_path / "c", progress=False)  # other size: no cache


def test_corrupt_cache_is_rebuilt(square_slide, tmp_path):
    a, img, _ = square_slide
    spot_tiles(a, tile_px=20, cache_dir=tmp_path, progress=False)
    cache = next(p for p in tmp_path.glob("s__*.npy") if ".border" not in p.name)
    cache.write_bytes(cache.read_bytes()[:200])  # truncated by a crash
    with pytest.warns(UserWarning, match="rebuilding it"):
        t = spot_tiles(a, tile_px=20, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(t[0], img[30:50, 40:60])


def _slide(tmp_path, name, mpp, image_scale=1.0):
    """One sample whose image has a red 10×10 square at its only spot (60, 60)."""
    img = np.full((120, 120, 3), 90, np.uint8)
    img[55:65, 55:65] = (255, 0, 0)
    path = write_rgb(tmp_path / f"{name}.png", img)
    a = ad.AnnData(sp.csr_matrix(np.ones((1, 1), np.int32)), obs=pd.DataFrame({keys.SAMPLE: [name]}, index=[name]),
                   var=pd.DataFrame(index=["G"]))
    a.obsm[keys.SPATIAL] = np.array([[60.0, 60.0]]) / image_scale
    meta = {keys.IMAGE_PATH: str(path), keys.MPP: mpp, keys.SPOT_DIAMETER_UM: 10.0, "image_scale": image_scale}
    a.uns[keys.SPATIAL_UNS] = {name: {"scalefactors": {}, "metadata": meta}}
    a.uns[keys.STIMAGE_UNS] = {keys.MPP: mpp, keys.SPOT_DIAMETER_UM: 10.0, "library_id": name, "image_scale": image_scale}
    return a, img


def test_concatenated_samples_use_their_own_geometry(tmp_path):
    (a, img_a), (b, img_b) = _slide(tmp_path, "a", 0.5), _slide(tmp_path, "b", 1.0, image_scale=0.5)
    both = ad.concat([a, b], uns_merge="unique")
    assert keys.MPP not in both.uns[keys.STIMAGE_UNS]  # differing values are dropped by concat
    g = tile_geometry(both, tile_px=10)
    assert g["mpp"] is None and g["crop_px"] is None
    assert {s: v["crop_px"] for s, v in g["samples"].items()} == {"a": 20.0, "b": 5.0}
    t = spot_tiles(both, tile_px=10, cache_dir=tmp_path / "c", progress=False)
    # a: 10 µm = 20 px → 10 px; b: 10 µm = 10 full-res px = 5 image px → 10 px
    np.testing.assert_array_equal(t[0], cv2.resize(img_a[50:70, 50:70], (10, 10), interpolation=cv2.INTER_AREA))
    assert (t[1] == (255, 0, 0)).all()
    assert len(list((tmp_path / "c").glob("*.npy"))) == 4  # one tiles + one border file per sample
    np.testing.assert_array_equal(spot_tiles(both, tile_px=10, cache_dir=tmp_path / "c", progress=False), t)
    # the top-level uns of one sample must not be applied to another
    first = ad.concat([a, b], uns_merge="first")
    for s in ("a", "b"):
        del first.uns[keys.SPATIAL_UNS][s]["metadata"][keys.MPP]
    with pytest.raises(StimageError, match="sample b: no 'mpp'"):
        spot_tiles(first, tile_px=10, progress=False)


def test_bad_input(square_slide, tmp_path):
    a, _, _ = square_slide
    b = a.copy()
    b.obsm[keys.SPATIAL] = np.array([[50.0, 40.0], [500.0, 40.0]])
    with pytest.raises(StimageError, match="1 spot\\(s\\) lie outside the 200x120 image \\(e.g. corner\\)"):
        spot_tiles(b, tile_px=20, progress=False)
    c = a.copy()
    del c.uns[keys.STIMAGE_UNS]
    with pytest.raises(StimageError, match="no 'spot_diameter_um'"):
        spot_tiles(c, progress=False)
    with pytest.raises(StimageError, match="no 'mpp'"):
        spot_tiles(c, tile_um=10.0, progress=False)
    d = a.copy()
    d.uns[keys.SPATIAL_UNS]["s"]["metadata"][keys.IMAGE_PATH] = str(tmp_path / "gone.jpg")
    with pytest.raises(StimageError, match=f"image {tmp_path / 'gone.jpg'} not found"):
        spot_tiles(d, progress=False)
    d.uns[keys.SPATIAL_UNS]["s"]["metadata"][keys.IMAGE_PATH] = ""  # HER2ST section without image
    with pytest.raises(StimageError, match="image \\(none recorded\\) not found"):
        spot_tiles(d, progress=False)
    (tmp_path / "trunc.jpg").write_bytes(b"\xff\xd8\xff")
    d.uns[keys.SPATIAL_UNS]["s"]["metadata"][keys.IMAGE_PATH] = str(tmp_path / "trunc.jpg")
    with pytest.raises(StimageError, match="trunc.jpg is unreadable"):
        spot_tiles(d, progress=False)
    with pytest.raises(StimageError, match="tile size must be positive"):
        spot_tiles(a, tile_um=-1.0, progress=False)


@pytest.mark.real_data
def test_her2st_tiles_are_tissue(her2st_root):
    from data_pipelines.slides import read_her2st

    a = read_her2st(her2st_root, "C3")
    t = spot_tiles(a, tile_px=32, progress=False)
    assert t.shape == (a.n_obs, 32, 32, 3)
    # 100 µm at ≈ 0.687 µm/px ≈ 146 px crops, all inside the image
    assert tile_geometry(a, tile_px=32)["crop_px"] == pytest.approx(145.5, abs=0.5)
    assert a.obs[keys.TILE_BORDER_FRAC].max() == 0.0
    # spots lie on stained tissue: darker than glass (≈ 240) on average
    assert np.median(t.reshape(len(t), -1).mean(1)) < 215
