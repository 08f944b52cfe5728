"""Images as users have them (issue 13 items 4, 7 and the tile cache of item 2): headers that
lie about their size, flat TIFFs read in pieces, a pixel cap where streaming is impossible,
transparent backgrounds, planar TIFFs, and tiles that follow the image's content.

Real pixels where the case is real: crops of HER2ST C2 (decoded at 1/4 and 1/8 by libjpeg).
"""

import struct
import tracemalloc
import warnings
import zlib

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile

from data_pipelines import keys, wsi
from data_pipelines.errors import StimageError
from data_pipelines.slides.common import image_size
from data_pipelines.tiles import load_image, spot_tiles
from data_pipelines.tissue import spot_tissue_coverage
from data_pipelines.wsi import open_slide

from .conftest import write_rgb


@pytest.fixture(scope="module")
def c2_reduced(her2st_root):
    """HER2ST C2 at 1/4 (≈ 2318 × 2478) and 1/8 (≈ 1160 × 1239) of full size, RGB."""
    path = her2st_root / "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    out = {}
    for r, flag in ((4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8)):
        bgr = cv2.imread(str(path), flag)
        assert bgr is not None, path
        out[r] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return out


@pytest.fixture(scope="module")
def crop8(c2_reduced):
    """400 × 700 px of C2's tumour (1/8 size): tissue throughout its right half."""
    return np.ascontiguousarray(c2_reduced[8][600:1000, 300:1000])


@pytest.fixture(scope="module")
def crop4(c2_reduced):
    """1200 × 1600 px of C2 at 1/4: tissue and glass."""
    return np.ascontiguousarray(c2_reduced[4][1000:2200, 500:2100])


def _peak_bytes(fn):
    """(result, peak bytes NumPy allocated while running fn) — NumPy reports to tracemalloc."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- item 4: headers that lie, and a cap where streaming is impossible -----------------------
def _bomb_tiff(path, compression: int):
    """A valid little-endian TIFF whose header claims 10^6 × 10^6 RGB px in one strip."""
    data = zlib.compress(b"\0" * 300) if compression == 8 else b"\0" * 30
    entries = [(256, 4, 10**6), (257, 4, 10**6), (258, 3, "bps"), (259, 3, compression), (262, 3, 2),
               (273, 4, "strip"), (277, 3, 3), (278, 4, 10**6), (279, 4, len(data)), (284, 3, 1)]
    extra = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\0" + struct.pack("<IH", 8, len(entries)))
    for tag, typ, val in entries:
        if val == "bps":
            out += struct.pack("<HHII", tag, typ, 3, extra)
        elif val == "strip":
            out += struct.pack("<HHII", tag, typ, 1, extra + 6)
        elif typ == 3:
            out += struct.pack("<HHIHH", tag, typ, 1, val, 0)
        else:
            out += struct.pack("<HHII", tag, typ, 1, val)
    out += struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + data
    path.write_bytes(bytes(out))
    return path


def _bomb_png(path, side=100_000):
    """A PNG header (IHDR, valid CRC) claiming side × side RGB px, and no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("compression, msg", [
    (8, r"1000000x1000000 px in strips/tiles of 1,000,000,000,000 px each: too big to read in pieces or whole"),
    (1, r"is truncated: its header claims \(1000000, 1000000, 3\) px \(3,000,000,000,000 bytes\) but the file "
        r"has \d+ bytes"),
])
def test_tiff_header_claiming_a_terapixel_is_refused_without_allocating(tmp_path, compression, msg):
    p = _bomb_tiff(tmp_path / "bomb.tif", compression)
    assert p.stat().st_size < 200 and image_size(p) == (10**6, 10**6)  # the header alone is fine

    def open_it():
        with pytest.raises(StimageError, match=msg) as e:
            open_slide(p, mpp=0.5)
        return e

    e, peak = _peak_bytes(open_it)
    assert peak < 2 << 20 and "\n" not in str(e.value)
    with pytest.raises(StimageError, match=r"1000000x1000000 = 1,000,000,000,000 px, over the 1,073,741,824 px"):
        load_image(p)


