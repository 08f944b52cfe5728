"""HER2ST reader: a toy root with known answers, and the real C1/C2 sections."""

import gzip
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides import her2st_sections, read_her2st

from .conftest import HER2ST_SPOTS, make_her2st_root


def test_toy_counts_coordinates_mpp(her2st_toy):
    with pytest.warns(UserWarning) as rec:
        a = read_her2st(her2st_toy, "Z1", require_image=True)
    msgs = " | ".join(str(r.message) for r in rec)
    assert "1 of 5 counted spot(s) missing from Z1_selection.tsv dropped (e.g. 9x9)" in msgs
    assert "1 spot(s) centred outside the 190x260 image dropped (e.g. 2x1)" in msgs
    assert "1 duplicated gene symbol(s)" in msgs
    u = a.uns[keys.STIMAGE_UNS]
    assert u["dropped"] == {"not_in_selection": 1, "outside_image": 1}
    assert list(a.obs_names) == ["Z1_1x1", "Z1_1x2", "Z1_1x3"]
    assert list(a.var_names) == ["G1", "G2", "G1-1", "G3"]
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.int32
    expect = (np.arange(20).reshape(5, 4) % 7)[[0, 2, 3]]  # rows of 1x1, 1x2, 1x3
    np.testing.assert_array_equal(a.X.toarray(), expect)
    assert a.obs[keys.ARRAY_COL].tolist() == [1, 1, 1] and a.obs[keys.ARRAY_ROW].tolist() == [1, 2, 3]
    assert a.obs[keys.SAMPLE].unique().tolist() == ["Z1"]
    nxy = np.array([HER2ST_SPOTS[s] for s in ("1x1", "1x2", "1x3")])
    np.testing.assert_allclose(a.obsm[keys.SPATIAL], 100 + 50 * nxy)
    assert a.obsm[keys.SPATIAL].dtype == np.float64
    # pixel = 100 + 50·new exactly → 50 px per 200 µm pitch
    assert u[keys.MPP] == pytest.approx(4.0, abs=1e-9)
    assert u[keys.SPOT_DIAMETER_UM] == 100.0 and u["platform"] == "legacy_st"
    assert u["library_id"] == "Z1" and u["image_scale"] == 1.0
    lib = a.uns[keys.SPATIAL_UNS]["Z1"]
    assert lib["scalefactors"] == {keys.SPOT_DIAMETER_FULLRES: pytest.approx(25.0), "tissue_hires_scalef": 1.0}
    assert lib["metadata"][keys.IMAGE_PATH] == str((her2st_toy / "data/ST-imgs/Z/Z1/he.jpg").resolve())
    assert lib["metadata"][keys.MPP] == pytest.approx(4.0)


