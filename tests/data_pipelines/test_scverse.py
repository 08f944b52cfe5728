"""scanpy/squidpy-ready .h5ad: images and scale factors as Space Ranger writes them, image
references relative to the file, re-pointed by --image-root / $STIMAGE_IMAGE_ROOT."""

from __future__ import annotations

import shutil
import warnings

import h5py
import numpy as np
import pytest

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.io import write_h5ad
from data_pipelines.scverse import HIRES_MAX_PX, IMAGE_ROOT_ENV, LOWRES_MAX_PX, add_images
from data_pipelines.slides.h5ad import read_anndata
from data_pipelines.tiles import load_image, sample_image_path
from tests.data_pipelines.conftest import write_rgb


def _sample(tmp_path, name="s", size=(2400, 1800)):
    """A (h, w) = size image with a red square at full-res px x 900..1000, y 600..700, one spot there."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    img = np.full((size[0], size[1], 3), 230, np.uint8)
    img[600:700, 900:1000] = (255, 0, 0)
    path = write_rgb(tmp_path / "data" / "img" / f"{name}.png", img)
    a = ad.AnnData(sp.csr_matrix(np.array([[1, 2], [3, 4]], np.int32)),
                   obs=pd.DataFrame({keys.SAMPLE: [name, name]}, index=["a", "b"]), var=pd.DataFrame(index=["G1", "G2"]))
    a.obsm[keys.SPATIAL] = np.array([[950.0, 650.0], [100.0, 100.0]])
    a.uns[keys.SPATIAL_UNS] = {name: {"scalefactors": {}, "metadata": {
        keys.IMAGE_PATH: str(path), keys.MPP: 0.5, keys.SPOT_DIAMETER_UM: 50.0, keys.IMAGE_SCALE: 1.0}}}
    a.uns[keys.STIMAGE_UNS] = {keys.MPP: 0.5, keys.SPOT_DIAMETER_UM: 50.0, keys.LIBRARY_ID: name, keys.IMAGE_SCALE: 1.0}
    return a, img, path


def test_images_and_scalefactors_map_fullres_pixels_like_space_ranger(tmp_path):
    a, img, _ = _sample(tmp_path)
    add_images(a)
    e = a.uns[keys.SPATIAL_UNS]["s"]
    hi, lo, sf = e[keys.IMAGES]["hires"], e[keys.IMAGES]["lowres"], e["scalefactors"]
    assert max(hi.shape[:2]) == HIRES_MAX_PX and max(lo.shape[:2]) == LOWRES_MAX_PX
    assert hi.dtype == np.uint8 and hi.shape[2] == 3
    assert sf[keys.HIRES_SCALEF] == pytest.approx(HIRES_MAX_PX / 2400)
    assert sf[keys.LOWRES_SCALEF] == pytest.approx(LOWRES_MAX_PX / 2400, rel=1e-3)
    assert sf[keys.SPOT_DIAMETER_FULLRES] == pytest.approx(100.0)  # 50 µm / 0.5 µm per px
    # the spot on the red square lands on red in both images, through the scale factors
    for im, f in ((hi, sf[keys.HIRES_SCALEF]), (lo, sf[keys.LOWRES_SCALEF])):
        x, y = (a.obsm[keys.SPATIAL][0] * f).round().astype(int)
        assert tuple(im[y, x]) == (255, 0, 0)


def test_image_scale_of_a_hires_png_is_folded_into_the_scale_factors(tmp_path):
    a, _, _ = _sample(tmp_path, size=(1000, 800))
    a.uns[keys.SPATIAL_UNS]["s"]["metadata"][keys.IMAGE_SCALE] = 0.25  # the file is a 1/4 hires image
    add_images(a)
    sf = a.uns[keys.SPATIAL_UNS]["s"]["scalefactors"]
    assert sf[keys.HIRES_SCALEF] == pytest.approx(0.25)  # ≤ 2000 px: kept as is
    assert sf[keys.LOWRES_SCALEF] == pytest.approx(0.25 * 600 / 1000, rel=1e-3)


def test_writing_keeps_the_callers_object_and_stores_paths_relative(tmp_path):
    a, _, path = _sample(tmp_path)
    out = tmp_path / "data" / "s.h5ad"
    before = {k: dict(v) for k, v in a.uns[keys.SPATIAL_UNS]["s"].items()}
    write_h5ad(a, out)
    assert a.uns[keys.SPATIAL_UNS]["s"].keys() == before.keys() and keys.IMAGES not in a.uns[keys.SPATIAL_UNS]["s"]
    assert a.uns[keys.SPATIAL_UNS]["s"]["metadata"] == before["metadata"]
    with h5py.File(out) as f:
        stored = f["uns/spatial/s/metadata/image_path"][()].decode()
        assert stored == "img/s.png"
        assert f["uns/spatial/s/images/hires"].shape == (2000, 1500, 3)
    b = read_anndata(out)
    assert sample_image_path(b, "s") == str(path.resolve())
    view = a[:1]
    write_h5ad(view, tmp_path / "data" / "view.h5ad")
    assert view.is_view and read_anndata(tmp_path / "data" / "view.h5ad").n_obs == 1


def test_a_moved_folder_still_finds_its_images_and_a_missing_one_is_one_clear_error(tmp_path, monkeypatch):
    a, img, _ = _sample(tmp_path)
    write_h5ad(a, tmp_path / "data" / "s.h5ad")
    moved = tmp_path / "elsewhere" / "data"
    shutil.move(tmp_path / "data", moved)
    b = read_anndata(moved / "s.h5ad")
    np.testing.assert_array_equal(load_image(sample_image_path(b, "s")), img)
    # the .h5ad moved without its images: re-pointed by the environment variable ...
    shutil.move(moved / "s.h5ad", tmp_path / "s.h5ad")
    lone = read_anndata(tmp_path / "s.h5ad")
    with pytest.raises(StimageError, match="not found.*--image-root DIR or set STIMAGE_IMAGE_ROOT"):
        load_image(sample_image_path(lone, "s"))
    monkeypatch.setenv(IMAGE_ROOT_ENV, str(moved))
    np.testing.assert_array_equal(load_image(sample_image_path(read_anndata(tmp_path / "s.h5ad"), "s")), img)


def test_image_root_at_write_time_stores_paths_relative_to_it(tmp_path, monkeypatch):
    a, img, path = _sample(tmp_path)
    monkeypatch.setenv(IMAGE_ROOT_ENV, str(tmp_path / "data"))
    out = tmp_path / "runs" / "s.h5ad"
    write_h5ad(a, out)
    with h5py.File(out) as f:
        assert f["uns/spatial/s/metadata/image_path"][()].decode() == "img/s.png"
        assert f["uns/spatial/s/metadata/image_base"][()].decode() == "image_root"
    shutil.move(tmp_path / "data", tmp_path / "mnt")
    monkeypatch.setenv(IMAGE_ROOT_ENV, str(tmp_path / "mnt"))
    assert sample_image_path(read_anndata(out), "s") == str((tmp_path / "mnt" / "img" / "s.png").resolve())


# --------------------------------------------------------------------------- real data, scanpy and squidpy

def _green_pixels(png) -> int:
    """Pixels of viridis's green/yellow half, which H&E (pink/purple) does not have."""
    from PIL import Image

    im = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = im[..., 0], im[..., 1], im[..., 2]
    return int(((g > r + 30) & (g > b + 10)).sum())


