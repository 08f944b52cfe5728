"""Readers on the real HER2ST and Visium data, plus bad input."""

import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides import read_h5ad, read_her2st, read_visium

pytestmark = pytest.mark.real_data


def test_her2st_c2(her2st_root):
    a = read_her2st(her2st_root, "C2", require_image=True)
    assert a.shape == (187, 15706)
    assert sp.issparse(a.X) and a.X.dtype == np.int32
    assert 0.68 < a.uns[keys.STIMAGE_UNS][keys.MPP] < 0.70  # README: about 0.69 µm/px
    # one count straight from the tsv
    with gzip.open(her2st_root / "data/ST-cnts/C2.tsv.gz", "rt") as f:
        header = f.readline().rstrip("\n").split("\t")
        row = f.readline().rstrip("\n").split("\t")
    spot, gene = f"C2_{row[0]}", header[header.index("SAMD11")]
    assert a[spot, gene].X.toarray().item() == int(row[header.index("SAMD11")])
    x, y = map(int, row[0].split("x"))
    assert (a.obs.loc[spot, keys.ARRAY_COL], a.obs.loc[spot, keys.ARRAY_ROW]) == (x, y)
    sel = pd.read_csv(her2st_root / "data/ST-spotfiles/C2_selection.tsv", sep="\t")
    hit = sel[(sel.x == x) & (sel.y == y)].iloc[0]
    np.testing.assert_allclose(a[spot].obsm[keys.SPATIAL][0], [hit.pixel_x, hit.pixel_y])
    lib = a.uns[keys.SPATIAL_UNS]["C2"]
    assert lib["metadata"][keys.IMAGE_PATH].endswith("5714_HE_BT_C2.jpg")
    assert lib["scalefactors"][keys.SPOT_DIAMETER_FULLRES] == pytest.approx(100 / a.uns[keys.STIMAGE_UNS][keys.MPP])


def test_her2st_labels_attach(her2st_root):
    with pytest.warns(UserWarning, match="no H&E image"):
        a = read_her2st(her2st_root, "C1")
    lab = a.obs[keys.LABEL]
    assert set(lab.cat.categories) == {"invasive cancer", "connective tissue", "undetermined", "adipose tissue"}
    assert lab.notna().mean() > 0.95
    with pytest.raises(StimageError, match="has no H&E image"):
        read_her2st(her2st_root, "C1", require_image=True)


def test_her2st_bad_section(her2st_root):
    with pytest.raises(StimageError, match="no counts for section 'Z9'.*available: A1"):
        read_her2st(her2st_root, "Z9")


def test_visium_fixture_falls_back_to_hires(shared):
    a = read_visium(shared / "data" / "visium_fixture")
    pos = pd.read_csv(shared / "data/visium_fixture/spatial/tissue_positions_list.csv", header=None)
    assert a.n_obs == int((pos[1] == 1).sum())
    u = a.uns[keys.STIMAGE_UNS]
    assert u["image_scale"] == pytest.approx(0.150015)
    assert u[keys.MPP] == pytest.approx(55 / 89.42751063343188)
    row = pos.iloc[0]
    np.testing.assert_array_equal(a[f"visium_fixture_{row[0]}"].obsm[keys.SPATIAL][0], [row[5], row[4]])
    from data_pipelines.tiles import spot_tiles
    assert spot_tiles(a, tile_px=16, progress=False).shape == (a.n_obs, 16, 16, 3)


def test_h5ad_counts_validation(tmp_path):
    x = np.array([[1.0, 2.0], [np.nan, 0.0]])
    a = ad.AnnData(x, obs=pd.DataFrame(index=["s1", "s2"]), var=pd.DataFrame(index=["G1", "G2"]))
    a.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(StimageError, match="NaN/inf count .* at spot s2, gene G1"):
        read_h5ad(tmp_path / "nan.h5ad")
    a.X = np.array([[1.0, -2.0], [0.0, 0.0]])
    a.write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(StimageError, match="negative count"):
        read_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(StimageError, match="not found"):
        read_h5ad(tmp_path / "missing.h5ad")
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(StimageError, match="not a readable"):
        read_h5ad(tmp_path / "junk.h5ad")
