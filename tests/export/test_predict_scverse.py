"""`stimage predict` outputs that scanpy and SpatialData read: .h5ad with the scverse images,
`--out P.zarr` (SpatialData) for spots and slides, `.zarr` accepted as --data, and a moved
image named in one error line that --image-root fixes."""

import shutil

import anndata as ad
import numpy as np
import pytest

from data_pipelines import keys
from stimage_jax.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny trained model and one sample whose image lies beside it (data/s0.png)."""
    from tests.conftest import make_sample

    tmp = tmp_path_factory.mktemp("scverse_predict")
    data = tmp / "data"
    data.mkdir()
    paths = []
    for k in range(2):
        a = make_sample(data, f"s{k}", seed=k)
        paths.append(data / f"s{k}.h5ad")
        a.write_h5ad(paths[-1])
    wd = tmp / "wd"
    assert main(["train", "--quiet", "--data", *map(str, paths), "--workdir", str(wd), "--backbone", "tiny",
                 "--tile-px", "32", "--max-epochs", "1", "--genes", "A,B", "--min-coverage", "0"]) == 0
    return tmp, paths, wd


def test_prediction_h5ad_and_zarr_carry_the_image_and_read_back_equal(study, tmp_path):
    from data_pipelines.slides.h5ad import read_anndata

    tmp, paths, wd = study
    h5 = tmp_path / "p.h5ad"
    zr = tmp_path / "p.zarr"
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(paths[0]), "--out", str(h5)]) == 0
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(paths[0]), "--out", str(zr)]) == 0
    p = ad.read_h5ad(h5)
    e = p.uns[keys.SPATIAL_UNS]["s0"]
    assert e[keys.IMAGES]["hires"].shape == (360, 360, 3) and e["scalefactors"][keys.HIRES_SCALEF] == 1.0
    z = read_anndata(zr, "prediction")
    assert list(z.obs_names) == list(p.obs_names)
    np.testing.assert_allclose(z.X, p.X)
    for k in (keys.VAR_ALEATORIC, keys.VAR_EPISTEMIC, keys.Q_LO, keys.Q_HI):
        np.testing.assert_allclose(z.layers[k], p.layers[k])
    np.testing.assert_allclose(z.obsm[keys.SPATIAL], p.obsm[keys.SPATIAL])
    np.testing.assert_allclose(z.obsm[keys.MEMBER_MU], p.obsm[keys.MEMBER_MU])
    # a SpatialData store is accepted wherever an .h5ad is: predict from it, evaluate it
    zin = tmp_path / "s0.zarr"
    from data_pipelines.spatialdata_io import write_spatialdata
    from data_pipelines.slides import read_h5ad

    write_spatialdata(read_h5ad(paths[0]), zin)
    again = tmp_path / "again.h5ad"
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(zin), "--out", str(again)]) == 0
    np.testing.assert_allclose(ad.read_h5ad(again).X, p.X, rtol=1e-5)
    assert main(["evaluate", "--pred", str(zr), "--truth", str(zin), "--out", str(tmp_path / "m.csv")]) == 0
    assert (tmp_path / "m.csv").read_text().count("\n") == 3  # header + 2 genes


def test_slide_prediction_to_zarr(study, make_slide, tmp_path):
    import spatialdata as sd

    _, _, wd = study
    make_slide(tmp_path / "s.tif", mpp=1.0)
    out = tmp_path / "slide.zarr"
    assert main(["predict", "--quiet", "--model", str(wd), "--slide", str(tmp_path / "s.tif"), "--genes", "A",
                 "--out", str(out)]) == 0
    assert (tmp_path / "slide_A.png").is_file()
    s = sd.read_zarr(out)
    assert s.images["s_he"]["scale0"]["image"].shape == (3, 1200, 1600)
    assert len(s.shapes["s_spots"]) == s.tables["table"].n_obs > 20
    # the .h5ad of a slide prediction is what scanpy plots: tiles over the slide's hires image
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    from PIL import Image

    h5 = tmp_path / "slide.h5ad"
    assert main(["predict", "--quiet", "--model", str(wd), "--slide", str(tmp_path / "s.tif"), "--out", str(h5)]) == 0
    p = ad.read_h5ad(h5)
    e = p.uns[keys.SPATIAL_UNS]["s"]
    assert e[keys.IMAGES]["hires"].shape == (1200, 1600, 3) and e[keys.IMAGES]["lowres"].shape == (450, 600, 3)
    assert e["scalefactors"][keys.LOWRES_SCALEF] == pytest.approx(600 / 1600)
    sc.pl.spatial(p, color="A", show=False)
    plt.savefig(tmp_path / "sc.png")
    plt.close("all")
    assert np.asarray(Image.open(tmp_path / "sc.png").convert("L")).std() > 10


def test_a_moved_prediction_input_names_its_image_and_image_root_fixes_it(study, tmp_path, capsys):
    tmp, paths, wd = study
    moved = tmp_path / "moved"
    moved.mkdir()
    from data_pipelines.io import write_h5ad
    from data_pipelines.slides import read_h5ad

    write_h5ad(read_h5ad(paths[0]), tmp / "data" / "rel.h5ad", overwrite=True)  # image stored as "s0.png"
    shutil.copy(tmp / "data" / "rel.h5ad", moved / "rel.h5ad")
    out = tmp_path / "p.h5ad"
    capsys.readouterr()
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(moved / "rel.h5ad"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s0.png not found" in err and "--image-root" in err and not out.exists()
    assert main(["predict", "--quiet", "--model", str(wd), "--data", str(moved / "rel.h5ad"), "--out", str(out),
                 "--image-root", str(tmp / "data")]) == 0
