"""Shared fixtures: where the real data live, a seeded RNG, and a tiny synthetic study
whose slide colours drive expression."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipelines import keys

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STIMAGE_SHARED", ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only ``shared/`` folder; tests needing it skip with a reason if absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} not found (set STIMAGE_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def her2st_root(shared) -> Path:
    return shared / "data" / "her2st"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_sample(tmp_path, name: str, seed: int, grid: int = 8, pitch_px: int = 40):
    """Image with one coloured disc per spot; gene A rises with redness, B with blueness."""
    rng = np.random.default_rng(seed)
    size = grid * pitch_px + pitch_px
    img = np.full((size, size, 3), 235, np.uint8)
    rows, cols, xy, counts = [], [], [], []
    for i in range(grid):
        for j in range(grid):
            x, y = pitch_px * (j + 1), pitch_px * (i + 1)
            red, blue = rng.uniform(0, 1, 2)
            colour = (int(80 + 150 * red), 60, int(80 + 150 * blue))  # RGB
            cv2.circle(img, (x, y), pitch_px // 3, colour, -1)
            mu = np.array([2 + 30 * red, 2 + 30 * blue, 5.0])
            counts.append(rng.negative_binomial(5.0, 5.0 / (5.0 + mu)))
            rows.append(i), cols.append(j), xy.append((x, y))
    path = tmp_path / f"{name}.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    obs = pd.DataFrame({keys.SAMPLE: name, keys.ARRAY_ROW: rows, keys.ARRAY_COL: cols},
                       index=[f"{name}_{r}x{c}" for r, c in zip(rows, cols)])
    a = ad.AnnData(sp.csr_matrix(np.asarray(counts, np.int32)), obs=obs,
                   var=pd.DataFrame(index=["A", "B", "C"]))
    a.obsm[keys.SPATIAL] = np.asarray(xy, np.float64)
    mpp = 1.0
    a.uns[keys.SPATIAL_UNS] = {name: {"scalefactors": {keys.SPOT_DIAMETER_FULLRES: 2 * (pitch_px // 3),
                                                       "tissue_hires_scalef": 1.0},
                                      "metadata": {keys.IMAGE_PATH: str(path)}}}
    a.uns[keys.STIMAGE_UNS] = {keys.MPP: mpp, keys.SPOT_DIAMETER_UM: float(2 * (pitch_px // 3)),
                               "platform": "synthetic", "library_id": name, "image_scale": 1.0}
    return a


@pytest.fixture
def synthetic_study(tmp_path):
    """Three samples written as .h5ad: paths in order s0, s1, s2."""
    paths = []
    for k in range(3):
        a = make_sample(tmp_path, f"s{k}", seed=k)
        p = tmp_path / f"s{k}.h5ad"
        a.write_h5ad(p)
        paths.append(p)
    return paths


def _make_slide(path, *, mpp=0.5, size=(1200, 1600), svs_description=False, tags=True):
    """Glass (near-white) with an H&E-pink disc of tissue in the middle, as a tiled pyramidal TIFF."""
    import tifffile

    h, w = size
    img = np.full((h, w, 3), 242, np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, (200, 120, 170), -1)
    rng = np.random.default_rng(0)
    img = np.clip(img.astype(int) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    kw = dict(tile=(256, 256), photometric="rgb", compression="zlib")
    extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if tags else {}
    desc = f"Aperio Image Library |AppMag = 20|MPP = {mpp}" if svs_description else None
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subifds=1, description=desc, metadata=None, **extra, **kw)
        tw.write(img[::4, ::4], subfiletype=1, **kw)
    return img


@pytest.fixture
def make_slide():
    """Factory: make_slide(path, mpp=..., size=(h, w), svs_description=False, tags=True) -> image."""
    return _make_slide
