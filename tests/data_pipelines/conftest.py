"""Tiny synthetic slides and on-disk layouts with known content, for exact checks."""

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
import scipy.sparse as sp

from data_pipelines import keys


def write_rgb(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def square_slide(tmp_path):
    """A 200×120 grey image with a red 10×10 square centred at (50, 40) and two spots."""
    img = np.full((120, 200, 3), 128, np.uint8)
    img[35:45, 45:55] = (255, 0, 0)
    path = write_rgb(tmp_path / "slide.png", img)
    a = ad.AnnData(sp.csr_matrix(np.array([[1, 2], [3, 4]], np.int32)),
                   obs=pd.DataFrame({keys.SAMPLE: ["s", "s"]}, index=["centre", "corner"]),
                   var=pd.DataFrame(index=["A", "B"]))
    # spot 1 centred on the square; spot 2 at the image corner (3/4 of its tile outside)
    a.obsm[keys.SPATIAL] = np.array([[50.0, 40.0], [0.0, 0.0]])
    a.uns[keys.SPATIAL_UNS] = {"s": {"scalefactors": {}, "metadata": {keys.IMAGE_PATH: str(path)}}}
    a.uns[keys.STIMAGE_UNS] = {keys.MPP: 0.5, keys.SPOT_DIAMETER_UM: 10.0, "library_id": "s", "image_scale": 1.0}
    return a, img, path


# --- a HER2ST-layout root: section "Z1", patient "Z" --------------------------------------
# Array (x, y) → pixel = 100 + 50 * new (new = x + jitter), so 50 px per array unit and
# mpp = 200 µm / 50 px = 4.0 exactly. The image is 190 × 260 px (w × h).
HER2ST_SPOTS = {  # spot: (new_x, new_y)
    "1x1": (1.02, 0.98),   # pixel (151, 149)   inside
    "2x1": (2.00, 1.00),   # pixel (200, 150)   outside (x >= 190) → dropped
    "1x2": (0.98, 2.02),   # pixel (149, 201)   inside
    "1x3": (1.00, 3.00),   # pixel (150, 250)   inside
}
HER2ST_GENES = ["G1", "G2", "G1", "G3"]  # G1 twice: made unique as G1, G1-1


def make_her2st_root(root: Path, counts: np.ndarray | None = None, *, image: bool = True,
                     labels: bool = True, extra_spot: bool = True) -> Path:
    """Write a tiny HER2ST root; ``counts`` (5 spots × 4 genes) may hold NaN or negatives."""
    data = root / "data"
    spots = list(HER2ST_SPOTS) + (["9x9"] if extra_spot else [])  # 9x9: counted, not selected
    if counts is None:
        counts = np.arange(len(spots) * 4).reshape(len(spots), 4) % 7
    (data / "ST-cnts").mkdir(parents=True)
    with gzip.open(data / "ST-cnts" / "Z1.tsv.gz", "wt") as f:
        f.write("\t".join([""] + HER2ST_GENES) + "\n")
        for s, row in zip(spots, counts):
            f.write("\t".join([s] + ["NA" if np.isnan(v) else str(int(v)) for v in np.asarray(row, float)]) + "\n")
    sel = pd.DataFrame([(int(s.split("x")[0]), int(s.split("x")[1]), nx, ny, 100 + 50 * nx, 100 + 50 * ny, 1)
                        for s, (nx, ny) in HER2ST_SPOTS.items()],
                       columns=["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"])
    (data / "ST-spotfiles").mkdir()
    sel.to_csv(data / "ST-spotfiles" / "Z1_selection.tsv", sep="\t", index=False)
    if image:
        write_rgb(data / "ST-imgs" / "Z" / "Z1" / "he.jpg", np.full((260, 190, 3), 200, np.uint8))
    if labels:
        lab = pd.DataFrame({"Row.names": ["a", "b", "c", "d"], "x": [1.02, 0.98, 1.0, np.nan],
                            "y": [0.98, 2.02, 3.0, np.nan], "pixel_x": 0, "pixel_y": 0,
                            "label": ["invasive cancer", "adipose tissue", "invasive cancer", "undetermined"]})
        (data / "ST-pat" / "lbl").mkdir(parents=True)
        lab.to_csv(data / "ST-pat" / "lbl" / "Z1_labeled_coordinates.tsv", sep="\t", index=False)
    return root


@pytest.fixture
def her2st_toy(tmp_path) -> Path:
    return make_her2st_root(tmp_path / "her2st")


# --- a Space Ranger folder ------------------------------------------------------------------
def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str],
                 feature_types: list[str] | None = None) -> Path:
    """Minimal Space Ranger v3 feature-barcode matrix (features × barcodes CSC)."""
    m = sp.csc_matrix(np.asarray(counts).T)
    ft = feature_types or ["Gene Expression"] * len(genes)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices, m.indptr
        g["shape"] = np.array(m.shape, np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        fe = g.create_group("features")
        fe["name"] = np.array(genes, dtype="S")
        fe["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        fe["feature_type"] = np.array(ft, dtype="S")
        fe["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
    return path


@pytest.fixture
def visium_toy(tmp_path):
    """New-format (header) Space Ranger folder: 3 barcodes, 2 in tissue, hires scale 0.5.

    Full-res image 400×300 with a blue 20×20 square centred on spot B (full-res (200, 100));
    the hires image is the same picture at half size.
    """
    root = tmp_path / "sr"
    (root / "spatial").mkdir(parents=True)
    barcodes = ["A-1", "B-1", "C-1"]
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", np.array([[1, 0, 5], [2, 3, 0], [0, 0, 7]]),
                 barcodes, ["MT-A", "GENE", "GENE"])
    pos = pd.DataFrame({"barcode": ["C-1", "B-1", "A-1", "D-1"], "in_tissue": [0, 1, 1, 1],
                        "array_row": [0, 1, 2, 3], "array_col": [0, 2, 4, 6],
                        "pxl_row_in_fullres": [10, 100, 150, 20], "pxl_col_in_fullres": [10, 200, 100, 20]})
    pos.to_csv(root / "spatial" / "tissue_positions.csv", index=False)  # D-1: in tissue, no counts
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 40.0, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}))
    full = np.full((300, 400, 3), 230, np.uint8)
    full[90:110, 190:210] = (0, 0, 255)
    full_path = write_rgb(tmp_path / "fullres.png", full)
    write_rgb(root / "spatial" / "tissue_hires_image.png",
              cv2.resize(full, (200, 150), interpolation=cv2.INTER_AREA))
    return root, full_path
