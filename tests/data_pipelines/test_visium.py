"""Visium reader: the real squidpy fixture (hires fallback) and a toy new-format folder."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides import read_10x_h5, read_visium
from data_pipelines.tiles import spot_tiles

from .conftest import write_10x_h5


@pytest.mark.real_data
def test_real_fixture_falls_back_to_hires(shared):
    root = shared / "data" / "visium_fixture"
    a = read_visium(root)
    pos = pd.read_csv(root / "spatial/tissue_positions_list.csv", header=None)
    assert a.n_obs == int((pos[1] == 1).sum()) == 100
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.int32 and a.var_names.is_unique
    u = a.uns[keys.STIMAGE_UNS]
    assert u["image_scale"] == pytest.approx(0.150015)
    assert u[keys.MPP] == pytest.approx(55 / 89.42751063343188)
    # the sample id is the library id the h5 records (attrs["library_ids"] == [b"custom"]),
    # no longer the folder name
    assert (u[keys.SPOT_DIAMETER_UM], u["platform"], u["library_id"]) == (55.0, "visium", "custom")
    assert a.obs[keys.SAMPLE].unique().tolist() == ["custom"]
    lib = a.uns[keys.SPATIAL_UNS]["custom"]
    assert lib["metadata"][keys.IMAGE_PATH].endswith("spatial/tissue_hires_image.png")
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.150015)
    # obsm stays in full-resolution px: (x, y) = (pxl_col, pxl_row) of the positions file
    row = pos.iloc[0]
    np.testing.assert_array_equal(a[f"custom_{row[0]}"].obsm[keys.SPATIAL][0], [row[5], row[4]])
    assert a.obs.loc[f"custom_{row[0]}", keys.ARRAY_ROW] == row[2]
    t = spot_tiles(a, tile_px=16, progress=False)
    assert t.shape == (a.n_obs, 16, 16, 3)
    # crop side on the hires png: 55 µm / mpp · 0.150015 = spot_diameter_fullres · scale
    assert a.obs[keys.TILE_BORDER_FRAC].max() == 0.0


def test_toy_new_format_with_hires_and_fullres(visium_toy):
    root, full_path = visium_toy
    with pytest.warns(UserWarning) as rec:
        a = read_visium(root, library_id="L")
    msgs = " | ".join(str(r.message) for r in rec)
    assert "1 in-tissue spot(s) have no counts (e.g. D-1)" in msgs and "1 duplicated gene symbol(s)" in msgs
    assert list(a.obs_names) == ["L_A-1", "L_B-1"]  # C-1 is not in tissue
    assert list(a.var_names) == ["MT-A", "GENE", "GENE-1"]
    np.testing.assert_array_equal(a.X.toarray(), [[1, 0, 5], [2, 3, 0]])
    np.testing.assert_array_equal(a.obsm[keys.SPATIAL], [[100, 150], [200, 100]])
    assert a.obs[keys.ARRAY_ROW].tolist() == [2, 1] and a.obs[keys.ARRAY_COL].tolist() == [4, 2]
    u = a.uns[keys.STIMAGE_UNS]
    assert (u[keys.MPP], u["image_scale"]) == (55 / 40, 0.5)
    assert u["dropped"] == {"no_counts": 1, "outside_image": 0}
    # a 27.5 µm tile = 20 full-res px = 10 hires px: spot B sits on the blue 20x20 square
    t = spot_tiles(a, tile_um=27.5, tile_px=10, progress=False)
    assert (t[1] == (0, 0, 255)).all() and (t[0] == 230).all()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = read_visium(root, image=str(full_path), library_id="L")
    assert f.uns[keys.STIMAGE_UNS]["image_scale"] == 1.0
    assert f.uns[keys.SPATIAL_UNS]["L"]["metadata"][keys.IMAGE_PATH] == str(full_path.resolve())
    np.testing.assert_array_equal(f.obsm[keys.SPATIAL], a.obsm[keys.SPATIAL])
    tf = spot_tiles(f, tile_um=27.5, tile_px=10, progress=False)  # 20 px crop → 10 px
    np.testing.assert_array_equal(tf, t)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_toy_bad_input(visium_toy, tmp_path):
    root, _ = visium_toy
    with pytest.raises(StimageError, match="Space Ranger folder .*nope not found"):
        read_visium(tmp_path / "nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StimageError, match="image .*missing.tif not found"):
            read_visium(root, image=tmp_path / "missing.tif")
        with pytest.raises(StimageError, match="no spot of sr lies inside the 200x150 image"):
            read_visium(root, image=root / "spatial" / "tissue_hires_image.png")  # hires passed as full-res
    (root / "spatial" / "scalefactors_json.json").write_text('{"tissue_hires_scalef": 0.5}')
    with pytest.raises(StimageError, match="lacks a valid 'spot_diameter_fullres'"):
        read_visium(root)
    (root / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(StimageError, match="scale factors .*scalefactors_json.json not found"):
        read_visium(root)


def test_10x_h5_keeps_gene_expression_only(tmp_path):
    p = write_10x_h5(tmp_path / "m.h5", np.array([[4, 1], [0, 2]]), ["a", "b"], ["G", "CD3"],
                     ["Gene Expression", "Antibody Capture"])
    a = read_10x_h5(p)
    assert list(a.var_names) == ["G"] and a.var["gene_ids"].tolist() == ["ENSG00000"]
    np.testing.assert_array_equal(a.X.toarray(), [[4], [0]])
    (tmp_path / "junk.h5").write_text("x")
    with pytest.raises(StimageError, match="junk.h5 is not a Space Ranger v3 h5 matrix"):
        read_10x_h5(tmp_path / "junk.h5")


# --- sample ids (issue 13 item 10) ------------------------------------------------------------
def _copy_fixture(shared, dest):
    """The real squidpy fixture without its 0.5 MB lowres image (never read)."""
    import shutil

    src = shared / "data" / "visium_fixture"
    (dest / "spatial").mkdir(parents=True)
    shutil.copy(src / "filtered_feature_bc_matrix.h5", dest)
    for name in ("tissue_positions_list.csv", "scalefactors_json.json", "tissue_hires_image.png"):
        shutil.copy(src / "spatial" / name, dest / "spatial")
    for p in [dest / "filtered_feature_bc_matrix.h5", *(dest / "spatial").iterdir()]:
        p.chmod(0o644)  # the shared copies are read-only; these get corrupted on purpose
    return dest


@pytest.mark.real_data
def test_real_outs_layout_sample_ids_unique_across_samples(shared, tmp_path):
    import anndata as ad
    import h5py

    a = _copy_fixture(shared, tmp_path / "SR_A" / "outs")
    b = _copy_fixture(shared, tmp_path / "SR_B" / "outs")
    # both record the same library id; an explicit sample id separates them
    ra, rb = read_visium(a, sample_id="SR_A"), read_visium(tmp_path / "SR_B", sample_id="SR_B")  # <id>/ reads outs/
    both = ad.concat([ra, rb], uns_merge="unique")
    assert both.obs_names.is_unique and both.n_obs == 200
    assert both.obs[keys.SAMPLE].value_counts().to_dict() == {"SR_A": 100, "SR_B": 100}
    assert set(both.uns[keys.SPATIAL_UNS]) == {"SR_A", "SR_B"}
    pos = pd.read_csv(a / "spatial/tissue_positions_list.csv", header=None)
    assert f"SR_A_{pos[pos[1] == 1].iloc[0, 0]}" in ra.obs_names
    # without a library id in the h5, <id>/outs is named after <id>, not "outs"
    with h5py.File(b / "filtered_feature_bc_matrix.h5", "r+") as f:
        del f.attrs["library_ids"]
    nb = read_visium(b)
    assert nb.obs[keys.SAMPLE].unique().tolist() == ["SR_B"] and nb.obs_names[0].startswith("SR_B_")
    (b / "metrics_summary.csv").write_text("Sample ID,Number of Spots Under Tissue\nbreast_7,100\n")
    assert read_visium(b).uns[keys.STIMAGE_UNS]["library_id"] == "breast_7"
    with pytest.raises(StimageError, match="sample_id 'x' and library_id 'y' disagree"):
        read_visium(b, sample_id="x", library_id="y")


# --- malformed input (issue 13 item 6): real fixture files, corrupted -------------------------
@pytest.mark.real_data
def test_real_empty_array_row_and_bad_positions(shared, tmp_path):
    root = _copy_fixture(shared, tmp_path / "sr")
    pos_path = root / "spatial/tissue_positions_list.csv"
    pos = pd.read_csv(pos_path, header=None, dtype=str, keep_default_na=False)
    i = int(np.flatnonzero(pos[1].to_numpy() == "1")[3])  # an in-tissue spot
    bad = pos.copy()
    bad.iat[i, 2] = ""
    bad.to_csv(pos_path, header=False, index=False)
    with pytest.raises(StimageError, match=f"array_row is empty for barcode {pos.iat[i, 0]} ") as e:
        read_visium(root)
    assert "\n" not in str(e.value) and "tissue_positions_list.csv" in str(e.value)
    bad = pos.copy()
    bad.iat[i, 5] = "12o4"
    bad.to_csv(pos_path, header=False, index=False)
    with pytest.raises(StimageError, match=r"pxl_col_in_fullres is '12o4', not a number"):
        read_visium(root)
    pos_path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(StimageError, match="cannot read .*tissue_positions_list.csv"):
        read_visium(root)


def _rewrite_h5(path, **datasets):
    import h5py

    with h5py.File(path, "r+") as f:
        for name, value in datasets.items():
            del f["matrix"][name]
            f["matrix"][name] = value


@pytest.mark.real_data
@pytest.mark.parametrize("change, msg", [
    ("shape", r"a feature index \(\d+\) is outside the shape's 10 features; not a valid Space Ranger matrix"),
    ("indptr", r"matrix/indptr has \d+ entries for \d+ barcodes"),
    ("strings", r"counts are stored as \|S\d+ \(text\?\), not numbers"),
    ("nan", r"NaN/inf count nan at spot .*, gene "),
    ("inf", r"NaN/inf count inf at spot "),
    ("negative", r"negative count -3.0 at spot "),
])
def test_real_malformed_h5(shared, tmp_path, change, msg):
    import h5py

    root = _copy_fixture(shared, tmp_path / "sr")
    h5 = root / "filtered_feature_bc_matrix.h5"
    with h5py.File(h5, "r") as f:
        shape, data, indptr = f["matrix/shape"][:], f["matrix/data"][:], f["matrix/indptr"][:]
    if change == "shape":
        _rewrite_h5(h5, shape=np.array([10, shape[1]], shape.dtype))
    elif change == "indptr":
        _rewrite_h5(h5, indptr=indptr[:-5])
    elif change == "strings":
        _rewrite_h5(h5, data=np.array([str(int(v)) for v in data], dtype="S"))
    else:
        d = data.astype(np.float64)
        d[7] = {"nan": np.nan, "inf": np.inf, "negative": -3.0}[change]
        _rewrite_h5(h5, data=d)
    with pytest.raises(StimageError, match=msg) as e:
        read_visium(root)
    assert "\n" not in str(e.value) and "filtered_feature_bc_matrix.h5" in str(e.value)
