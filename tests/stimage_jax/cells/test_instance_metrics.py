"""HoVer-Net instance metrics on hand-made maps (scores worked out by hand) and against a
slow per-instance reference on random maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from data_pipelines.errors import StimageError
from stimage_jax.cells.instance_metrics import (aji, aji_plus, centroids, dice, f1_detection, instance_stats,
                                                pair_coordinates, panoptic_quality, per_class_f1, remap_label)


def blank(h=20, w=30):
    return np.zeros((h, w), np.int32)


def two_nuclei():
    """True map: nucleus 1 = 10×10 (100 px) at rows 2-11, cols 2-11; nucleus 2 = 5×5 (25 px)."""
    t = blank()
    t[2:12, 2:12] = 1
    t[14:19, 20:25] = 2
    return t


def test_perfect_match_is_one_everywhere_and_ids_do_not_matter():
    t = two_nuclei()
    p = np.where(t == 1, 70, np.where(t == 2, 3, 0))  # other, non-contiguous ids
    s = instance_stats(p, t)
    for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq", "f1_detection"):
        assert s[k] == 1.0, k
    assert (s["tp"], s["fp"], s["fn"], s["n_pred"], s["n_true"]) == (2, 0, 0, 2, 2)


def test_split_nucleus():
    # Predicted: nucleus 1 cut into a 10×6 (60 px) and a 10×4 (40 px) piece; nucleus 2 exact.
    t = two_nuclei()
    p = t.copy()
    p[2:12, 8:12] = 3
    # AJI: nucleus 1 pairs with the 60-px piece (IoU 0.6 > 0.4); the 40-px piece is unpaired.
    #   (60 + 25) / (100 + 25 + 40) = 85 / 165.  AJI+: the same pairs.
    # PQ: pairs (1, 60-px piece) IoU 0.6 and (2, 2) IoU 1: TP 2, FP 1, FN 0.
    #   DQ = 2 / (2 + 0.5) = 0.8, SQ = (0.6 + 1) / 2 = 0.8, PQ = 0.64.
    assert aji(p, t) == pytest.approx(85 / 165)
    assert aji_plus(p, t) == pytest.approx(85 / 165)
    q = panoptic_quality(p, t)
    assert (q["tp"], q["fp"], q["fn"]) == (1 + 1, 1, 0)
    assert (q["dq"], q["sq"], q["pq"]) == pytest.approx((0.8, 0.8, 0.64))
    assert dice(p, t) == 1.0  # same foreground


def test_split_in_half_has_no_pq_pair():
    # IoU exactly 0.5 is not a match (HoVer-Net: IoU > 0.5); AJI takes the first of the tie.
    t = blank()
    t[0:10, 0:10] = 1
    p = t.copy()
    p[0:10, 5:10] = 2
    q = panoptic_quality(p, t)
    assert (q["tp"], q["fp"], q["fn"], q["dq"], q["sq"], q["pq"]) == (0, 2, 1, 0.0, 0.0, 0.0)
    assert aji(p, t) == pytest.approx(50 / (100 + 50))


def test_two_merged_into_one():
    # True: 10×6 (60 px) and 10×4 (40 px) side by side; predicted: one 10×10 nucleus over both.
    t = blank()
    t[2:12, 2:8] = 1
    t[2:12, 8:12] = 2
    p = (t > 0).astype(np.int32)
    # AJI (a prediction may serve several true nuclei): (60 + 40) / (100 + 100) = 0.5.
    # AJI+ (one-to-one): (1, p) IoU 0.6 paired; nucleus 2 unpaired: 60 / (100 + 40) = 3/7.
    # PQ: TP 1 (IoU 0.6), FN 1: DQ = 1 / 1.5 = 2/3, SQ = 0.6, PQ = 0.4.
    assert aji(p, t) == pytest.approx(0.5)
    assert aji_plus(p, t) == pytest.approx(3 / 7)
    q = panoptic_quality(p, t)
    assert (q["tp"], q["fp"], q["fn"]) == (1, 0, 1)
    assert (q["dq"], q["sq"], q["pq"]) == pytest.approx((2 / 3, 0.6, 0.4))


def test_missed_nucleus():
    t = two_nuclei()
    p = np.where(t == 1, 1, 0)  # nucleus 2 (25 px) missed
    s = instance_stats(p, t)
    # AJI = 100 / (100 + 25); DQ = 1 / (1 + 0.5); Dice = 2·100 / (100 + 125); F1 = 2 / (2 + 1).
    assert s["aji"] == pytest.approx(100 / 125)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)
    assert (s["dq"], s["sq"], s["pq"]) == pytest.approx((2 / 3, 1.0, 2 / 3))
    assert s["dice"] == pytest.approx(200 / 225)
    assert s["f1_detection"] == pytest.approx(2 / 3)


def test_false_positive():
    t = two_nuclei()
    p = t.copy()
    p[15:18, 2:5] = 9  # a 9-px blob nowhere near a true nucleus
    s = instance_stats(p, t)
    # AJI = 125 / (125 + 9); DQ = 2 / (2 + 0.5); Dice = 2·125 / (134 + 125); F1 = 4 / (4 + 1).
    assert s["aji"] == pytest.approx(125 / 134)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 0)
    assert (s["dq"], s["sq"], s["pq"]) == pytest.approx((0.8, 1.0, 0.8))
    assert s["dice"] == pytest.approx(250 / 259)
    assert s["f1_detection"] == pytest.approx(0.8)


def test_empty_maps():
    t = two_nuclei()
    s = instance_stats(blank(), blank())
    assert all(np.isnan(s[k]) for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq", "f1_detection"))
    assert (s["tp"], s["fp"], s["fn"]) == (0, 0, 0)
    s = instance_stats(blank(), t)  # nothing predicted: every score 0
    assert (s["dice"], s["aji"], s["aji_plus"], s["dq"], s["pq"], s["f1_detection"]) == (0, 0, 0, 0, 0, 0)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 0, 2)
    s = instance_stats(t, blank())
    assert (s["aji"], s["pq"], s["fp"], s["f1_detection"]) == (0, 0, 2, 0)


def test_bad_maps():
    with pytest.raises(StimageError, match="differ in shape"):
        aji(blank(20, 30), blank(20, 31))
    with pytest.raises(StimageError, match="negative ids"):
        panoptic_quality(blank() - 1, blank())
    with pytest.raises(StimageError, match="integer ids"):
        dice(blank() + 0.5, blank())
    with pytest.raises(StimageError, match="2-D"):
        aji(np.zeros((2, 3, 4), int), np.zeros((2, 3, 4), int))
    with pytest.raises(StimageError, match="IoU threshold"):
        panoptic_quality(blank(), blank(), iou_thresh=1.0)
    # A float map holding integer ids, and a boolean mask, are fine.
    assert dice(two_nuclei().astype(float), two_nuclei() > 0) == 1.0


def test_remap_label_and_centroids():
    x = np.array([[0, 5, 5], [9, 0, 5]])
    np.testing.assert_array_equal(remap_label(x), [[0, 1, 1], [2, 0, 1]])
    huge = np.array([[0, 2 ** 40], [7, 2 ** 40]])  # ids too large for a lookup table
    np.testing.assert_array_equal(remap_label(huge), [[0, 2], [1, 2]])
    np.testing.assert_array_equal(remap_label(np.array([[3, 3], [4, 3]])), [[1, 1], [2, 1]])
    assert remap_label(x).dtype == np.int32
    c = centroids(two_nuclei())
    np.testing.assert_allclose(c, [[6.5, 6.5], [22.0, 16.0]])  # (x, y): 2..11 → 6.5; cols 20..24 → 22
    assert centroids(blank()).shape == (0, 2)


def test_pair_coordinates_and_f1():
    true = np.array([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    pred = np.array([[1.0, 0.0], [10.0, 13.0], [100.0, 100.0]])
    pairs, ut, up = pair_coordinates(true, pred, radius=12)
    assert pairs.tolist() == [[0, 0]] and ut.tolist() == [1, 2] and up.tolist() == [1, 2]
    # TP 1, FP 2, FN 2: F1 = 2 / (2 + 2 + 2).
    assert f1_detection(pred, true, radius=12) == pytest.approx(1 / 3)
    assert f1_detection(pred, true, radius=13) == pytest.approx(2 * 2 / (4 + 1 + 1))
    assert f1_detection(np.zeros((0, 2)), true) == 0.0
    assert np.isnan(f1_detection(np.zeros((0, 2)), np.zeros((0, 2))))
    with pytest.raises(StimageError, match=r"\(N, 2\)"):
        f1_detection(np.zeros((3, 3)), true)


def test_per_class_f1():
    # True: t0, t1 type 1; t2 type 2; t3, t4 type 2 far from any prediction.
    # Pred: near t0 type 1; near t1 type 2 (wrong); near t2 type 2; q3 type 1 far away.
    true_xy = np.array([[0, 0], [100, 0], [200, 0], [500, 500], [600, 600]], float)
    true_t = np.array([1, 1, 2, 2, 2])
    pred_xy = np.array([[1, 0], [101, 0], [201, 0], [900, 0]], float)
    pred_t = np.array([1, 2, 2, 1])
    r = per_class_f1(pred_xy, pred_t, true_xy, true_t)
    # Paired (true, pred) types: (1,1), (1,2), (2,2); unpaired pred: [1]; unpaired true: [2, 2].
    # Class 1: TP 1, FP 0, FN 1, FP_d 1, FN_d 0 → 2 / (2 + 0 + 2 + 1 + 0) = 2/5.
    # Class 2: TP 1, FP 1, FN 0, FP_d 0, FN_d 2 → 2 / (2 + 2 + 0 + 0 + 2) = 1/3.
    assert r["per_class"] == pytest.approx({1: 2 / 5, 2: 1 / 3})
    assert r["f1_detection"] == pytest.approx(6 / (6 + 1 + 2))
    assert r["accuracy"] == pytest.approx(2 / 3)
    # Pooled with a second image holding one correct type-1 pair: class 1 → 4 / (4 + 2 + 1).
    r2 = per_class_f1([pred_xy, np.array([[5.0, 5.0]])], [pred_t, np.array([1])],
                      [true_xy, np.array([[5.0, 6.0]])], [true_t, np.array([1])], classes=[1, 3])
    assert r2["per_class"][1] == pytest.approx(4 / 7)
    assert np.isnan(r2["per_class"][3])  # no nucleus of class 3 anywhere
    with pytest.raises(StimageError, match="types"):
        per_class_f1(pred_xy, pred_t[:2], true_xy, true_t)


# --- slow reference: per-instance masks and explicit loops, as the definitions read ---------
def ref_scores(pred, true):
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [i for i in np.unique(pred) if i]
    tm = {i: true == i for i in t_ids}
    pm = {j: pred == j for j in p_ids}
    inter = np.array([[np.sum(tm[i] & pm[j]) for j in p_ids] for i in t_ids], float).reshape(len(t_ids), -1)
    union = np.array([[np.sum(tm[i] | pm[j]) for j in p_ids] for i in t_ids], float).reshape(len(t_ids), -1)
    iou = inter / union
    # AJI (Kumar): best prediction per true nucleus, predictions reusable.
    I = U = 0.0
    used = set()
    for a, i in enumerate(t_ids):
        b = int(np.argmax(iou[a]))
        if iou[a, b] > 0:
            I += inter[a, b]
            U += union[a, b]
            used.add(b)
        else:
            U += tm[i].sum()
    for b, j in enumerate(p_ids):
        if b not in used:
            U += pm[j].sum()
    aji_ref = I / U
    # AJI+: Hungarian one-to-one.
    rows, cols = linear_sum_assignment(-iou)
    I = U = 0.0
    pt, pp = set(), set()
    for a, b in zip(rows, cols):
        if iou[a, b] > 0:
            I += inter[a, b]
            U += union[a, b]
            pt.add(a), pp.add(b)
    U += sum(tm[i].sum() for a, i in enumerate(t_ids) if a not in pt)
    U += sum(pm[j].sum() for b, j in enumerate(p_ids) if b not in pp)
    ajip_ref = I / U
    # PQ at 0.5: every pair over the threshold.
    matched = [(a, b) for a in range(len(t_ids)) for b in range(len(p_ids)) if iou[a, b] > 0.5]
    tp = len(matched)
    fp, fn = len(p_ids) - tp, len(t_ids) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum(iou[a, b] for a, b in matched) / tp if tp else 0.0
    d = 2 * np.sum((pred > 0) & (true > 0)) / (np.sum(pred > 0) + np.sum(true > 0))
    return {"aji": aji_ref, "aji_plus": ajip_ref, "tp": tp, "fp": fp, "fn": fn, "dq": dq, "sq": sq,
            "pq": dq * sq, "dice": d}


def random_pair(rng, size=48, n=12):
    """Random discs (later wins) as truth; prediction = truth shifted, with merges, splits, drops."""
    yy, xx = np.mgrid[:size, :size]
    true = np.zeros((size, size), np.int64)
    ids = rng.choice(1000, n, replace=False) + 1  # non-contiguous ids
    for k in ids:
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 7)
        true[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    pred = np.roll(true, (rng.integers(-1, 2), rng.integers(-1, 2)), axis=(0, 1)).copy()
    present = [i for i in np.unique(pred) if i]
    if len(present) >= 2:
        a, b = rng.choice(present, 2, replace=False)
        pred[pred == b] = a  # merge
    for k in [i for i in np.unique(pred) if i][:2]:
        m = (pred == k) & (xx < np.median(xx[pred == k]))
        pred[m] = 5000 + k  # split
    drop = rng.choice([i for i in np.unique(pred) if i])
    pred[pred == drop] = 0
    pred[rng.integers(0, size - 4):, :3][:3] = 7777  # a false positive strip
    return pred, true


@pytest.mark.parametrize("seed", range(8))
def test_matches_slow_reference_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    pred, true = random_pair(rng)
    ref = ref_scores(pred, true)
    s = instance_stats(pred, true)
    for k, v in ref.items():
        assert s[k] == pytest.approx(v, abs=1e-12), k
    assert 0 < s["aji"] < 1 and 0 < s["pq"] < 1  # the perturbations really cost something
    # Symmetry of the pair table: swapping roles swaps FP and FN, keeps PQ and Dice.
    sw = instance_stats(true, pred)
    assert (sw["fp"], sw["fn"], sw["pq"], sw["dice"]) == (s["fn"], s["fp"], pytest.approx(s["pq"]), s["dice"])


def test_low_threshold_uses_unique_pairs():
    # At IoU > 0.3 one prediction (10×10) overlaps two true halves at 0.5 each: only one pairs.
    t = blank()
    t[0:10, 0:5], t[0:10, 5:10] = 1, 2
    p = (t > 0).astype(int)
    q = panoptic_quality(p, t, iou_thresh=0.3)
    assert (q["tp"], q["fp"], q["fn"]) == (1, 0, 1)
    assert (q["dq"], q["sq"]) == pytest.approx((2 / 3, 0.5))
