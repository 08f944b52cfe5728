"""HEST-1k layout → stimage AnnData, on a sample written in HEST's layout from real HER2ST C6."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides import read_hest, read_her2st

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def write_hest_sample(src: ad.AnnData, root, sample_id: str, *, shrink: int = 4) -> dict:
    """``src`` (a HER2ST section) as HEST writes a sample: st/<id>.h5ad (raw counts, obs
    in_tissue / array / pxl_*_in_fullres, obsm spatial, HEST's own uns["spatial"]["ST"]),
    wsis/<id>.tif (pyramidal tiled TIFF, the H&E reduced ``shrink``×) and metadata/<id>.json."""
    import cv2
    import tifffile

    from data_pipelines.tiles import load_image

    lib = src.uns[keys.STIMAGE_UNS][keys.LIBRARY_ID]
    img = load_image(src.uns[keys.SPATIAL_UNS][lib]["metadata"][keys.IMAGE_PATH])
    small = cv2.resize(img, (img.shape[1] // shrink, img.shape[0] // shrink), interpolation=cv2.INTER_AREA)
    f = small.shape[1] / img.shape[1]
    xy = np.asarray(src.obsm[keys.SPATIAL]) * f
    mpp = src.uns[keys.STIMAGE_UNS][keys.MPP] / f
    for d in ("st", "wsis", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    barcodes = [n.split("_", 1)[1] for n in src.obs_names]
    obs = pd.DataFrame({"in_tissue": 1, "array_row": src.obs[keys.ARRAY_ROW].to_numpy(),
                        "array_col": src.obs[keys.ARRAY_COL].to_numpy(), "pxl_col_in_fullres": xy[:, 0],
                        "pxl_row_in_fullres": xy[:, 1]}, index=barcodes)
    obs.iloc[0, 0] = 0  # one spot HEST marks outside the tissue
    st = ad.AnnData(src.X.astype(np.float32), obs=obs, var=pd.DataFrame(index=src.var_names))
    st.obsm["spatial"] = xy
    st.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": small[::8, ::8]},
                                "scalefactors": {"tissue_downscaled_fullres_scalef": 1 / 8, "spot_diameter_fullres": 100 / mpp}}}
    st.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    with tifffile.TiffWriter(root / "wsis" / f"{sample_id}.tif", bigtiff=False) as tw:
        kw = dict(tile=(256, 256), photometric="rgb", compression="zlib")
        tw.write(small, subifds=1, **kw)
        tw.write(small[::4, ::4], subfiletype=1, **kw)
    meta = {"id": sample_id, "st_technology": "Spatial Transcriptomics", "organ": "Breast", "species": "Homo sapiens",
            "oncotree_code": "IDC", "pixel_size_um_embedded": None, "pixel_size_um_estimated": mpp,
            "spot_diameter": 100.0, "inter_spot_dist": 200.0, "fullres_width": small.shape[1],
            "fullres_height": small.shape[0], "spots_under_tissue": src.n_obs}
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))
    return {"xy": xy, "mpp": mpp, "shape": small.shape}


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory, her2st_root):
    root = tmp_path_factory.mktemp("hest")
    src = read_her2st(her2st_root, "C6", require_image=True)
    info = write_hest_sample(src, root, "SPA999")
    return root, src, info


@pytest.mark.real_data
def test_read_hest_gives_stimage_anndata_with_mpp_from_the_metadata(hest_root):
    root, src, info = hest_root
    a = read_hest(root, "SPA999")
    assert a.n_obs == src.n_obs - 1 and a.uns[keys.STIMAGE_UNS]["dropped"]["not_in_tissue"] == 1
    assert a.uns[keys.STIMAGE_UNS][keys.MPP] == pytest.approx(info["mpp"])
    assert a.uns[keys.STIMAGE_UNS][keys.MPP] == pytest.approx(4 * 0.6877, rel=2e-3)
    assert a.uns[keys.STIMAGE_UNS][keys.PLATFORM] == "legacy_st"  # 4 grid neighbours for Moran's I
    assert a.uns[keys.STIMAGE_UNS]["hest"]["oncotree_code"] == "IDC"
    sf = a.uns[keys.SPATIAL_UNS]["SPA999"]["scalefactors"]
    assert sf[keys.SPOT_DIAMETER_FULLRES] == pytest.approx(100 / info["mpp"])
    assert list(a.obs_names[:2]) == [f"SPA999_{n.split('_', 1)[1]}" for n in src.obs_names[1:3]]
    np.testing.assert_array_equal(a.X.toarray(), src.X[1:].toarray())
    np.testing.assert_allclose(a.obsm[keys.SPATIAL], info["xy"][1:])
    np.testing.assert_array_equal(a.obs[keys.ARRAY_ROW], src.obs[keys.ARRAY_ROW][1:])
    # the tiles are the same tissue at the same physical size as the original section's
    from data_pipelines.tiles import spot_tiles

    t_hest = spot_tiles(a, tile_um=100, tile_px=32, progress=False)
    t_src = spot_tiles(src[1:].copy(), tile_um=100, tile_px=32, progress=False)
    m_hest, m_src = t_hest.mean((1, 2)).ravel(), t_src.mean((1, 2)).ravel()  # per-tile mean colour
    assert np.corrcoef(m_hest, m_src)[0, 1] > 0.98 and np.abs(m_hest - m_src).mean() < 3


@pytest.mark.real_data
def test_cli_read_hest_writes_h5ad_and_zarr(hest_root, tmp_path, capsys):
    from stimage_jax.cli import main

    root, src, _ = hest_root
    assert main(["read", "hest", str(root), "--ids", "SPA999", "--out", str(tmp_path / "h")]) == 0
    a = ad.read_h5ad(tmp_path / "h" / "SPA999.h5ad")
    assert a.n_obs == src.n_obs - 1 and keys.IMAGES in a.uns[keys.SPATIAL_UNS]["SPA999"]
    assert main(["read", "hest", str(root), "--out", str(tmp_path / "z"), "--as", "zarr", "--zarr-image-px", "800"]) == 0
    from data_pipelines.slides.h5ad import read_anndata

    z = read_anndata(tmp_path / "z" / "SPA999.zarr")
    np.testing.assert_array_equal(z.X.toarray(), a.X.toarray())
    import spatialdata as sd

    img = sd.read_zarr(tmp_path / "z" / "SPA999.zarr").images["SPA999_he"]["scale0"]["image"]
    assert max(img.shape[1:]) == 800
    # --image-root ROOT: the WSI is stored as wsis/SPA999.tif, found again under any root given later
    assert main(["read", "hest", str(root), "--ids", "SPA999", "--out", str(tmp_path / "r"), "--image-root", str(root)]) == 0
    import h5py

    with h5py.File(tmp_path / "r" / "SPA999.h5ad") as f:
        assert f["uns/spatial/SPA999/metadata/image_path"][()].decode() == "wsis/SPA999.tif"
    from data_pipelines.scverse import IMAGE_ROOT_ENV, set_image_root

    assert IMAGE_ROOT_ENV not in __import__("os").environ  # the command restored the environment
    with set_image_root(root):
        r = read_anndata(tmp_path / "r" / "SPA999.h5ad")
    assert r.uns[keys.SPATIAL_UNS]["SPA999"]["metadata"][keys.IMAGE_PATH] == str((root / "wsis" / "SPA999.tif").resolve())
    capsys.readouterr()
    assert main(["read", "hest", str(root), "--ids", "NOPE", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NOPE" in err and "SPA999" in err


def test_bad_hest_metadata_is_one_clear_error(tmp_path):
    (tmp_path / "st").mkdir()
    (tmp_path / "metadata").mkdir()
    a = ad.AnnData(np.ones((2, 2), np.float32), obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["G", "H"]))
    a.obsm["spatial"] = np.array([[1.0, 1.0], [5.0, 5.0]])
    a.write_h5ad(tmp_path / "st" / "X.h5ad")
    meta = tmp_path / "metadata" / "X.json"
    for record, msg in (({"spot_diameter": 55}, "no pixel size"),
                        ({"pixel_size_um_estimated": "0.5", "spot_diameter": 55}, "string '0.5'"),
                        ({"pixel_size_um_estimated": -1, "spot_diameter": 55}, "finite positive"),
                        ({"pixel_size_um_estimated": 0.5, "st_technology": "Xenium"}, "no spot_diameter")):
        meta.write_text(json.dumps(record))
        with pytest.raises(StimageError, match=msg):
            read_hest(tmp_path, "X", require_image=False)
    meta.write_text(json.dumps({"pixel_size_um_estimated": 0.5, "st_technology": "Visium"}))
    with pytest.raises(StimageError, match="no WSI"):
        read_hest(tmp_path, "X")
    b = read_hest(tmp_path, "X", require_image=False)
    assert b.uns[keys.STIMAGE_UNS][keys.SPOT_DIAMETER_UM] == 55.0 and b.uns[keys.STIMAGE_UNS][keys.PLATFORM] == "visium"
