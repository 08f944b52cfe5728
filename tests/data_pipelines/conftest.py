"""Tiny synthetic slides with known content for exact tiling checks."""

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipelines import keys


@pytest.fixture
def square_slide(tmp_path):
    """A 200×120 grey image with a red 10×10 square centred at (50, 40) and two spots."""
    img = np.full((120, 200, 3), 128, np.uint8)
    img[35:45, 45:55] = (255, 0, 0)
    path = tmp_path / "slide.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    a = ad.AnnData(sp.csr_matrix(np.array([[1, 2], [3, 4]], np.int32)),
                   obs=pd.DataFrame({keys.SAMPLE: ["s", "s"]}, index=["centre", "corner"]),
                   var=pd.DataFrame(index=["A", "B"]))
    # spot 1 centred on the square; spot 2 at the image corner (3/4 of its tile outside)
    a.obsm[keys.SPATIAL] = np.array([[50.0, 40.0], [0.0, 0.0]])
    a.uns[keys.SPATIAL_UNS] = {"s": {"scalefactors": {}, "metadata": {keys.IMAGE_PATH: str(path)}}}
    a.uns[keys.STIMAGE_UNS] = {keys.MPP: 0.5, keys.SPOT_DIAMETER_UM: 10.0, "library_id": "s", "image_scale": 1.0}
    return a, img, path
