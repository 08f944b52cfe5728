"""``stimage cells`` train / predict / evaluate on a synthetic folder (tiny model, 64² patches):
outputs, resume and budget, one-line errors. The parser is built here with
``stimage_jax.cli.cells.add_parser``, so the tests do not depend on the main CLI's wiring."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest

from data_pipelines.errors import StimageError
from stimage_jax.cli.cells import add_parser as add_cells_parser

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COLOURS = {1: (60, 30, 120), 2: (120, 60, 160), 3: (90, 40, 90), 4: (150, 90, 180)}


def run(*argv: str) -> int:
    """Parse as the main CLI would (``stimage cells ...``) and call the handler."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="stimage")
    p.add_argument("--quiet", action="store_true")
    add_cells_parser(p.add_subparsers(dest="command", required=True), parents=(common,))
    a = p.parse_args(["cells", *argv, "--quiet"])
    return a.func(a)


def synth_tile(seed: int, size: int = 128, n: int = 25):
    """Purple discs (types 1–4 in four shades) on pink: (rgb, instances, centroids, types)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    placed = []
    for _ in range(3000):
        c, r = rng.uniform(8, size - 8, 2), rng.uniform(4, 7)
        if all(np.hypot(*(c - c2)) >= 0.9 * (r + r2) for c2, r2 in placed):
            placed.append((c, r))
            m = np.zeros((size, size), np.uint8)
            cv2.circle(m, (int(round(c[0])), int(round(c[1]))), int(round(r)), 1, -1)
            inst[m > 0] = len(placed)
        if len(placed) == n:
            break
    types = rng.integers(1, 5, len(placed))
    rgb = np.full((size, size, 3), (230, 180, 210), np.float64)
    for i, t in enumerate(types, start=1):
        rgb[inst == i] = COLOURS[int(t)]
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, inst, np.array([c for c, _ in placed]), types


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("cells")
    for t in range(2):
        rgb, inst, xy, types = synth_tile(t)
        cv2.imwrite(str(d / f"t{t}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(d / f"t{t}_instances.png"), inst.astype(np.uint16))
        pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "type": types}).to_csv(d / f"t{t}_types.csv", index=False)
    return d


TRAIN = ("--backbone", "tiny", "--patch-size", "64", "--stride", "32", "--batch-size", "4", "--lr", "1e-2")
STEPS = 60


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """One CLI training run shared by the tests (the compilation dominates its ~15 s)."""
    wd = tmp_path_factory.mktemp("run") / "wd"
    assert run("train", "--data", str(folder), "--workdir", str(wd), *TRAIN, "--steps", str(STEPS),
               "--checkpoint-every", "30") == 0
    return wd


def test_train_predict_evaluate(folder, trained, tmp_path):
    wd = trained
    cfg = json.loads((wd / "model" / "model.json").read_text())
    assert cfg["steps"] == STEPS and cfg["num_types"] == 5 and cfg["type_names"][1] == "immune"
    log = pd.read_csv(wd / "train_log.csv")
    assert log["step"].tolist() == list(range(1, STEPS + 1)) and {"np_ce", "hv_msge", "tc_dice"} <= set(log.columns)
    assert np.isfinite(log["loss"]).all() and log["loss"].iloc[-5:].mean() < 0.5 * log["loss"].iloc[:5].mean()

    out = tmp_path / "pred" / "t0_inst.png"
    assert run("predict", "--model", str(wd), "--image", str(folder / "t0.png"), "--out", str(out)) == 0
    inst = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert inst.shape == (128, 128) and inst.dtype == np.uint16
    tab = pd.read_csv(out.with_name("t0_inst_types.csv"))
    assert list(tab.columns[:8]) == ["id", "x", "y", "area_px", "type", "type_name", "type_prob", "p_background"]
    assert len(tab) == int(inst.max()) and tab["id"].tolist() == list(range(1, len(tab) + 1))
    probs = tab[[f"p_{n}" for n in cfg["type_names"]]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)
    ent = np.load(out.with_name("t0_inst_entropy.npy"))
    assert ent.shape == (128, 128) and ent.min() >= 0 and ent.max() <= math.log(5) + 1e-5
    assert cv2.imread(str(out.with_name("t0_inst_entropy.png")), cv2.IMREAD_UNCHANGED).dtype == np.uint8
    with pytest.raises(StimageError, match="already exists"):
        run("predict", "--model", str(wd), "--image", str(folder / "t0.png"), "--out", str(out))

    m = tmp_path / "metrics.json"
    assert run("evaluate", "--pred", str(out), "--truth", str(folder / "t0_instances.png"),
               "--truth-types", str(folder / "t0_types.csv"), "--out", str(m)) == 0
    res = json.loads(m.read_text())
    for k in ("dice", "aji", "pq", "dq", "sq", "f1_detection", "n_pred", "n_true"):
        assert k in res
    # 60 steps on easy synthetic nuclei (measured: Dice 0.89, AJI 0.69, type accuracy 0.75)
    assert res["n_true"] == 25 and res["dice"] > 0.7 and res["f1_detection"] > 0.5
    assert set(res["types"]["per_class_f1"]) <= set(cfg["type_names"][1:]) and res["types"]["accuracy"] > 0.4


def test_evaluate_scores_a_perfect_prediction_and_xml_truth(folder, tmp_path):
    rgb, inst, xy, types = synth_tile(0)
    pred = tmp_path / "p.png"
    cv2.imwrite(str(pred), inst.astype(np.uint16))
    pd.DataFrame({"id": np.arange(1, len(types) + 1), "x": xy[:, 0], "y": xy[:, 1], "type": types}).to_csv(
        tmp_path / "p_types.csv", index=False)
    m = tmp_path / "m.json"
    assert run("evaluate", "--pred", str(pred), "--truth", str(folder / "t0_instances.png"),
               "--truth-types", str(folder / "t0_types.csv"), "--out", str(m)) == 0
    res = json.loads(m.read_text())
    assert res["dice"] == 1.0 and res["aji"] == 1.0 and res["pq"] == 1.0 and res["f1_detection"] == 1.0
    assert res["types"]["accuracy"] == 1.0 and all(v == 1.0 for v in res["types"]["per_class_f1"].values())
    # XML truth: squares as polygons; the prediction is those squares' instance map
    sq = np.zeros((40, 50), np.int32)
    regions = []
    for k, (x, y) in enumerate([(5, 5), (20, 8), (30, 25)], start=1):
        sq[y:y + 6, x:x + 6] = k
        verts = "".join(f'<Vertex X="{vx}" Y="{vy}"/>' for vx, vy in [(x, y), (x + 5, y), (x + 5, y + 5), (x, y + 5)])
        regions.append(f"<Region><Vertices>{verts}</Vertices></Region>")
    xml = tmp_path / "truth.xml"
    xml.write_text(f"<Annotations><Annotation><Regions>{''.join(regions)}</Regions></Annotation></Annotations>")
    np.save(tmp_path / "sq.npy", sq)
    assert run("evaluate", "--pred", str(tmp_path / "sq.npy"), "--truth", str(xml),
               "--out", str(tmp_path / "x.json")) == 0
    res = json.loads((tmp_path / "x.json").read_text())
    assert res["aji"] == 1.0 and res["n_true"] == 3 and "types" not in res


def test_bad_input_is_one_line(folder, tmp_path):
    pred = tmp_path / "p.png"
    cv2.imwrite(str(pred), np.zeros((128, 128), np.uint16))
    empty = tmp_path / "empty.xml"
    empty.write_text("<Annotations><Annotation><Regions></Regions></Annotation></Annotations>")
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((100, 128), np.uint16))
    outside = tmp_path / "outside.csv"
    pd.DataFrame({"x": [10.0, 500.0], "y": [10.0, 5.0], "type": [1, 2]}).to_csv(outside, index=False)
    pd.DataFrame({"id": [1], "x": [1.0], "y": [1.0], "type": [1]}).to_csv(tmp_path / "p_types.csv", index=False)
    cases = [(["evaluate", "--pred", str(pred), "--truth", str(empty), "--out", str(tmp_path / "a.json")],
              "no <Region>"),
             (["evaluate", "--pred", str(pred), "--truth", str(small), "--out", str(tmp_path / "b.json")], "128×100"),
             (["evaluate", "--pred", str(pred), "--truth", str(folder / "t0_instances.png"), "--truth-types",
               str(outside), "--out", str(tmp_path / "c.json")], "outside the 128×128 image"),
             (["predict", "--model", str(tmp_path / "none"), "--image", str(folder / "t0.png"), "--out",
               str(tmp_path / "o.png")], "not a trained cell model"),
             (["predict", "--model", str(tmp_path), "--image", str(folder / "t0.png"), "--out",
               str(tmp_path / "o.jpg")], "must end in"),
             (["train", "--data", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"), *TRAIN], "not found"),
             (["train", "--data", str(folder), "--workdir", str(tmp_path / "w"), *TRAIN, "--patch-size", "50"],
              "multiple of 32")]
    for argv, msg in cases:
        with pytest.raises(StimageError, match=msg) as e:
            run(*argv)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "a.json").exists()


def test_resume_equals_an_uninterrupted_run_and_budgets_stop(folder, trained, tmp_path):
    import jax
    from flax import nnx

    from stimage_jax.cells.train import CellModel, CellTrainConfig, train_cells

    # The same request as the CLI run of the fixture
    cfg = CellTrainConfig(backbone="tiny", weights=None, patch_size=64, stride=32, batch_size=4, lr=1e-2, steps=STEPS,
                          checkpoint_every=30)
    full = CellModel.load(trained)

    class Stop(Exception):
        pass

    def stop_at_45(step, _):
        if step == 45:  # 15 steps after the last checkpoint (30): those are trained again
            raise Stop

    with pytest.raises(Stop):
        train_cells(folder, tmp_path / "cut", cfg, progress=False, on_step=stop_at_45)
    assert not (tmp_path / "cut" / "model").exists()
    assert pd.read_csv(tmp_path / "cut" / "train_log.csv")["step"].tolist() == list(range(1, 46))
    resumed = train_cells(folder, tmp_path / "cut", cfg, progress=False)
    assert resumed.config["steps"] == STEPS
    for a, b in zip(jax.tree.leaves(nnx.state(full.net)), jax.tree.leaves(nnx.state(resumed.net))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The log holds every step once (rows 31-45 of the killed run were dropped), with the
    # uninterrupted run's losses.
    log, full_log = pd.read_csv(tmp_path / "cut" / "train_log.csv"), pd.read_csv(trained / "train_log.csv")
    assert log["step"].tolist() == list(range(1, STEPS + 1))
    pd.testing.assert_frame_equal(log.drop(columns="elapsed_s"), full_log.drop(columns="elapsed_s"))
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoints", "model", "request.json",
                                                                     "train_log.csv"]  # no temporary left
    # The checkpoint metadata is the ensemble's format, counting steps.
    from stimage_jax.training import CHECKPOINT_FORMAT

    meta = json.loads((tmp_path / "cut" / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
    assert (meta["format"], meta["unit"], meta["step"]) == (CHECKPOINT_FORMAT, "step", STEPS)
    assert meta["elapsed_s"] == pytest.approx(resumed.config["elapsed_s"])
    # Finished: rerunning returns the saved model without training
    again = train_cells(folder, tmp_path / "cut", cfg, progress=False, on_step=lambda *_: pytest.fail("trained"))
    assert again.config["steps"] == STEPS
    # A different request in the same workdir is refused
    with pytest.raises(StimageError, match="different cells run"):
        train_cells(folder, tmp_path / "cut", dataclasses.replace(cfg, lr=1e-3), progress=False)
    # A time budget stops training: the first step (with compilation) already exceeds 0.01 s
    short = train_cells(folder, tmp_path / "short", dataclasses.replace(cfg, steps=1000, minutes=0.0001),
                        progress=False)
    assert short.config["steps"] == 1
    # ... and a larger budget continues from its checkpoint, logging each step once.
    longer = train_cells(folder, tmp_path / "short", dataclasses.replace(cfg, steps=3), progress=False)
    assert longer.config["steps"] == 3
    assert pd.read_csv(tmp_path / "short" / "train_log.csv")["step"].tolist() == [1, 2, 3]


def test_log_of_a_killed_process_is_cut_back_to_its_checkpoint(tmp_path):
    from stimage_jax.cells.train import _trim_log

    log = tmp_path / "train_log.csv"
    log.write_bytes(b"step,loss\r\n1,0.5\r\n2,0.4\r\n3,0.3\r\n4,0.2\r\n5,0.")  # SIGKILL mid-row
    assert _trim_log(log, 3) is False  # keeps its header: appended to
    assert log.read_bytes() == b"step,loss\r\n1,0.5\r\n2,0.4\r\n3,0.3\r\n"
    assert _trim_log(log, 0) is True and _trim_log(tmp_path / "none.csv", 7) is True  # starts afresh


def test_windowed_prediction_stitches_exactly(trained, monkeypatch):
    # A per-pixel stand-in for the network: stitched windows must equal one whole-image pass.
    from stimage_jax.cells.train import CellModel

    def per_pixel(self, rgb):
        x = rgb.astype(np.float32) / 255.0
        return x[..., 0], x[..., 1:], np.repeat(x[..., :1], 5, axis=-1)

    monkeypatch.setattr(CellModel, "_run_padded", per_pixel)
    model = CellModel.load(trained)
    rgb = np.random.default_rng(0).integers(0, 256, (300, 230, 3), dtype=np.uint8)
    whole = model.predict_maps(rgb, window=320)
    tiled = model.predict_maps(rgb, window=96, margin=16)
    for a, b in zip(whole, tiled):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StimageError, match="multiple of 32"):
        model.predict_maps(rgb, window=100)
