"""The quickstart's figure: observed counts, predicted mean and epistemic SD as spot discs
over the real H&E."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.collections import EllipseCollection
from PIL import Image

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.slides import read_her2st
from stimage_jax import plots


@pytest.fixture(scope="module")
def c6(her2st_root):
    return read_her2st(her2st_root, "C6", require_image=True)


def _prediction(truth, genes, seed=0):
    rng = np.random.default_rng(seed)
    pred = truth[:, genes].copy()
    pred.X = rng.gamma(2.0, 5.0, (pred.n_obs, len(genes)))
    pred.layers[keys.VAR_EPISTEMIC] = rng.gamma(1.0, 3.0, pred.X.shape)
    pred.layers[keys.VAR_ALEATORIC] = rng.gamma(1.0, 3.0, pred.X.shape)
    return pred


@pytest.mark.real_data
def test_he_overlay_draws_each_value_at_its_spot_with_its_diameter(c6):
    genes = ["CD74", "ERBB2"]
    pred = _prediction(c6, genes)
    image, scale = plots.he_thumbnail(c6, max_side=800)
    assert max(image.shape[:2]) == 800 and image.dtype == np.uint8
    fig = plots.he_overlay_figure(pred, c6, genes, image, scale)
    colls = [c for ax in fig.axes for c in ax.collections if isinstance(c, EllipseCollection)]
    assert len(colls) == 6
    want = [np.asarray(c6[:, genes[0]].X.todense()).ravel(), pred[:, genes[0]].X.ravel(),
            np.sqrt(pred[:, genes[0]].layers[keys.VAR_EPISTEMIC].ravel())]
    for c, w in zip(colls[:3], want):
        np.testing.assert_allclose(np.asarray(c.get_array()), w)
        np.testing.assert_allclose(c.get_offsets(), np.asarray(c6.obsm[keys.SPATIAL]) * scale)
    lib = c6.uns[keys.SPATIAL_UNS]["C6"]["scalefactors"][keys.SPOT_DIAMETER_FULLRES]
    assert colls[0]._widths[0] == pytest.approx(lib * scale / 2)  # EllipseCollection stores half-widths
    with_spots = np.asarray(Image.open(io.BytesIO(plots.png_bytes(fig))).convert("RGB"), float)
    bare = np.asarray(Image.open(io.BytesIO(plots.png_bytes(
        plots.he_overlay_figure(pred, c6, genes, image, scale, alpha=0.0)))).convert("RGB"), float)
    assert with_spots.shape == bare.shape and np.abs(with_spots - bare).mean() > 1.0


@pytest.mark.real_data
def test_he_overlay_needs_an_ensemble_prediction(c6):
    pred = _prediction(c6, ["CD74"])
    del pred.layers[keys.VAR_EPISTEMIC]
    with pytest.raises(StimageError, match="var_epistemic"):
        plots.he_overlay_figure(pred, c6, ["CD74"], np.zeros((10, 10, 3), np.uint8), 1.0)
