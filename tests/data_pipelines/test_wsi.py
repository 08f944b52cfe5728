"""Whole-slide reading, tissue mask and grid tiling on generated pyramidal TIFFs and HER2ST."""

import cv2
import numpy as np
import pytest

from data_pipelines.errors import StimageError
from data_pipelines.wsi import iter_grid_tiles, open_slide, slide_grid


def test_open_reads_mpp_and_regions(tmp_path, make_slide):
    img = make_slide(tmp_path / "s.tif", mpp=0.5)
    s = open_slide(tmp_path / "s.tif")
    assert (s.width, s.height) == (1600, 1200) and s.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(s.region(100, 50, 30, 20), img[50:70, 100:130])
    edge = s.region(-10, -10, 20, 20)
    assert (edge[:10] == 255).all() and np.array_equal(edge[10:, 10:], img[:10, :10])
    make_slide(tmp_path / "a.svs", mpp=0.2520, svs_description=True, tags=False)
    assert open_slide(tmp_path / "a.svs").mpp == pytest.approx(0.252)


def test_grid_keeps_tissue_only(tmp_path, make_slide):
    make_slide(tmp_path / "s.tif", mpp=0.5)
    s = open_slide(tmp_path / "s.tif")
    centres, cov, crop = slide_grid(s, tile_um=50.0, min_coverage=0.7)  # 100 px tiles
    assert crop == 100.0
    r = np.hypot(centres[:, 0] - 800, centres[:, 1] - 600)
    assert (r < 400).all()                      # inside the disc (radius 400 px) ...
    assert ((r < 300) | (cov < 1)).all()        # ... and every cell well inside is kept
    assert len(centres) > 0.8 * np.pi * 300**2 / 100**2
    assert (cov >= 0.7).all() and (cov <= 1).all()
    (sl, tiles), = list(iter_grid_tiles(s, centres[:3], crop, 100, batch_size=8))
    x0, y0 = int(centres[0, 0] - 50), int(centres[0, 1] - 50)
    np.testing.assert_array_equal(tiles[0], s.region(x0, y0, 100, 100))
    assert [t.shape for _, t in iter_grid_tiles(s, centres, crop, 32, batch_size=16)][0] == (16, 32, 32, 3)


def test_bad_slides(tmp_path, make_slide):
    make_slide(tmp_path / "nompp.tif", tags=False)
    with pytest.raises(StimageError, match="no µm-per-pixel metadata; pass --mpp"):
        open_slide(tmp_path / "nompp.tif")
    assert open_slide(tmp_path / "nompp.tif", mpp=0.25).mpp == 0.25
    data = (tmp_path / "nompp.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[:200])
    with pytest.raises(StimageError, match="unreadable or truncated"):
        open_slide(tmp_path / "trunc.tif", mpp=0.5)
    glass = np.full((400, 400, 3), 240, np.uint8)
    cv2.imwrite(str(tmp_path / "glass.png"), glass)
    with pytest.raises(StimageError, match="no tissue found"):
        slide_grid(open_slide(tmp_path / "glass.png", mpp=0.5), tile_um=20)
    with pytest.raises(StimageError, match="not found"):
        open_slide(tmp_path / "missing.svs")


@pytest.mark.real_data
def test_her2st_jpeg_spots_lie_on_detected_tissue(her2st_root):
    from data_pipelines.slides import read_her2st

    a = read_her2st(her2st_root, "C2")
    s = open_slide(a.uns["spatial"]["C2"]["metadata"]["image_path"], mpp=a.uns["stimage"]["mpp"])
    centres, cov, crop = slide_grid(s, tile_um=100.0, min_coverage=0.5)
    kept = {(int(x // crop), int(y // crop)) for x, y in centres}
    spots = a.obsm["spatial"]
    on = np.mean([(int(x // crop), int(y // crop)) in kept for x, y in spots])
    assert on > 0.85, on                             # spots lie on tissue
    assert len(centres) < 0.6 * (s.width // crop) * (s.height // crop)  # glass/corners are not