def test_png_header_claiming_ten_gigapixels_is_refused(tmp_path):
    p = _bomb_png(tmp_path / "bomb.png")
    for read in (load_image, image_size, lambda q: open_slide(q, mpp=0.5)):
        with pytest.raises(StimageError, match=r"bomb.png claims more than 2,147,483,648 px .*decompression-bomb"):
            read(p)


@pytest.mark.real_data
def test_pil_guard_on_at_an_explicit_bound(her2st_root):
    from PIL import Image

    path = her2st_root / "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 92 Mpx is over PIL's default 89 Mpx: no warning here
        assert image_size(path) == (9270, 9936)
    assert Image.MAX_IMAGE_PIXELS == 2**30


@pytest.mark.real_data
def test_flat_tiff_is_read_in_strips_never_whole(tmp_path, crop4, monkeypatch):
    h, w = crop4.shape[:2]
    whole = crop4.nbytes  # 5.8 MB
    stripped = tmp_path / "flat.tif"
    tifffile.imwrite(stripped, crop4, photometric="rgb", compression="zlib", rowsperstrip=32, metadata=None)
    raw = tmp_path / "raw.tif"  # uncompressed, one strip: memory-mapped
    tifffile.imwrite(raw, crop4, photometric="rgb", metadata=None)
    monkeypatch.setattr(wsi, "_THUMB_STRIP_PX", 64_000)  # bands of 40 rows: the thumbnail cannot hold it all
    expect = cv2.resize(crop4, (400, 300), interpolation=cv2.INTER_AREA)
    for path, kind in ((stripped, "Array"), (raw, "memmap")):
        s = open_slide(path, mpp=0.5)
        lev = s._reader.levels[0]
        assert (s.backend, s.width, s.height, type(lev.arr).__name__) == ("tifffile", w, h, kind)
        s.region(0, 0, 8, 8)  # first read: zarr's codec set-up is not what is measured
        (thumb, scale), peak = _peak_bytes(lambda s=s: s.thumbnail(max_side=400))
        assert thumb.shape == (300, 400, 3) and scale == 0.25
        assert np.abs(thumb.astype(int) - expect).mean() < 1.0
        assert peak < whole / 3, (path.name, peak)  # one 32-row band (0.15 MB) + the output
        region, peak = _peak_bytes(lambda s=s: s.region(700, 500, 150, 150))
        np.testing.assert_array_equal(region, crop4[500:650, 700:850])
        assert peak < whole / 3  # the strips it touches (full width, kept for the next tile)
    np.testing.assert_array_equal(s.region(-20, h - 30, 60, 60)[:30, 20:], crop4[h - 30:, :40])
    # strips are cached while tiles walk along a row, within the budget
    s = open_slide(stripped, mpp=0.5)
    for x in range(0, 1500, 100):
        np.testing.assert_array_equal(s.region(x, 90, 100, 100), crop4[90:190, x:x + 100])
    assert 4 <= len(s._reader.levels[0]._bands) <= 8


@pytest.mark.real_data
def test_one_huge_strip_decoded_once_or_refused(tmp_path, crop4, monkeypatch):
    p = tmp_path / "onestrip.tif"
    tifffile.imwrite(p, crop4, photometric="rgb", compression="zlib", rowsperstrip=crop4.shape[0], metadata=None)
    monkeypatch.setattr(wsi, "_MAX_CHUNK_PX", 1_000_000)  # the 1.92 Mpx strip is "huge"
    s = open_slide(p, mpp=0.5)
    assert s.backend == "tifffile" and isinstance(s._reader, wsi._ArrayReader)
    np.testing.assert_array_equal(s.region(100, 200, 64, 64), crop4[200:264, 100:164])
    monkeypatch.setenv("STIMAGE_MAX_IMAGE_PIXELS", "1000000")
    with pytest.raises(StimageError, match=r"1600x1200 px in strips/tiles of 1,920,000 px each: too big .*"
                                           r"\(limit 1,000,000 px\); save it as a tiled TIFF"):
        open_slide(p, mpp=0.5)


