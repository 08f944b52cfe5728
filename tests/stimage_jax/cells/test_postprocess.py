"""HoVer-Net post-processing: perfect NP/HV targets give back the instances (touching ones
split by HV, not by the mask), majority type calls, entropy, bad input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from data_pipelines.cell_patches import hv_targets
from data_pipelines.errors import StimageError
from stimage_jax.cells.instance_metrics import aji, instance_stats
from stimage_jax.cells.postprocess import PostprocessParams, instances_from_np_hv, nucleus_types, type_entropy


def touching_nuclei(seed: int, size: int = 256, n: int = 60) -> np.ndarray:
    """Ellipses whose centres may come closer than the sum of their radii: many touch."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(5000):
        c, r = rng.uniform(12, size - 12, 2), rng.uniform(6, 11)
        if all(np.hypot(*(c - c2)) >= 0.85 * (r + r2) for c2, r2 in placed):
            placed.append((c, r))
            m = np.zeros((size, size), np.uint8)
            cv2.ellipse(m, (int(round(c[0])), int(round(c[1]))), (int(r), int(r * rng.uniform(0.7, 1.0))),
                        rng.uniform(0, 180), 0, 360, 1, -1)
            inst[m > 0] = len(placed)
        if len(placed) == n:
            break
    return inst


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perfect_targets_give_back_the_instances(seed):
    inst = touching_nuclei(seed)
    fg = inst > 0
    # The test means something: the mask alone merges touching nuclei into fewer components.
    n_cc = ndi.label(fg)[1]
    assert n_cc < int(inst.max()) - 5
    assert aji(ndi.label(fg)[0], inst) < 0.9
    pred = instances_from_np_hv(fg.astype(np.float32), hv_targets(inst))
    s = instance_stats(pred, inst)
    assert s["aji"] > 0.95 and s["pq"] > 0.95 and s["n_pred"] == s["n_true"]
    assert pred.dtype == np.int32 and set(np.unique(pred)) == set(range(int(pred.max()) + 1))


def test_soft_probabilities_and_noisy_hv_still_split(rng):
    inst = touching_nuclei(3)
    p = np.where(inst > 0, 0.8, 0.2).astype(np.float32) + rng.normal(0, 0.05, inst.shape).astype(np.float32)
    hv = hv_targets(inst) + rng.normal(0, 0.05, (*inst.shape, 2)).astype(np.float32)
    pred = instances_from_np_hv(np.clip(p, 0, 1), np.clip(hv, -1, 1))
    assert aji(pred, inst) > 0.85


@pytest.mark.real_data
def test_perfect_targets_of_a_monuseg_tile(shared):
    from data_pipelines.monuseg import list_monuseg, load_monuseg_pair

    image, xml = list_monuseg(shared / "data" / "monuseg", "test")[0]
    _, inst = load_monuseg_pair(image, xml)
    pred = instances_from_np_hv((inst > 0).astype(np.float32), hv_targets(inst))
    assert aji(pred, inst) > 0.99


def test_empty_and_bad_input():
    z = np.zeros((32, 32), np.float32)
    assert not instances_from_np_hv(z, np.zeros((32, 32, 2))).any()
    # Specks below min_size are not nuclei
    speck = z.copy()
    speck[5:7, 5:7] = 1
    assert not instances_from_np_hv(speck, np.zeros((32, 32, 2)), PostprocessParams(min_size=10)).any()
    with pytest.raises(StimageError, match="HV"):
        instances_from_np_hv(z, np.zeros((32, 31, 2)))
    with pytest.raises(StimageError, match="NaN"):
        instances_from_np_hv(np.full((4, 4), np.nan), np.zeros((4, 4, 2)))
    with pytest.raises(StimageError, match="ksize"):
        instances_from_np_hv(z, np.zeros((32, 32, 2)), PostprocessParams(ksize=4))


def test_nucleus_types_majority_probabilities_and_background_rule():
    inst = np.zeros((4, 10), np.int32)
    inst[:, 0:5] = 7          # 20 px
    inst[:, 5:8] = 9          # 12 px
    inst[:, 8:10] = 3         # 8 px
    prob = np.zeros((4, 10, 4))
    prob[..., 0] = 1.0
    # instance 7: 12 px class 2, 8 px class 1 → type 2, 60 % of its pixels
    prob[:, 0:3, :] = [0.1, 0.2, 0.6, 0.1]
    prob[:, 3:5, :] = [0.1, 0.5, 0.3, 0.1]
    # instance 9: mostly background argmax, 4 px class 3 → type 3 (HoVer-Net's rule)
    prob[:, 5:7, :] = [0.7, 0.1, 0.1, 0.1]
    prob[0:2, 7, :] = [0.2, 0.1, 0.1, 0.6]
    prob[2:4, 7, :] = [0.2, 0.1, 0.1, 0.6]
    # instance 3: background only → 0
    t = nucleus_types(inst, prob)
    np.testing.assert_array_equal(t.ids, [3, 7, 9])
    np.testing.assert_array_equal(t.types, [0, 2, 3])
    np.testing.assert_allclose(t.type_prob, [1.0, 12 / 20, 4 / 12])
    np.testing.assert_array_equal(t.area, [8, 20, 12])
    expect = (12 * np.array([0.1, 0.2, 0.6, 0.1]) + 8 * np.array([0.1, 0.5, 0.3, 0.1])) / 20
    np.testing.assert_allclose(t.mean_probs[1], expect)
    np.testing.assert_allclose(t.mean_probs.sum(1), 1.0)
    empty = nucleus_types(np.zeros((3, 3), np.int32), np.full((3, 3, 2), 0.5))
    assert len(empty.ids) == 0 and empty.mean_probs.shape == (0, 2)
    with pytest.raises(StimageError):
        nucleus_types(inst, prob[:3])


def test_type_entropy():
    p = np.zeros((2, 2, 4))
    p[0, 0] = 0.25
    p[0, 1] = [1, 0, 0, 0]
    p[1, 0] = [0.5, 0.5, 0, 0]
    p[1, 1] = [0.7, 0.1, 0.1, 0.1]
    e = type_entropy(p)
    expect = [[np.log(4), 0.0], [np.log(2), -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1))]]
    np.testing.assert_allclose(e, expect, rtol=1e-6)
    assert e.dtype == np.float32
    with pytest.raises(StimageError):
        type_entropy(p[0])
