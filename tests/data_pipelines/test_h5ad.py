"""read_h5ad / validate_counts: raw integer counts and a sample per spot, or one clear error."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.io import write_h5ad
from data_pipelines.slides import read_h5ad, read_her2st, validate_counts


def _adata(x, sample=True):
    obs = pd.DataFrame({keys.SAMPLE: ["s", "s"]} if sample else {}, index=["s1", "s2"])
    return ad.AnnData(np.asarray(x), obs=obs, var=pd.DataFrame(index=["G1", "G2"]))


@pytest.mark.parametrize("x, msg", [
    ([[1.0, 2.0], [np.nan, 0.0]], "NaN/inf count nan at spot s2, gene G1"),
    ([[1.0, -2.0], [0.0, 0.0]], "negative count -2.0 at spot s1, gene G2"),
    ([[1.0, 2.0], [0.0, 0.5]], "non-integer count 0.5 at spot s2, gene G2"),
])
def test_bad_counts_name_spot_and_gene(tmp_path, x, msg):
    _adata(x).write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(StimageError, match=msg.replace("(", r"\(")) as e:
        read_h5ad(tmp_path / "bad.h5ad")
    assert "\n" not in str(e.value) and "bad.h5ad" in str(e.value)


def test_missing_and_junk_files(tmp_path):
    with pytest.raises(StimageError, match="data file .*missing.h5ad not found"):
        read_h5ad(tmp_path / "missing.h5ad")
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(StimageError, match="junk.h5ad is not a readable .h5ad"):
        read_h5ad(tmp_path / "junk.h5ad")


def test_float_integer_counts_become_int32_csr(tmp_path):
    _adata([[1.0, 2.0], [0.0, 7.0]]).write_h5ad(tmp_path / "ok.h5ad")
    a = read_h5ad(tmp_path / "ok.h5ad")
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.int32
    np.testing.assert_array_equal(a.X.toarray(), [[1, 2], [0, 7]])


def test_sample_filled_in_and_noted(tmp_path):
    a = _adata([[1, 2], [3, 4]], sample=False)
    a.write_h5ad(tmp_path / "sec9.h5ad")
    with pytest.warns(UserWarning, match="set to 'sec9' from the file name"):
        b = read_h5ad(tmp_path / "sec9.h5ad")
    assert b.obs[keys.SAMPLE].tolist() == ["sec9", "sec9"]
    a.uns[keys.STIMAGE_UNS] = {"library_id": "LIB"}
    with pytest.warns(UserWarning, match="set to 'LIB' from uns"):
        assert validate_counts(a).obs[keys.SAMPLE].tolist() == ["LIB", "LIB"]


def test_reader_output_round_trips(her2st_toy, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = read_her2st(her2st_toy, "Z1")
    p = write_h5ad(a, tmp_path / "Z1.h5ad")
    b = read_h5ad(p)
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    np.testing.assert_array_equal(b.obsm[keys.SPATIAL], a.obsm[keys.SPATIAL])
    assert b.obs[keys.LABEL].tolist() == a.obs[keys.LABEL].tolist()
    assert b.uns[keys.STIMAGE_UNS][keys.MPP] == pytest.approx(4.0)
    assert b.uns[keys.SPATIAL_UNS]["Z1"]["metadata"][keys.IMAGE_PATH] == a.uns[keys.SPATIAL_UNS]["Z1"]["metadata"][keys.IMAGE_PATH]


# --- malformed input (issue 13 item 6) ---------------------------------------------------------
def _toy_h5ad(her2st_toy, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = read_her2st(her2st_toy, "Z1")
    return a, tmp_path / "Z1.h5ad"


def test_inf_count_named(tmp_path):
    _adata([[1.0, np.inf], [0.0, 0.0]]).write_h5ad(tmp_path / "inf.h5ad")
    with pytest.raises(StimageError, match="inf.h5ad: NaN/inf count inf at spot s1, gene G2"):
        read_h5ad(tmp_path / "inf.h5ad")


def test_counts_stored_as_strings(her2st_toy, tmp_path):
    import h5py

    a, p = _toy_h5ad(her2st_toy, tmp_path)
    write_h5ad(a, p)
    with h5py.File(p, "r+") as f:  # a sparse X whose values are text: anndata itself refuses it
        vals = f["X/data"][:]
        del f["X/data"]
        f["X/data"] = np.array([str(v) for v in vals], dtype="S")
    with pytest.raises(StimageError, match=r"Z1.h5ad is not a readable .h5ad \(ValueError: scipy.sparse does "
                                           r"not support dtype \|S1") as e:
        read_h5ad(p)
    assert "\n" not in str(e.value)
    a.X = a.X.toarray()
    write_h5ad(a, p, overwrite=True)
    with h5py.File(p, "r+") as f:  # a dense X of text: read, then refused by the counts check
        vals, attrs = f["X"][:], dict(f["X"].attrs)
        del f["X"]
        f["X"] = vals.astype(str).astype("S")
        f["X"].attrs.update(attrs)
    with pytest.raises(StimageError, match=r"Z1.h5ad: counts are stored as (<U|\|S)\d+ \(text\?\), not numbers") as e:
        read_h5ad(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("where, value, msg", [
    ("stimage", "0.69", r"uns\['stimage'\]\['mpp'\] is the string '0.69'; a number is required"),
    ("stimage", -1.0, r"uns\['stimage'\]\['mpp'\] is -1.0; a finite positive number is required"),
    ("metadata", "4", r"uns\['spatial'\]\['Z1'\]\['metadata'\]\['mpp'\] is the string '4'"),
])
def test_mpp_must_be_a_number(her2st_toy, tmp_path, where, value, msg):
    a, p = _toy_h5ad(her2st_toy, tmp_path)
    if where == "stimage":
        a.uns[keys.STIMAGE_UNS][keys.MPP] = value
    else:
        a.uns[keys.SPATIAL_UNS]["Z1"]["metadata"][keys.MPP] = value
    write_h5ad(a, p)
    with pytest.raises(StimageError, match=msg) as e:
        read_h5ad(p)
    assert "Z1.h5ad" in str(e.value) and "\n" not in str(e.value)


def test_spot_coordinates_must_be_finite(her2st_toy, tmp_path):
    a, p = _toy_h5ad(her2st_toy, tmp_path)
    a.obsm[keys.SPATIAL][1, 0] = np.nan
    write_h5ad(a, p)
    with pytest.raises(StimageError, match=r"Z1.h5ad: obsm\['spatial'\] is not finite at spot Z1_1x2"):
        read_h5ad(p)
    a.obsm[keys.SPATIAL] = np.zeros((a.n_obs, 3))
    write_h5ad(a, p, overwrite=True)
    with pytest.raises(StimageError, match=r"obsm\['spatial'\] has shape \(3, 3\), expected \(n_spots, 2\)"):
        read_h5ad(p)