@pytest.mark.real_data
def test_scanpy_and_squidpy_plot_a_written_her2st_section(her2st_root, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import scanpy as sc
        import squidpy as sq

    from data_pipelines.slides import read_her2st

    out = tmp_path / "C6.h5ad"
    write_h5ad(read_her2st(her2st_root, "C6", require_image=True), out)
    a = read_anndata(out)
    e = a.uns[keys.SPATIAL_UNS]["C6"]
    assert max(e[keys.IMAGES]["hires"].shape[:2]) == 2000 and max(e[keys.IMAGES]["lowres"].shape[:2]) == 600
    assert e["scalefactors"][keys.HIRES_SCALEF] == pytest.approx(2000 / 9907, rel=1e-4)  # 9288 x 9907 JPEG
    gene = "ERBB2"
    pngs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pl.spatial(a, color=gene, colorbar_loc=None, show=False)
        pngs["scanpy"] = tmp_path / "sc.png"
        plt.savefig(pngs["scanpy"])
        plt.close("all")
        sc.pl.spatial(a, color=None, alpha=0.0, show=False)  # the H&E alone
        pngs["image"] = tmp_path / "img.png"
        plt.savefig(pngs["image"])
        plt.close("all")
        sq.pl.spatial_scatter(a, color=gene, colorbar=False)
        pngs["squidpy"] = tmp_path / "sq.png"
        plt.savefig(pngs["squidpy"])
        plt.close("all")
    from PIL import Image

    for k, p in pngs.items():
        im = np.asarray(Image.open(p).convert("L"))
        assert im.std() > 10, k  # not blank: the H&E is drawn
    assert _green_pixels(pngs["image"]) < 50
    # 178 spots coloured by viridis: over a thousand green/yellow pixels (4,728 and 1,777 measured)
    assert _green_pixels(pngs["scanpy"]) > 1000 and _green_pixels(pngs["squidpy"]) > 1000