def _one_sample(path, xy, mpp=1.0, spot_um=100.0):
    a = ad.AnnData(sp.csr_matrix(np.ones((len(xy), 1), np.int32)),
                   obs=pd.DataFrame({keys.SAMPLE: ["s"] * len(xy)}, index=[f"p{i}" for i in range(len(xy))]),
                   var=pd.DataFrame(index=["G"]))
    a.obsm[keys.SPATIAL] = np.asarray(xy, np.float64)
    meta = {keys.IMAGE_PATH: str(path), keys.MPP: mpp, keys.SPOT_DIAMETER_UM: spot_um, keys.IMAGE_SCALE: 1.0}
    a.uns[keys.SPATIAL_UNS] = {"s": {"scalefactors": {}, "metadata": meta}}
    a.uns[keys.STIMAGE_UNS] = {keys.MPP: mpp, keys.SPOT_DIAMETER_UM: spot_um, keys.LIBRARY_ID: "s",
                               keys.IMAGE_SCALE: 1.0}
    return a


@pytest.mark.real_data
def test_pixel_cap_refuses_jpeg_png_and_streams_tiff(tmp_path, crop4, monkeypatch):
    png, jpg = write_rgb(tmp_path / "c.png", crop4), write_rgb(tmp_path / "c.jpg", crop4)
    tif = tmp_path / "c.tif"
    tifffile.imwrite(tif, crop4, photometric="rgb", compression="zlib", rowsperstrip=16, metadata=None)
    xy = [[800, 600], [300, 1100], [1590, 10]]
    ref = spot_tiles(_one_sample(png, xy), tile_px=32, progress=False)  # decoded whole, under the cap
    ref_cov = spot_tissue_coverage(_one_sample(png, xy))
    monkeypatch.setenv("STIMAGE_MAX_IMAGE_PIXELS", "1e6")  # 1.92 Mpx images are now "too big"
    for p in (png, jpg):
        with pytest.raises(StimageError, match=rf"{p.name} is 1600x1200 = 1,920,000 px, over the 1,000,000 px "
                                               r"limit .*save it as a tiled TIFF") as e:
            spot_tiles(_one_sample(p, xy), tile_px=32, progress=False)
        assert "\n" not in str(e.value)
        with pytest.raises(StimageError, match="over the 1,000,000 px limit"):
            open_slide(p, mpp=0.5)
    a = _one_sample(tif, xy)
    np.testing.assert_array_equal(spot_tiles(a, tile_px=32, progress=False), ref)  # read crop by crop
    assert a.obs[keys.TILE_BORDER_FRAC].tolist() == pytest.approx([0.0, 0.0, 1 - 60 * 60 / 100**2])  # corner spot
    np.testing.assert_allclose(spot_tissue_coverage(a), ref_cov, atol=0.05)  # mask from strip thumbnails
    with pytest.raises(StimageError, match="c.tif is 1600x1200 = 1,920,000 px, over"):
        load_image(tif)


