"""Whole-slide reading, tissue mask and grid tiling on generated pyramidal TIFFs and HER2ST.

OpenSlide and tifffile read the same generated files to the same pixels and µm per pixel.
"""

import sys

import cv2
import numpy as np
import pytest

from data_pipelines import wsi
from data_pipelines.errors import StimageError
from data_pipelines.wsi import iter_grid_tiles, open_slide, slide_grid

openslide = pytest.importorskip("openslide", reason="OpenSlide backend: pip install 'stimage-jax[wsi]'")


def _top_level_pyramid(path, img, mpp, downsamples=(1, 4, 16)):
    """Tiled pyramid with every level a top-level IFD: the layout OpenSlide's generic-tiff
    driver reads as levels (the conftest fixture keeps levels in SubIFDs, which it ignores)."""
    import tifffile

    kw = dict(tile=(256, 256), photometric="rgb", compression="zlib", metadata=None)
    with tifffile.TiffWriter(path) as tw:
        for i, d in enumerate(downsamples):
            tw.write(img[::d, ::d], subfiletype=1 if i else 0,
                     resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER", **kw)


def _padded(img, x0, y0, w, h):
    """The expected region: img with white beyond its edges."""
    m = 4000  # more than any test window reaches beyond the slide
    big = np.pad(img, ((m, m), (m, m), (0, 0)), constant_values=255)
    return big[y0 + m:y0 + m + h, x0 + m:x0 + m + w]


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


WINDOWS = [(100, 50, 30, 20), (700, 500, 300, 280), (-10, -10, 20, 20), (1590, 1190, 30, 25),
           (-5, 600, 1700, 3), (1500, -40, 145, 145), (2000, 2000, 10, 10)]


def test_openslide_and_tifffile_read_the_same_slide(tmp_path, make_slide):
    img = make_slide(tmp_path / "s.tif", mpp=0.5)
    so = open_slide(tmp_path / "s.tif", backend="openslide")
    st = open_slide(tmp_path / "s.tif", backend="tifffile")
    assert (so.backend, st.backend) == ("openslide", "tifffile")
    assert (so.width, so.height, so.mpp) == (st.width, st.height, st.mpp) == (1600, 1200, pytest.approx(0.5))
    for win in WINDOWS:  # inside, across tile borders, across every slide edge, fully outside
        a = so.region(*win)
        np.testing.assert_array_equal(a, st.region(*win), err_msg=str(win))
        np.testing.assert_array_equal(a, _padded(img, *win), err_msg=str(win))
    assert (so.region(2000, 2000, 10, 10) == 255).all()
    (to, so_scale), (tt, st_scale) = so.thumbnail(), st.thumbnail()
    assert so_scale == pytest.approx(to.shape[1] / 1600) and st_scale == pytest.approx(tt.shape[1] / 1600)
    small = cv2.resize(to, tt.shape[1::-1], interpolation=cv2.INTER_AREA)  # OpenSlide: full level
    blur = lambda x: cv2.GaussianBlur(x, (5, 5), 0).astype(int)  # noqa: E731  (tifffile: ::4 subsample,
    assert np.abs(blur(small) - blur(tt)).mean() < 1.0             # so its pixel noise is not averaged)
    assert (wsi.tissue_mask(small) == wsi.tissue_mask(tt)).mean() > 0.99
    # this file's pyramid is in SubIFDs, which OpenSlide does not see: auto keeps tifffile
    assert open_slide(tmp_path / "s.tif").backend == "tifffile"


def test_openslide_pyramid_thumbnail_and_strips(tmp_path, make_slide, monkeypatch):
    img = make_slide(tmp_path / "sub.tif", mpp=0.5)
    _top_level_pyramid(tmp_path / "p.tif", img, 0.5)
    so = open_slide(tmp_path / "p.tif")  # auto: OpenSlide sees all three levels
    st = open_slide(tmp_path / "p.tif", backend="tifffile")
    assert so.backend == "openslide" and so.mpp == pytest.approx(0.5) and st.mpp == pytest.approx(0.5)
    for win in WINDOWS:
        np.testing.assert_array_equal(so.region(*win), st.region(*win), err_msg=str(win))
    thumb, scale = so.thumbnail(max_side=100)  # the 1/16 level itself, as tifffile's smallest
    np.testing.assert_array_equal(thumb, img[::16, ::16])
    np.testing.assert_array_equal(thumb, st.thumbnail(max_side=100)[0])
    assert scale == pytest.approx(1 / 16)
    # a level too big to read at once (single-level file) is shrunk strip by strip
    single = open_slide(tmp_path / "sub.tif", backend="openslide")
    whole, _ = single.thumbnail(max_side=400)
    monkeypatch.setattr(wsi, "_THUMB_STRIP_PX", 200_000)
    strips, scale = single.thumbnail(max_side=400)
    assert strips.shape == whole.shape == (300, 400, 3) and scale == 0.25
    assert np.abs(strips.astype(int) - whole).mean() < 1.0


def test_openslide_mpp_and_errors(tmp_path, make_slide):
    make_slide(tmp_path / "a.svs", mpp=0.2520, svs_description=True, tags=False)
    s = open_slide(tmp_path / "a.svs", backend="openslide")
    assert s.mpp == pytest.approx(0.252) and s._reader.osr.properties["openslide.vendor"] == "aperio"
    assert open_slide(tmp_path / "a.svs").backend == "openslide"  # auto: Aperio is recognised
    import tifffile

    img = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "aniso.tif", img, tile=(256, 256), photometric="rgb", metadata=None,
                     resolution=(1e4 / 0.5, 1e4 / 0.6), resolutionunit="CENTIMETER")
    with pytest.raises(StimageError, match=r"mpp-x 0\.5, mpp-y 0\.6.*pass --mpp"):
        open_slide(tmp_path / "aniso.tif", backend="openslide")
    assert open_slide(tmp_path / "aniso.tif", backend="openslide", mpp=0.55).mpp == 0.55
    make_slide(tmp_path / "nompp.tif", tags=False)
    with pytest.raises(StimageError, match="no µm-per-pixel metadata; pass --mpp"):
        open_slide(tmp_path / "nompp.tif", backend="openslide")
    data = (tmp_path / "nompp.tif").read_bytes()
    for name, cut in (("trunc.tif", 200), ("half.svs", len(data) // 2), ("junk.ndpi", 100)):
        (tmp_path / name).write_bytes(data[:cut])
        for backend in ("openslide", "auto"):
            with pytest.raises(StimageError, match="unreadable or truncated") as e:
                open_slide(tmp_path / name, mpp=0.5, backend=backend)
            assert "\n" not in str(e.value)
    with pytest.raises(StimageError, match="unknown slide backend"):
        open_slide(tmp_path / "a.svs", backend="pillow")
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
    np.testing.assert_array_equal(wsi._rgba_on_white(rgba), [[[255, 255, 255], [10, 20, 30], [127, 127, 127]]])


def test_without_openslide(tmp_path, make_slide, monkeypatch):
    make_slide(tmp_path / "s.tif", mpp=0.5)
    (tmp_path / "x.ndpi").write_bytes(b"II*\0" + bytes(100))
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    for path, backend in (("s.tif", "openslide"), ("x.ndpi", "auto")):
        with pytest.raises(StimageError, match=r"pip install 'stimage-jax\[wsi\]'") as e:
            open_slide(tmp_path / path, backend=backend)
        assert "\n" not in str(e.value)
    assert open_slide(tmp_path / "s.tif").backend == "tifffile"  # auto falls back


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
