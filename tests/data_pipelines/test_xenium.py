"""Xenium reader: a bundle generated in 10x's file formats around a real MoNuSeg H&E tile.

The generator places each annotated MoNuSeg nucleus as a Xenium cell: its centroid goes
through a known similarity transform (rotation, 0.25 µm per H&E px, offset) into Xenium µm;
the DAPI image is the H&E's haematoxylin channel warped into the morphology frame
(0.2125 µm/px, as Xenium); counts are Poisson with the cell's true class's markers high.
The reader must recover the transform (centroids back on their nuclei), the types, a type
table that ``assign_types`` maps onto the real instance map, and pseudo-spot sums.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anndata as ad
import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

from data_pipelines.cell_patches import CELL_TYPES, assign_types, nuclear_grey, read_type_table
from data_pipelines.errors import StimageError
from data_pipelines.monuseg import read_monuseg_polygons, read_monuseg_xml
from data_pipelines.slides.xenium import (DEFAULT_MARKERS, find_bundle, hex_grid, pseudo_spots, read_markers,
                                          read_xenium, score_cell_types, type_table)
from data_pipelines.tiles import load_image

HE_MPP = 0.25       # MoNuSeg: 40x
XENIUM_PX = 0.2125  # µm per morphology pixel
ANGLE = np.deg2rad(8.0)
OFFSET_UM = np.array([40.0, 25.0])
CLASSES = CELL_TYPES[1:]


def he_to_um(xy: np.ndarray) -> np.ndarray:
    c, s = np.cos(ANGLE), np.sin(ANGLE)
    rot = np.array([[c, -s], [s, c]])
    return (np.asarray(xy) * HE_MPP) @ rot.T + OFFSET_UM


def write_10x_h5(path: Path, counts: np.ndarray, barcodes, names, ftypes) -> None:
    """Space Ranger / Xenium v3 HDF5 matrix (features × barcodes CSC)."""
    import scipy.sparse as sp

    m = sp.csc_matrix(counts.T.astype(np.int32))
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, np.int32)
        ft = g.create_group("features")
        ft["name"] = np.array([n.encode() for n in names])
        ft["id"] = np.array([f"ENSG{i:08d}".encode() for i in range(len(names))])
        ft["feature_type"] = np.array([t.encode() for t in ftypes])
        ft["genome"] = np.array([b"GRCh38"] * len(names))


def make_bundle(he_png: Path, xml: Path, out: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rgb = load_image(he_png)
    h, w = rgb.shape[:2]
    polys = read_monuseg_polygons(xml)
    centroids = np.array([p.mean(0) for p in polys])  # (x, y) H&E px
    # True class by quadrant-ish regions plus noise, so every class occurs.
    truth = rng.integers(0, 4, len(centroids))
    genes = sorted({g for v in DEFAULT_MARKERS.values() for g in v[:6]} | {"ACTB", "GAPDH", "MKI67"})
    rate = np.full((len(centroids), len(genes)), 0.2)
    for i, cls in enumerate(CLASSES):
        cols = [genes.index(g) for g in DEFAULT_MARKERS[cls][:6]]
        rate[np.ix_(truth == i, cols)] = 6.0
    rate[:, genes.index("ACTB")] = 10.0
    counts = rng.poisson(rate)
    n_ctrl = 3
    ctrl = rng.poisson(0.1, (len(centroids), n_ctrl))
    names = genes + [f"NegControlProbe_{k}" for k in range(n_ctrl)]
    ftypes = ["Gene Expression"] * len(genes) + ["Negative Control Probe"] * n_ctrl
    ids = [f"cell{i:05d}" for i in range(len(centroids))]
    out.mkdir(parents=True)
    write_10x_h5(out / "cell_feature_matrix.h5", np.hstack([counts, ctrl]), ids, names, ftypes)
    um = he_to_um(centroids)
    with gzip.open(out / "cells.csv.gz", "wt") as fh:
        pd.DataFrame({"cell_id": ids, "x_centroid": um[:, 0], "y_centroid": um[:, 1],
                      "transcript_counts": counts.sum(1), "control_probe_counts": ctrl.sum(1),
                      "cell_area": rng.uniform(40, 90, len(ids)), "nucleus_area": rng.uniform(15, 40, len(ids))}
                     ).to_csv(fh, index=False)
    (out / "experiment.xenium").write_text(json.dumps({"pixel_size": XENIUM_PX, "run_name": "synthetic_run",
                                                       "panel_name": "test panel", "major_version": 2}))
    # DAPI: H&E px → DAPI px = he_to_um / XENIUM_PX (an affine map), nuclei bright, uint16.
    c, s = np.cos(ANGLE), np.sin(ANGLE)
    lin = HE_MPP / XENIUM_PX * np.array([[c, -s], [s, c]])
    m = np.hstack([lin, (OFFSET_UM / XENIUM_PX)[:, None]])
    size = (int((w * HE_MPP * 1.3 + OFFSET_UM[0]) / XENIUM_PX), int((h * HE_MPP * 1.3 + OFFSET_UM[1]) / XENIUM_PX))
    dapi = cv2.warpAffine(nuclear_grey(rgb), m, size, flags=cv2.INTER_LINEAR, borderValue=0)
    dapi16 = (dapi.astype(np.uint16) * 200 + rng.integers(0, 50, dapi.shape)).astype(np.uint16)
    with tifffile.TiffWriter(out / "morphology_focus.ome.tif", ome=True) as tw:  # 2-level pyramid as XOA
        tw.write(dapi16, subifds=1, metadata={"axes": "YX", "PhysicalSizeX": XENIUM_PX, "PhysicalSizeY": XENIUM_PX},
                 tile=(256, 256))
        tw.write(dapi16[::2, ::2], subfiletype=1, tile=(256, 256))
    return {"centroids": centroids, "truth": np.array(CLASSES)[truth], "ids": ids, "counts": counts,
            "genes": genes, "shape": (h, w)}


@pytest.fixture(scope="module")
def monuseg_tile(shared):
    test = Path(shared) / "data" / "monuseg" / "test"
    png = sorted(test.glob("*.png"))[0]
    return png, png.with_suffix(".xml")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, monuseg_tile):
    root = tmp_path_factory.mktemp("xenium") / "output-XETG_test"
    return root, make_bundle(*monuseg_tile, root)


@pytest.fixture(scope="module")
def cells(bundle, monuseg_tile):
    root, _ = bundle
    return read_xenium(root, monuseg_tile[0], he_mpp=HE_MPP)


@pytest.mark.real_data
def test_registration_puts_cells_back_on_their_nuclei(cells, bundle):
    _, truth = bundle
    order = [f"synthetic_run_{i}" for i in truth["ids"]]
    xy = np.asarray(cells[order].obsm["spatial"])
    err = np.linalg.norm(xy - truth["centroids"], axis=1)
    assert np.median(err) < 1.5 and np.percentile(err, 95) < 3.0, (np.median(err), np.percentile(err, 95))
    st = cells.uns["stimage"]["xenium"]
    assert st["rotation_deg"] == pytest.approx(-8.0, abs=0.5)  # µm → H&E undoes the +8° rotation
    assert st["scale_px_per_um"] == pytest.approx(1 / HE_MPP, rel=0.02)
    assert cells.obs["in_he"].all()


@pytest.mark.real_data
def test_marker_scoring_recovers_the_types(cells, bundle):
    _, truth = bundle
    order = [f"synthetic_run_{i}" for i in truth["ids"]]
    got = cells[order].obs["cell_type"].astype(str).to_numpy()
    assert (got == truth["truth"]).mean() > 0.95
    assert cells.var_names.str.startswith("NegControl").sum() == 0  # controls are not genes
    assert cells.n_vars == len(truth["genes"])


def test_score_cell_types_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    genes = ["PTPRC", "CD3E", "COL1A1", "DCN", "EPCAM", "KRT8", "PECAM1", "VWF", "ACTB"]
    x = rng.poisson(2.0, (50, len(genes))).astype(float)
    markers = {"immune": ["PTPRC", "CD3E"], "stromal": ["COL1A1", "DCN", "NOTINDATA"],
               "cancer_epithelial": ["EPCAM", "KRT8"], "endothelial": ["PECAM1", "VWF"]}
    types, scores = score_cell_types(x, genes, markers, min_counts=0, min_score=-np.inf)
    lib = x.sum(1)
    logx = np.log1p(x * (np.median(lib) / lib)[:, None])
    z = (logx - logx.mean(0)) / logx.std(0)
    want = {c: z[:, [genes.index(g) for g in m if g in genes]].mean(1) for c, m in markers.items()}
    for c in markers:
        np.testing.assert_allclose(scores[c], want[c], rtol=1e-12)
    np.testing.assert_array_equal(types, np.array(list(markers))[np.stack(list(want.values()), 1).argmax(1)])
    with pytest.raises(StimageError, match="no marker gene"):
        score_cell_types(x, genes, {"immune": ["NOPE"]})


@pytest.mark.real_data
def test_type_table_is_what_cells_train_reads(cells, monuseg_tile, tmp_path):
    png, xml = monuseg_tile
    path = tmp_path / f"{png.stem}_types.csv"
    type_table(cells).to_csv(path, index=False)
    table = read_type_table(path)
    inst = read_monuseg_xml(xml, load_image(png).shape)
    res = assign_types(inst, table)
    n_nuclei = len(np.unique(inst)) - 1
    typed = int((res.lut[1:] >= 1).sum())
    assert typed > 0.85 * n_nuclei and res.conflicts < 0.05 * n_nuclei


@pytest.mark.real_data
def test_pseudo_spots_sum_the_cells_in_each_disc(cells):
    spots = pseudo_spots(cells, spot_um=30.0)
    um = np.asarray(cells.obsm["spatial_um"])
    pitch = 30.0 * 100 / 55
    assert spots.uns["stimage"]["pseudo_spots"]["pitch_um"] == pytest.approx(pitch)
    # Independent check: spot centres back in µm, then cells within 15 µm of each.
    m = np.asarray(cells.uns["stimage"]["xenium"]["um_to_he_px"])
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    centres = np.asarray(spots.obsm["spatial"]) @ inv[:, :2].T + inv[:, 2]
    x = np.asarray(cells.X.todense())
    for k in range(spots.n_obs):
        inside = np.linalg.norm(um - centres[k], axis=1) <= 15.0
        np.testing.assert_array_equal(np.asarray(spots.X[k].todense()).ravel(), x[inside].sum(0))
        assert spots.obs["n_cells"].iloc[k] == inside.sum()
    # Hexagonal grid: nearest neighbour distance is the pitch.
    from scipy.spatial import cKDTree
    d, _ = cKDTree(centres).query(centres, k=2)
    assert np.min(d[:, 1]) == pytest.approx(pitch, rel=1e-6)
    assert spots.uns["spatial"][spots.uns["stimage"]["library_id"]]["metadata"]["spot_diameter_um"] == 30.0


def test_hex_grid_is_visium_like():
    centres, grid = hex_grid(1000.0, 1000.0)
    assert ((grid[:, 0] + grid[:, 1]) % 2 == 0).all()  # Visium: array_col has the row's parity
    from scipy.spatial import cKDTree
    d, _ = cKDTree(centres).query(centres, k=7)
    mid = int(np.argmin(np.linalg.norm(centres - 500.0, axis=1)))
    np.testing.assert_allclose(d[mid, 1:], 100.0)  # six neighbours at 100 µm


def test_bundle_errors_are_one_line(tmp_path):
    with pytest.raises(StimageError, match="not found"):
        find_bundle(tmp_path / "nope")
    (tmp_path / "b").mkdir()
    with pytest.raises(StimageError, match="no experiment.xenium"):
        find_bundle(tmp_path / "b")
    (tmp_path / "b" / "experiment.xenium").write_text('{"pixel_size": "x"}')
    with pytest.raises(StimageError, match="pixel_size"):
        find_bundle(tmp_path / "b")
    (tmp_path / "b" / "experiment.xenium").write_text('{"pixel_size": 0.2125}')
    with pytest.raises(StimageError, match="no cell table"):
        find_bundle(tmp_path / "b")
    bad = tmp_path / "m.json"
    bad.write_text('{"macrophage": ["CD68"]}')
    with pytest.raises(StimageError, match="not one of"):
        read_markers(bad)


@pytest.mark.real_data
def test_cli_reads_xenium_end_to_end(bundle, monuseg_tile, tmp_path, capsys):
    from stimage_jax.cli import main

    root, _ = bundle
    out = tmp_path / "cells.h5ad"
    markers = tmp_path / "markers.json"
    markers.write_text(json.dumps({k: list(v) for k, v in DEFAULT_MARKERS.items()}))
    args = ["--he", str(monuseg_tile[0]), "--he-mpp", str(HE_MPP), "--markers", str(markers)]
    assert main(["--quiet", "read", "xenium", str(root), *args, "--out", str(out), "--pseudo-spots", "30"]) == 0
    cells = ad.read_h5ad(out)
    assert cells.obs["cell_type"].astype(str).isin(CLASSES).mean() > 0.9
    table = read_type_table(tmp_path / f"{monuseg_tile[0].stem}_types.csv")
    assert len(table) == int((cells.obs["cell_type"].astype(str) != "unknown").sum())
    spots = ad.read_h5ad(tmp_path / "cells_spots.h5ad")
    assert 0 < spots.X.sum() <= cells.X.sum() and spots.n_vars == cells.n_vars
    # Bad input: one line, exit 2, nothing written.
    capsys.readouterr()
    out2 = tmp_path / "again" / "again.h5ad"
    assert main(["--quiet", "read", "xenium", str(tmp_path), *args, "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stimage: error:") and err.strip().count("\n") == 0 and "experiment.xenium" in err
    assert not out2.exists()
