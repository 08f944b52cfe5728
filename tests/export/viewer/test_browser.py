"""The viewer in headless Chromium (Playwright, Debian's /usr/bin/chromium) on real HER2ST C6
with a small exported model: it loads cleanly, draws overlays, its spot panel shows the
prediction's own numbers, Explain shows nuclei and their table, and a corrupt upload is one
error line after which the viewer still works. Screenshots go to the test's tmp dir."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

pytestmark = [pytest.mark.real_data]


def _shot(page, path) -> np.ndarray:
    """The OpenSeadragon canvas as RGB (H, W, 3), also saved as PNG."""
    from PIL import Image

    png = page.locator("[data-testid=viewer]").screenshot(path=str(path))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _settle(page):
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(400)  # OpenSeadragon's blend-in of new tiles


@pytest.fixture(scope="module")
def independent_prediction(c6_model):
    """C6 predicted by ``export.predict``'s path, outside the viewer."""
    from data_pipelines.slides import read_h5ad
    from export.runtime.onnx_model import OnnxEnsemble
    from export.runtime.prediction import predict_adata

    data, model = c6_model
    return read_h5ad(data), predict_adata(read_h5ad(data), OnnxEnsemble(model), progress=False)


def _click_spot(page, pred, spot: str):
    i = pred.obs_names.get_loc(spot)
    x, y = (float(v) for v in pred.obsm["spatial"][i])
    p = page.evaluate(f"window.stimage.imageToPage({x}, {y})")
    page.mouse.click(p["x"], p["y"])
    page.wait_for_selector(f"[data-testid=spot-panel][data-spot='{spot}']", timeout=15_000)


def _middle_spot(pred) -> str:
    xy = np.asarray(pred.obsm["spatial"])
    return str(pred.obs_names[int(np.argmin(np.hypot(*(xy - np.median(xy, 0)).T)))])


def test_page_loads_without_console_errors(page, tmp_path):
    _settle(page)
    for hook in ("viewer", "gene-select", "layer-select", "opacity", "spot-panel", "explain-button", "explain-image",
                 "nuclei-table", "model-upload", "status"):
        assert page.locator(f"[data-testid={hook}]").count() == 1, hook
    assert "14 genes on 178 spots" in page.locator("[data-testid=status]").inner_text()
    assert page.locator("[data-testid=gene-select] option").count() == 14
    assert page.locator("[data-testid=layer-select] option").all_inner_texts() == [
        "predicted mean", "epistemic variance", "aleatoric variance", "observed counts"]
    bare = _shot(page, tmp_path / "bare.png")
    assert bare.std() > 10  # the H&E is drawn, not a blank canvas
    assert page.errors == []


def test_choosing_a_gene_draws_an_overlay_with_opacity_and_colour_bar(page, tmp_path):
    _settle(page)
    bare = _shot(page, tmp_path / "bare.png")
    page.fill("#gene-filter", "cd7")  # the searchable list narrows to CD74
    visible = [o for o in page.locator("[data-testid=gene-select] option").all() if o.is_visible()]
    assert [o.inner_text() for o in visible] == ["CD74"]
    page.select_option("[data-testid=gene-select]", "CD74")
    page.wait_for_selector("[data-testid=viewer][data-overlay='CD74:mean']")
    _settle(page)
    mean = _shot(page, tmp_path / "CD74_mean.png")
    changed = np.abs(mean - bare).max(-1) > 30
    assert changed.mean() > 0.02, changed.mean()  # the spots are painted over the tissue
    assert page.locator("[data-testid=colorbar]").is_visible()
    assert "CD74: predicted mean" in page.locator("#colorbar-title").inner_text()
    page.select_option("[data-testid=layer-select]", "var_epistemic")
    page.wait_for_selector("[data-testid=viewer][data-overlay='CD74:var_epistemic']")
    _settle(page)
    epi = _shot(page, tmp_path / "CD74_epistemic.png")
    assert (np.abs(epi - mean).max(-1) > 30).mean() > 0.005  # another map
    page.locator("[data-testid=opacity]").fill("0")
    _settle(page)
    hidden = _shot(page, tmp_path / "CD74_opacity0.png")
    def painted(a):
        return (np.abs(a - bare).max(-1) > 30).mean()

    assert painted(hidden) < painted(epi) / 4  # opacity 0: back to the bare H&E
    assert page.errors == []


