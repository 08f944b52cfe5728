"""Spot tiling: exact crops, border padding, physical size, cache, bad input."""

import numpy as np
import pytest

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.tiles import spot_tiles, tile_geometry


def test_crop_is_centred_and_physical(square_slide):
    a, img, _ = square_slide
    # 10 µm at 0.5 µm/px = 20 px crop, kept at 20 px: the square fills the middle 10×10
    t = spot_tiles(a, tile_px=20, progress=False)
    assert t.shape == (2, 20, 20, 3) and t.dtype == np.uint8
    np.testing.assert_array_equal(t[0], img[30:50, 40:60])
    assert (t[0][5:15, 5:15] == (255, 0, 0)).all()
    assert tile_geometry(a, tile_px=20)["crop_px"] == 20.0


def test_border_padding_fraction_is_exact(square_slide):
    a, img, _ = square_slide
    t = spot_tiles(a, tile_px=20, progress=False)
    assert a.obs[keys.TILE_BORDER_FRAC].tolist() == [0.0, 0.75]
    assert (t[1][:10] == 255).all() and (t[1][:, :10] == 255).all()  # white pad
    np.testing.assert_array_equal(t[1][10:, 10:], img[:10, :10])


def test_resize_to_tile_px(square_slide):
    a, _, _ = square_slide
    t = spot_tiles(a, tile_um=20.0, tile_px=8, progress=False)  # 40 px crop → 8 px
    assert t.shape == (2, 8, 8, 3)
    centre = t[0][3:5, 3:5].reshape(-1, 3)
    assert (centre[:, 0] > 200).all() and (centre[:, 1] < 60).all()  # red survives INTER_AREA


def test_cache_reused_without_the_image(square_slide, tmp_path):
    a, _, path = square_slide
    first = np.array(spot_tiles(a, tile_px=20, cache_dir=tmp_path / "c", progress=False))
    path.rename(path.with_suffix(".gone"))
    again = spot_tiles(a, tile_px=20, cache_dir=tmp_path / "c", progress=False)
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(first, again)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2  # tiles + border fractions, one sample
    with pytest.raises(StimageError, match="not found"):
        spot_tiles(a, tile_px=21, cache_dir=tmp_path / "c", progress=False)


def test_bad_input(square_slide):
    a, _, _ = square_slide
    b = a.copy()
    b.obsm[keys.SPATIAL] = np.array([[50.0, 40.0], [500.0, 40.0]])
    with pytest.raises(StimageError, match="1 spot\\(s\\) lie outside the 200x120 image"):
        spot_tiles(b, tile_px=20, progress=False)
    c = a.copy()
    del c.uns[keys.STIMAGE_UNS]
    with pytest.raises(StimageError, match="mpp"):
        spot_tiles(c, progress=False)


@pytest.mark.real_data
def test_her2st_tiles_are_tissue(her2st_root):
    from data_pipelines.slides import read_her2st

    a = read_her2st(her2st_root, "C3")
    t = spot_tiles(a, tile_px=32, progress=False)
    assert t.shape == (a.n_obs, 32, 32, 3)
    # spots lie on stained tissue: darker than glass (≈ 240) on average
    assert np.median(t.reshape(len(t), -1).mean(1)) < 215
