"""SpatialData output and input: the H&E as a multiscale image in µm, spots as circles in
its coordinate system, a table annotating them; round trip; spatialdata_plot renders it."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.spatialdata_io import read_spatialdata, write_spatialdata

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.mark.real_data
def test_visium_round_trip_with_prediction_layers_and_a_spatialdata_plot_render(shared, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata as sd
    import spatialdata_plot  # noqa: F401  registers .pl
    from PIL import Image
    from spatialdata.transformations import get_transformation

    from data_pipelines.slides import read_visium

    a = read_visium(shared / "data" / "visium_fixture")  # the hires PNG is the image (image_scale < 1)
    a.layers["q_lo"] = (a.X.toarray() * 0.5).astype(np.float32)
    a.obsm["nb_member_mu"] = np.stack([a.X.toarray()] * 2, 1).astype(np.float32)  # (spots, members, genes)
    out = tmp_path / "v.zarr"
    write_spatialdata(a, out)
    s = sd.read_zarr(out)
    lib = a.uns[keys.STIMAGE_UNS][keys.LIBRARY_ID]
    img = s.images[f"{lib}_he"]
    levels = [img[k]["image"].shape for k in img]
    assert levels[0][0] == 3 and len(levels) >= 2 and levels[1][1] == levels[0][1] // 2  # multiscale
    meta = a.uns[keys.SPATIAL_UNS][lib]["metadata"]
    mpp, scale = meta[keys.MPP], meta[keys.IMAGE_SCALE]
    t_img = get_transformation(img, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    t_spot = get_transformation(s.shapes[f"{lib}_spots"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    assert t_img[0, 0] == pytest.approx(mpp / scale) and t_spot[0, 0] == pytest.approx(mpp)  # µm per px
    circles = s.shapes[f"{lib}_spots"]
    assert circles["radius"].iloc[0] == pytest.approx(a.uns[keys.SPATIAL_UNS][lib]["scalefactors"][keys.SPOT_DIAMETER_FULLRES] / 2)
    table = s.tables["table"]
    assert list(np.atleast_1d(table.uns["spatialdata_attrs"]["region"])) == [f"{lib}_spots"]
    # the circles lie on their image pixels: spot centre (full-res px) x image_scale = image px
    xy_img = np.c_[circles.geometry.x, circles.geometry.y] * scale
    assert (xy_img < np.array(levels[0][:0:-1])).all()
    b = read_spatialdata(out)
    assert list(b.obs_names) == list(a.obs_names)
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    np.testing.assert_allclose(b.obsm[keys.SPATIAL], a.obsm[keys.SPATIAL])
    np.testing.assert_allclose(b.layers["q_lo"], a.layers["q_lo"])
    assert b.obsm["nb_member_mu"].shape == (a.n_obs, 2, a.n_vars)
    assert b.uns[keys.SPATIAL_UNS][lib]["metadata"][keys.IMAGE_PATH] == meta[keys.IMAGE_PATH]
    gene = a.var_names[int(np.argmax(np.asarray(a.X.sum(0)).ravel()))]
    s.pl.render_images(f"{lib}_he").pl.render_shapes(f"{lib}_spots", color=gene, table_name="table").pl.show(
        coordinate_systems="global", colorbar=False)
    plt.savefig(tmp_path / "sdp.png")
    plt.close("all")
    s.pl.render_images(f"{lib}_he").pl.show(coordinate_systems="global")
    plt.savefig(tmp_path / "image_only.png")
    plt.close("all")

    def greenish(png):
        im = np.asarray(Image.open(png).convert("RGB")).astype(int)
        assert im.std() > 10  # not blank
        return int(((im[..., 1] > im[..., 0] + 30) & (im[..., 1] > im[..., 2] + 10)).sum())

    # the 100 viridis-coloured spots are drawn over the H&E, which has no such green
    assert greenish(tmp_path / "sdp.png") > 40 and greenish(tmp_path / "image_only.png") < 5


@pytest.mark.real_data
def test_her2st_section_to_zarr_and_back_through_read_anndata(her2st_root, tmp_path):
    from data_pipelines.slides import read_h5ad, read_her2st
    from data_pipelines.slides.h5ad import read_anndata

    a = read_her2st(her2st_root, "C6", require_image=True)
    out = tmp_path / "C6.zarr"
    write_spatialdata(a, out, max_image_px=1000)  # a small image keeps the test fast
    b = read_anndata(out)
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    np.testing.assert_allclose(b.obsm[keys.SPATIAL], a.obsm[keys.SPATIAL])
    assert read_h5ad(out).obs[keys.SAMPLE].iloc[0] == "C6"
    with pytest.raises(StimageError, match="already exists"):
        write_spatialdata(a, out)
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr" / "tables").mkdir()
    with pytest.raises(StimageError, match="bad.zarr"):
        read_anndata(tmp_path / "bad.zarr")


@pytest.mark.real_data
def test_our_visium_store_agrees_with_spatialdata_io_and_its_store_reads_back(shared, tmp_path):
    """spatialdata-io's own Visium reader is the reference: the same circles (centres in
    full-resolution px, radius = spot_diameter_fullres / 2), the same counts per barcode, and
    the same image-to-spot scale (1 / tissue_hires_scalef). Its store is readable by ours."""
    import spatialdata as sd
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    from data_pipelines.slides import read_visium
    from data_pipelines.spatialdata_io import _regular_chunks

    root = shared / "data" / "visium_fixture"
    ref = spatialdata_io.visium(root, dataset_id="fx")
    ours_a = read_visium(root, sample_id="fx")
    write_spatialdata(ours_a, tmp_path / "ours.zarr")
    ours = sd.read_zarr(tmp_path / "ours.zarr")
    rt, ot = ref.tables["table"], ours.tables["table"]
    barcodes = [n.removeprefix("fx_") for n in ot.obs_names]
    ref_pos = ref.shapes["fx"].loc[rt.obs.loc[barcodes, "spot_id"].to_numpy()]
    our_pos = ours.shapes["fx_spots"].loc[ot.obs["instance_id"].to_numpy()]
    np.testing.assert_allclose(np.c_[our_pos.geometry.x, our_pos.geometry.y], np.c_[ref_pos.geometry.x, ref_pos.geometry.y])
    np.testing.assert_allclose(our_pos["radius"].to_numpy(), ref_pos["radius"].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(ot.X.toarray(), rt[barcodes].X.toarray())
    ref_scale = get_transformation(ref.images["fx_hires_image"], "fx").to_affine_matrix(("x",), ("x",))[0, 0]
    t_img = get_transformation(ours.images["fx_he"], "global").to_affine_matrix(("x",), ("x",))[0, 0]
    t_spot = get_transformation(ours.shapes["fx_spots"], "global").to_affine_matrix(("x",), ("x",))[0, 0]
    assert t_img / t_spot == pytest.approx(ref_scale, rel=1e-6)  # image px -> spot (full-res) px
    with _regular_chunks():
        ref.write(tmp_path / "ref.zarr")
    back = read_spatialdata(tmp_path / "ref.zarr")
    np.testing.assert_allclose(back[[f"{b}" for b in barcodes]].obsm[keys.SPATIAL], ours_a.obsm[keys.SPATIAL])