@pytest.mark.parametrize("raw", ["abc", "-5", "0"])
def test_pixel_cap_setting_must_be_positive(tmp_path, monkeypatch, raw):
    monkeypatch.setenv("STIMAGE_MAX_IMAGE_PIXELS", raw)
    p = write_rgb(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(StimageError, match=f"STIMAGE_MAX_IMAGE_PIXELS='{raw}' is not a positive number of pixels"):
        load_image(p)


# --- item 7: transparency on white, planar TIFFs ----------------------------------------------
def _rgba(crop):
    """The crop with its left 300 columns transparent black (a background cut away) and a
    half-transparent 10-column band; and what it must read as (glass = white)."""
    h, w = crop.shape[:2]
    rgba = np.dstack([crop, np.full((h, w), 255, np.uint8)])
    rgba[:, :300] = 0
    rgba[:, 300:310, 3] = 128
    expect = crop.copy()
    expect[:, :300] = 255
    band = crop[:, 300:310].astype(int)
    expect[:, 300:310] = (band * 128 + 255 * 127 + 127) // 255
    return rgba, expect


@pytest.mark.real_data
def test_transparent_background_reads_as_glass_everywhere(tmp_path, crop8):
    rgba, expect = _rgba(crop8)
    h, w = crop8.shape[:2]
    png = tmp_path / "rgba.png"
    assert cv2.imwrite(str(png), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    tif = tmp_path / "rgba.tif"
    tifffile.imwrite(tif, rgba, photometric="rgb", extrasamples=["unassalpha"], compression="zlib",
                     rowsperstrip=50, metadata=None)
    pre = tmp_path / "premultiplied.tif"  # associated alpha: colours already multiplied by alpha
    premul = rgba.copy()
    premul[..., :3] = (rgba[..., :3].astype(int) * rgba[..., 3:] + 127) // 255
    tifffile.imwrite(pre, premul, photometric="rgb", extrasamples=["assocalpha"], metadata=None)

    np.testing.assert_array_equal(load_image(png), expect)                         # OpenCV path
    np.testing.assert_array_equal(load_image(tif), expect)                         # OpenCV's libtiff
    np.testing.assert_array_equal(open_slide(png, mpp=1.0).region(0, 0, w, h), expect)
    st = open_slide(tif, mpp=1.0, backend="tifffile")                              # tifffile path
    np.testing.assert_array_equal(st.region(0, 0, w, h), expect)
    np.testing.assert_array_equal(st.thumbnail(max_side=350)[0],
                                  cv2.resize(expect, (350, 200), interpolation=cv2.INTER_AREA))
    sp_ = open_slide(pre, mpp=1.0, backend="tifffile")
    assert np.abs(sp_.region(0, 0, w, h).astype(int) - expect).max() <= 1

    # tile QC: a spot on the transparent part is glass (coverage 0), not black "tissue" (1.0)
    a = _one_sample(png, [[150, 200], [550, 200]], mpp=1.0, spot_um=100.0)
    cov = spot_tissue_coverage(a)
    assert cov[0] == 0.0 and cov[1] > 0.9, cov
    tiles = spot_tiles(a, tile_px=20, progress=False)
    assert (tiles[0] == 255).all() and tiles[1].mean() < 200


@pytest.mark.real_data
def test_planar_tiff_reads_as_the_image(tmp_path, crop8):
    h, w = crop8.shape[:2]
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, np.moveaxis(crop8, -1, 0), photometric="rgb", planarconfig="separate",
                     compression="zlib", rowsperstrip=64, metadata=None)
    assert tifffile.TiffFile(p).series[0].axes == "SYX" and image_size(p) == (w, h)
    s = open_slide(p, mpp=0.5)
    assert (s.backend, s.width, s.height) == ("tifffile", w, h)  # not a 3-px-high slide
    np.testing.assert_array_equal(s.region(0, 0, w, h), crop8)
    np.testing.assert_array_equal(s.region(650, 380, 100, 40)[:20, :50], crop8[380:, 650:])
    np.testing.assert_array_equal(load_image(p), crop8)
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, crop8[..., 0], metadata=None)
    with pytest.raises(StimageError, match=r"grey.tif is not an RGB image \(axes YX"):
        open_slide(grey, mpp=0.5, backend="tifffile")


# --- item 2: the tile cache follows the image's content ----------------------------------------
def test_tile_cache_follows_image_content(square_slide, tmp_path):
    a, img, path = square_slide
    first = np.array(spot_tiles(a, tile_px=20, cache_dir=tmp_path / "c", progress=False))
    np.testing.assert_array_equal(first[0], img[30:50, 40:60])
    other = img.copy()
    other[35:45, 45:55] = (0, 0, 255)  # same file name, the square turned blue
    write_rgb(path, other)
    again = spot_tiles(a, tile_px=20, cache_dir=tmp_path / "c", progress=False)
    assert (again[0][5:15, 5:15] == (0, 0, 255)).all()  # not the stale red tiles
    assert len(list((tmp_path / "c").glob("*.npy"))) == 4  # one tiles + border pair per image version
    path.unlink()  # two cached versions and no image: which one is meant cannot be known
    with pytest.raises(StimageError, match=f"image {path} not found"):
        spot_tiles(a, tile_px=20, cache_dir=tmp_path / "c", progress=False)
