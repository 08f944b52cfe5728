"""Deep Zoom tiles equal the slide's own pixels: at full resolution the slide's region, one
level down the pyramid level itself (no resampling), for tifffile pyramids, OpenSlide and a
decoded PNG."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from data_pipelines.wsi import open_slide
from export.viewer.deepzoom import DeepZoom, LevelSlide


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(base, 8, 0), 8, 1)[:h, :w])


def _pyramid_tiff(path, img, *, subifds: bool):
    levels = [img, img[::2, ::2].copy(), img[::4, ::4].copy()]  # exact halvings of a blocky image
    with tifffile.TiffWriter(path) as tw:
        opts = dict(tile=(256, 256), photometric="rgb", compression="zlib")
        tw.write(levels[0], subifds=2 if subifds else None, resolution=(20000, 20000), resolutionunit="CENTIMETER",
                 **opts)
        for lev in levels[1:]:
            tw.write(lev, subfiletype=1, **opts)
    return levels


@pytest.mark.parametrize("subifds", [True, False])
def test_tiles_are_the_slide_pixels(tmp_path, subifds):
    img = _image(1500, 1000)
    levels = _pyramid_tiff(tmp_path / "s.tif", img, subifds=subifds)
    slide = open_slide(tmp_path / "s.tif")
    dz = DeepZoom(slide)
    top = dz.gen.level_count - 1
    assert dz.gen.level_dimensions[top] == (1000, 1500)
    np.testing.assert_array_equal(np.asarray(dz.gen.get_tile(top, (0, 0))), img[:255, :255])
    np.testing.assert_array_equal(np.asarray(dz.gen.get_tile(top, (1, 2))), img[507:763, 253:509])
    np.testing.assert_array_equal(np.asarray(dz.gen.get_tile(top - 1, (0, 0))), levels[1][:255, :255])
    np.testing.assert_array_equal(np.asarray(dz.gen.get_tile(top - 2, (0, 0))), levels[2][:255, :250])
    jpg = dz.tile(top, 0, 0)
    assert jpg[:3] == b"\xff\xd8\xff" and dz.tile(top, 0, 0) is jpg  # cached
    with pytest.raises(ValueError):
        dz.tile(top, 99, 0)


def test_tifffile_pyramid_reads_the_nearest_level(tmp_path):
    img = _image(1500, 1000)
    _pyramid_tiff(tmp_path / "s.tif", img, subifds=True)
    slide = open_slide(tmp_path / "s.tif", backend="tifffile")
    dz = DeepZoom(slide)
    assert isinstance(dz.gen._osr, LevelSlide) and dz.gen._osr.level_downsamples == (1.0, 2.0, 4.0)
    assert dz.gen._osr.get_best_level_for_downsample(3.0) == 1
    assert dz.gen._osr.get_best_level_for_downsample(64.0) == 2
    # a thumbnail-level tile of the whole slide comes from level 2, resized (close to its mean)
    small = np.asarray(dz.gen.get_tile(dz.gen.level_count - 4, (0, 0)), np.float64)
    assert abs(small.mean() - img.mean()) < 2.0


def test_png_gets_an_in_memory_pyramid(tmp_path):
    import cv2

    img = _image(1300, 900, seed=3)
    cv2.imwrite(str(tmp_path / "s.png"), img[..., ::-1])
    dz = DeepZoom(open_slide(tmp_path / "s.png", mpp=1.0))
    top = dz.gen.level_count - 1
    np.testing.assert_array_equal(np.asarray(dz.gen.get_tile(top, (2, 1))), img[253:509, 507:763])
    half = cv2.resize(img, (450, 650), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(np.asarray(dz.gen.get_tile(top - 1, (0, 0))), half[:255, :255])