def test_clicking_a_spot_shows_its_prediction(page, independent_prediction):
    data, pred = independent_prediction
    page.select_option("[data-testid=gene-select]", "CD74")
    page.wait_for_selector("[data-testid=viewer][data-overlay='CD74:mean']")
    spot = _middle_spot(pred)
    _click_spot(page, pred, spot)
    panel = page.locator("[data-testid=spot-panel]")
    g = pred.var_names.get_loc("CD74")
    i = pred.obs_names.get_loc(spot)

    def value(key):
        return float(panel.locator(f"[data-testid=spot-{key}]").get_attribute("data-value"))

    assert panel.locator("[data-testid=spot-id]").inner_text() == spot
    assert value("mean") == float(pred.X[i, g])
    assert value("var_aleatoric") == float(pred.layers["var_aleatoric"][i, g])
    assert value("var_epistemic") == float(pred.layers["var_epistemic"][i, g])
    interval = panel.locator("[data-testid=spot-interval]")
    assert float(interval.get_attribute("data-lo")) == float(pred.layers["q_lo"][i, g])
    assert float(interval.get_attribute("data-hi")) == float(pred.layers["q_hi"][i, g])
    assert value("tissue_coverage") == float(pred.obs["tissue_coverage"].iloc[i])
    assert value("observed") == float(data[spot, "CD74"].X.toarray().ravel()[0])
    assert page.errors == []


def test_explain_shows_nuclei_coloured_by_weight_and_their_table(page, independent_prediction, viewer, tmp_path):
    data, pred = independent_prediction
    page.select_option("[data-testid=gene-select]", "CD74")
    page.wait_for_selector("[data-testid=viewer][data-overlay='CD74:mean']")
    spot = _middle_spot(pred)
    _click_spot(page, pred, spot)
    page.click("[data-testid=explain-button]")
    page.wait_for_selector(f"[data-testid=spot-panel][data-explained='{spot}:CD74']", timeout=60_000)
    img = page.locator("[data-testid=explain-image]")
    assert page.evaluate("document.querySelector('[data-testid=explain-image]').naturalWidth") >= 128
    assert img.is_visible()
    rows = page.locator("[data-testid=nuclei-table] tbody tr")
    # the table is the explanation's: one row per segmented nucleus, weights as the API gives them
    code, job = viewer.post("/api/explain", f'{{"spot": "{spot}", "gene": "CD74"}}'.encode())
    assert code == 200 and job["state"] == "done"  # cached: the same job, answered at once
    assert rows.count() == job["n_nuclei"] == len(job["rows"]) > 0
    shown = {int(r.get_attribute("data-nucleus")): float(r.locator("td").nth(2).get_attribute("data-value"))
             for r in rows.all()}
    assert shown == {r["nucleus"]: r["weight"] for r in job["rows"]}
    with page.expect_download() as dl:
        page.click("[data-testid=nuclei-csv]")
    csv = dl.value.path().read_text().splitlines()
    assert csv[0] == "nucleus,area_px,area_um2,centroid_x,centroid_y,weight"
    assert len(csv) == 1 + job["n_nuclei"]
    page.screenshot(path=str(tmp_path / "viewer.png"))
    if os.environ.get("STIMAGE_VIEWER_SCREENSHOT"):  # the README's picture
        page.screenshot(path=os.environ["STIMAGE_VIEWER_SCREENSHOT"])
    assert page.errors == []


def test_corrupt_upload_is_one_error_line_and_the_viewer_keeps_working(page, independent_prediction, tmp_path):
    data, pred = independent_prediction
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07not an onnx graph" * 10)
    page.set_input_files("[data-testid=model-upload]", str(bad))
    status = page.locator("[data-testid=status]")
    page.wait_for_selector("[data-testid=status].error")
    text = status.inner_text()
    assert "\n" not in text and text.startswith("error: model upload: broken.onnx is not an ONNX model"), text
    assert page.locator("[data-testid=status]").evaluate("e => e.scrollHeight <= e.clientHeight + 2")  # one line
    # still working: a gene, an overlay, a spot
    page.select_option("[data-testid=gene-select]", "B2M")
    page.wait_for_selector("[data-testid=viewer][data-overlay='B2M:mean']")
    spot = str(pred.obs_names[5])
    _click_spot(page, pred, spot)
    g, i = pred.var_names.get_loc("B2M"), 5
    mean = page.locator("[data-testid=spot-mean]").get_attribute("data-value")
    assert float(mean) == float(pred.X[i, g])
    # the only console error is the browser's own note of the refused upload (HTTP 400)
    assert all("status of 400" in e for e in page.errors), page.errors