def test_toy_labels_by_rounding(her2st_toy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = read_her2st(her2st_toy, "Z1")
    assert a.obs[keys.LABEL].tolist() == ["invasive cancer", "adipose tissue", "invasive cancer"]
    assert list(a.obs[keys.LABEL].cat.categories) == ["adipose tissue", "invasive cancer"]
    assert a.uns[keys.STIMAGE_UNS]["labels"] == {"label_rows": 4, "rows_without_xy": 1, "rows_matched": 3,
                                                "spots_labelled": 3, "spots": 3, "conflicting_spots": 0}


def test_toy_without_image(tmp_path):
    root = make_her2st_root(tmp_path / "r", image=False, labels=False, extra_spot=False)
    with pytest.warns(UserWarning) as rec:
        a = read_her2st(root, "Z1")
    msgs = [str(r.message) for r in rec]
    assert sum("no H&E image" in m for m in msgs) == 1 and any("duplicated gene" in m for m in msgs)
    assert a.n_obs == 4  # nothing dropped for lying outside an image there is none of
    assert a.uns[keys.SPATIAL_UNS]["Z1"]["metadata"][keys.IMAGE_PATH] == ""
    assert keys.LABEL not in a.obs
    with pytest.raises(StimageError, match="section Z1 has no H&E image under .*ST-imgs/Z/Z1"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_her2st(root, "Z1", require_image=True)


@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN/inf"), (-3, "negative")])
def test_toy_bad_counts(tmp_path, bad, kind):
    counts = np.ones((5, 4))
    counts[2, 3] = bad  # spot 1x2, gene G3
    root = make_her2st_root(tmp_path / "r", counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StimageError, match=f"{kind} count .* at spot Z1_1x2, gene G3"):
            read_her2st(root, "Z1")


def test_toy_missing_files(her2st_toy):
    with pytest.raises(StimageError, match=r"no counts for section 'Q7' .*; available: Z1$"):
        read_her2st(her2st_toy, "Q7")
    with pytest.raises(StimageError, match="is .* a HER2ST root"):
        read_her2st(her2st_toy / "nowhere", "Z1")
    (her2st_toy / "data/ST-spotfiles/Z1_selection.tsv").unlink()
    with pytest.raises(StimageError, match="spot file .*Z1_selection.tsv not found"):
        read_her2st(her2st_toy, "Z1")


# --- real data --------------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_c2(her2st_root):
    a = read_her2st(her2st_root, "C2", require_image=True)
    u = a.uns[keys.STIMAGE_UNS]
    assert a.n_obs == 187 - sum(u["dropped"].values())
    assert u["dropped"] == {"not_in_selection": 0, "outside_image": 0}  # measured: none dropped
    assert a.n_vars == 15706 and a.var_names.is_unique
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.int32
    assert 0.66 < u[keys.MPP] < 0.72 and u[keys.MPP] == pytest.approx(0.6881, abs=2e-4)
    # one count straight from the tsv: first spot, gene SAMD11
    with gzip.open(her2st_root / "data/ST-cnts/C2.tsv.gz", "rt") as f:
        header = f.readline().rstrip("\n").split("\t")
        row = f.readline().rstrip("\n").split("\t")
    j = header.index("SAMD11")
    spot = f"C2_{row[0]}"
    assert a[spot, "SAMD11"].X.toarray().item() == int(row[j])
    assert a.X.sum() > 0 and a[spot].X.sum() == sum(int(v) for v in row[1:])
    x, y = map(int, row[0].split("x"))
    assert (a.obs.loc[spot, keys.ARRAY_COL], a.obs.loc[spot, keys.ARRAY_ROW]) == (x, y)
    sel = pd.read_csv(her2st_root / "data/ST-spotfiles/C2_selection.tsv", sep="\t")
    hit = sel[(sel.x == x) & (sel.y == y)].iloc[0]
    np.testing.assert_array_equal(a[spot].obsm[keys.SPATIAL][0], [hit.pixel_x, hit.pixel_y])
    lib = a.uns[keys.SPATIAL_UNS]["C2"]
    assert lib["metadata"][keys.IMAGE_PATH].endswith("ST-imgs/C/C2/5714_HE_BT_C2.jpg")
    assert lib["scalefactors"][keys.SPOT_DIAMETER_FULLRES] == pytest.approx(100 / u[keys.MPP])


@pytest.mark.real_data
def test_real_labels_attach_c1(her2st_root):
    with pytest.warns(UserWarning, match="no H&E image"):
        a = read_her2st(her2st_root, "C1")
    lab = a.obs[keys.LABEL]
    assert set(lab.cat.categories) == {"invasive cancer", "connective tissue", "undetermined", "adipose tissue"}
    stats = a.uns[keys.STIMAGE_UNS]["labels"]
    # every counted spot gets a label; one label row is a selected spot without counts
    assert lab.notna().all() and stats["spots_labelled"] == a.n_obs == 176
    assert (stats["label_rows"], stats["rows_matched"], stats["conflicting_spots"]) == (177, 176, 0)
    assert 0.66 < a.uns[keys.STIMAGE_UNS][keys.MPP] < 0.72
    with pytest.raises(StimageError, match="has no H&E image"):
        read_her2st(her2st_root, "C1", require_image=True)


@pytest.mark.real_data
def test_real_unknown_section_lists_available(her2st_root):
    assert len(her2st_sections(her2st_root)) == 35
    with pytest.raises(StimageError, match=r"no counts for section 'Z9'.*available: A1, A2, .*H3$"):
        read_her2st(her2st_root, "Z9")


# --- malformed input (issue 13 item 6): a real section's files, copied and corrupted ---------
def _real_copy(her2st_root, dest, section="C1", rows=40):
    """C1's counts (header + first ``rows`` spots, to stay fast), spot file and label file."""
    src = her2st_root / "data"
    data = dest / "data"
    for d in ("ST-cnts", "ST-spotfiles", "ST-pat/lbl"):
        (data / d).mkdir(parents=True)
    with gzip.open(src / "ST-cnts" / f"{section}.tsv.gz", "rt") as f:
        lines = [next(f) for _ in range(rows + 1)]
    sel = (src / "ST-spotfiles" / f"{section}_selection.tsv").read_text().splitlines(keepends=True)
    lab = (src / "ST-pat/lbl" / f"{section}_labeled_coordinates.tsv").read_text().splitlines(keepends=True)
    return dest, lines, sel, lab


def _write(dest, section, lines=None, sel=None, lab=None):
    data = dest / "data"
    if lines is not None:
        with gzip.open(data / "ST-cnts" / f"{section}.tsv.gz", "wt", compresslevel=1) as f:
            f.writelines(lines)
    if sel is not None:
        (data / "ST-spotfiles" / f"{section}_selection.tsv").write_text("".join(sel))
    if lab is not None:
        (data / "ST-pat/lbl" / f"{section}_labeled_coordinates.tsv").write_text("".join(lab))


def _cell(line: str, j: int, value: str) -> str:
    f = line.rstrip("\n").split("\t")
    f[j] = value
    return "\t".join(f) + "\n"


@pytest.mark.real_data
def test_real_copy_reads_then_malformed_counts(her2st_root, tmp_path):
    root, lines, sel, lab = _real_copy(her2st_root, tmp_path / "r")
    _write(root, "C1", lines, sel, lab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no image; labels for spots beyond the 40 kept
        a = read_her2st(root, "C1")
    assert a.n_obs == 40 and a.n_vars == 15557 and a.obs[keys.LABEL].notna().all()
    spot, gene = lines[3].split("\t")[0], lines[0].rstrip("\n").split("\t")[5]
    for value, msg in (("12a", f"count '12a' at spot {spot}, gene {gene} is not a number"),
                       ("inf", f"NaN/inf count inf at spot C1_{spot}, gene {gene}"),
                       ("-4", f"negative count -4.0 at spot C1_{spot}, gene {gene}"),
                       ("NA", f"NaN/inf count nan at spot C1_{spot}, gene {gene}")):
        _write(root, "C1", lines[:3] + [_cell(lines[3], 5, value)] + lines[4:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(StimageError, match=msg) as e:
                read_her2st(root, "C1")
        assert "\n" not in str(e.value) and "C1.tsv.gz" in str(e.value)


@pytest.mark.real_data
def test_real_copy_malformed_spot_file(her2st_root, tmp_path):
    root, lines, sel, lab = _real_copy(her2st_root, tmp_path / "r")
    _write(root, "C1", lines, lab=lab)
    for col, value, msg in ((4, "55o7.83", r"pixel_x is '55o7.83', not a number in data row 3"),
                            (0, "", "x is empty in data row 3"),
                            (3, "inf", r"new_y is inf, not finite in data row 3")):
        _write(root, "C1", sel=sel[:3] + [_cell(sel[3], col, value)] + sel[4:])
        with pytest.raises(StimageError, match=msg) as e:
            read_her2st(root, "C1")
        assert "\n" not in str(e.value) and "C1_selection.tsv" in str(e.value)


@pytest.mark.real_data
def test_real_copy_malformed_label_file(her2st_root, tmp_path):
    root, lines, sel, lab = _real_copy(her2st_root, tmp_path / "r")
    _write(root, "C1", lines, sel)
    for bad, msg in ((lab[:2] + [lab[2].rstrip("\n") + "\textra\tfields\n"] + lab[3:],
                      "cannot read label file .*C1_labeled_coordinates.tsv \\(ParserError"),
                     (lab[:2] + [_cell(lab[2], 1, "nine")] + lab[3:],
                      "C1_labeled_coordinates.tsv: x is 'nine', not a number in data row 2"),
                     ([], "cannot read label file .*\\(EmptyDataError")):
        _write(root, "C1", lab=bad)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(StimageError, match=msg) as e:
                read_her2st(root, "C1")
        assert "\n" not in str(e.value)
