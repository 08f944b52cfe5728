"""Cell training data: HV targets by hand, patches, type tables → instances, file layout,
paired dihedral augmentation, SIFT/RANSAC registration on a known affine."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from data_pipelines.cell_patches import (CELL_TYPES, CellPatches, assign_types, augment_pairs, dihedral,
                                         extract_patches, hv_targets, list_cell_tiles, load_cell_tile, nuclear_grey,
                                         patch_targets, read_instances, read_type_table, register_affine,
                                         warp_points, write_instances)
from data_pipelines.errors import StimageError


# --- HV targets ----------------------------------------------------------------------------------------

def test_hv_targets_by_hand():
    inst = np.zeros((6, 9), np.int32)
    inst[1, 2:7] = 4            # a horizontal bar: centre column 4, offsets −2..2
    inst[3:6, 0:3] = 2          # a 3×3 square, centre (1, 4)
    inst[4, 7] = 9              # a single pixel: offset 0
    hv = hv_targets(inst)
    assert hv.shape == (6, 9, 2) and hv.dtype == np.float32
    np.testing.assert_allclose(hv[1, 2:7, 0], [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_array_equal(hv[1, 2:7, 1], 0)  # one row: no vertical offset
    np.testing.assert_allclose(hv[3:6, 0:3, 0], [[-1, 0, 1]] * 3)
    np.testing.assert_allclose(hv[3:6, 0:3, 1], [[-1] * 3, [0] * 3, [1] * 3])
    assert hv[4, 7].tolist() == [0, 0]
    assert not hv[inst == 0].any()


def test_hv_targets_of_an_asymmetric_shape_and_flip_equivariance():
    # An L: pixels (r, c) = (0,0) (1,0) (2,0) (2,1) (2,2); centre of mass x = 3/5, y = 7/5.
    inst = np.zeros((4, 4), np.int32)
    for r, c in [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)]:
        inst[r, c] = 1
    hv = hv_targets(inst)
    dx = np.array([0, 0, 0, 1, 2]) - 0.6     # −0.6 ×3, 0.4, 1.4
    dy = np.array([0, 1, 2, 2, 2]) - 1.4     # −1.4, −0.4, 0.6 ×3
    ex = np.where(dx < 0, dx / 0.6, dx / 1.4)
    ey = np.where(dy < 0, dy / 1.4, dy / 0.6)
    got = np.array([hv[r, c] for r, c in [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)]])
    np.testing.assert_allclose(got[:, 0], ex, rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], ey, rtol=1e-6)
    rng = np.random.default_rng(0)
    big = np.zeros((40, 40), np.int32)
    for k in range(1, 8):
        r, c = rng.integers(0, 34, 2)
        big[r:r + rng.integers(2, 7), c:c + rng.integers(2, 7)] = k
    h = hv_targets(big)
    # Flipping the map left-right mirrors the targets and negates x; transposing swaps x and y.
    np.testing.assert_allclose(hv_targets(big[:, ::-1]), h[:, ::-1] * [-1, 1], atol=1e-6)
    np.testing.assert_allclose(hv_targets(big.T), h.transpose(1, 0, 2)[..., ::-1], atol=1e-6)
    for k in np.unique(big)[1:]:
        m = big == k
        if np.ptp(np.nonzero(m)[1]) > 0:
            assert h[m, 0].min() == pytest.approx(-1) and h[m, 0].max() == pytest.approx(1)
    npm, hvb = patch_targets(np.stack([big, big.T]))
    assert npm.dtype == np.uint8 and npm.shape == (2, 40, 40) and hvb.shape == (2, 40, 40, 2)
    np.testing.assert_array_equal(hvb[1], hv_targets(big.T))


# --- patches ------------------------------------------------------------------------------------------------

def _tile(h=300, w=280, n=30, seed=0):
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        r, c = rng.integers(0, h - 6), rng.integers(0, w - 6)
        inst[r:r + 5, c:c + 5] = k
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return rgb, inst


def test_extract_patches_covers_the_tile_and_drops_sparse_patches():
    rgb, inst = _tile()
    p = extract_patches(rgb, inst, size=128, stride=100, min_nuclei=1)
    # rows start at 0, 100, 172 (flush), columns at 0, 100, 152 (flush)
    assert {tuple(o) for o in p.origins} == {(r, c) for r in (0, 100, 172) for c in (0, 100, 152)}
    for img, lab, (r, c) in zip(p.images, p.instances, p.origins):
        np.testing.assert_array_equal(img, rgb[r:r + 128, c:c + 128])
        np.testing.assert_array_equal(lab, inst[r:r + 128, c:c + 128])
    assert (p.types == -1).all() and p.images.shape[1:] == (128, 128, 3)
    # min_nuclei: a patch keeps only if it holds that many distinct instances
    sparse = np.zeros_like(inst)
    sparse[10:14, 10:14] = 1               # top-left patch: one nucleus
    sparse[200:204, 200:204] = 2
    sparse[210:214, 210:214] = 3           # bottom-right: two
    q = extract_patches(rgb, sparse, size=128, stride=128, min_nuclei=2)
    assert len(q) >= 1 and all(len(np.unique(x)) - 1 >= 2 for x in q.instances)
    assert (0, 0) not in {tuple(o) for o in q.origins}
    # smaller than a patch: padded white, no nuclei there
    small = extract_patches(rgb[:50, :60], inst[:50, :60], size=64, stride=64, min_nuclei=0)
    assert small.images.shape == (1, 64, 64, 3) and (small.images[0, 50:] == 255).all()
    assert not small.instances[0, 50:].any()
    both = CellPatches.concat([p, q])
    assert len(both) == len(p) + len(q)
    with pytest.raises(StimageError, match="differ in size"):
        extract_patches(rgb, inst[:-1])


# --- cell types ----------------------------------------------------------------------------------------------

def test_type_table_maps_centroids_onto_instances(tmp_path):
    inst = np.zeros((20, 30), np.int32)
    inst[2:6, 2:6] = 1
    inst[10:15, 10:20] = 5
    inst[16:19, 25:29] = 8          # no centroid: unknown (−1)
    csv = tmp_path / "t.csv"
    pd.DataFrame({"x": [3.4, 12.0, 18.0, 15.2, 0.0], "y": [3.6, 11.0, 14.0, 12.0, 19.0],
                  "type": ["immune", "3", "Cancer epithelial", 2, "stromal"]}).to_csv(csv, index=False)
    tab = read_type_table(csv)
    np.testing.assert_array_equal(tab["type"], [1, 3, 3, 2, 2])
    ta = assign_types(inst, tab)
    assert ta.lut[1] == 1 and ta.lut[5] == 3 and ta.lut[8] == -1 and ta.lut[0] == 0
    assert (ta.matched, ta.on_background, ta.conflicts) == (4, 1, 1)  # instance 5: 3, 3, 2 → majority 3
    tm = ta.type_map(inst)
    assert tm.dtype == np.int16 and (tm[inst == 5] == 3).all() and (tm[inst == 0] == 0).all()
    # through an affine: table coordinates are twice the image's
    scaled = tab.assign(x=tab["x"] * 2, y=tab["y"] * 2)
    ta2 = assign_types(inst, scaled, matrix=np.array([[0.5, 0, 0], [0, 0.5, 0]]))
    np.testing.assert_array_equal(ta2.lut, ta.lut)
    with pytest.raises(StimageError, match="outside the 30×20 image") as e:
        assign_types(inst, pd.DataFrame({"x": [3.0, 31.0], "y": [3.0, 2.0], "type": [1, 1]}), where="t.csv")
    assert "\n" not in str(e.value) and "t.csv" in str(e.value)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"x": [1], "y": [1], "type": ["neutrophil"]}).to_csv(bad, index=False)
    with pytest.raises(StimageError, match="unknown cell type 'neutrophil'"):
        read_type_table(bad)
    pd.DataFrame({"x": [1], "y": [1], "kind": [1]}).to_csv(bad, index=False)
    with pytest.raises(StimageError, match="lacks column"):
        read_type_table(bad)
    pd.DataFrame({"x": [1], "y": [1], "type": [7]}).to_csv(bad, index=False)
    with pytest.raises(StimageError, match="outside 0..4"):
        read_type_table(bad)
    assert CELL_TYPES == ("background", "immune", "stromal", "cancer_epithelial", "endothelial")


def test_folder_layout_instance_maps_and_errors(tmp_path):
    rgb, inst = _tile(64, 80, n=6)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    write_instances(tmp_path / "a_instances.png", inst)
    pd.DataFrame({"x": [0.0], "y": [0.0], "type": [1]}).to_csv(tmp_path / "a_types.csv", index=False)
    cv2.imwrite(str(tmp_path / "b.png"), rgb[..., ::-1])
    np.save(tmp_path / "b_instances.npy", inst)
    files = list_cell_tiles(tmp_path)
    assert [f.image.name for f in files] == ["a.png", "b.png"]      # a_instances.png is not an image to segment
    assert files[0].types is not None and files[1].types is None
    t = load_cell_tile(files[0])
    np.testing.assert_array_equal(t.rgb, rgb)
    np.testing.assert_array_equal(t.instances, inst)
    assert t.types.shape == inst.shape and load_cell_tile(files[1]).types is None
    np.testing.assert_array_equal(read_instances(tmp_path / "b_instances.npy"), inst)
    with pytest.raises(StimageError, match="80×64"):
        read_instances(tmp_path / "a_instances.png", (60, 80, 3))
    cv2.imwrite(str(tmp_path / "c.png"), rgb[..., ::-1])
    with pytest.raises(StimageError, match="c.png has no annotation"):
        list_cell_tiles(tmp_path)
    (tmp_path / "c.xml").write_text("<Annotations><Annotation><Regions></Regions></Annotation></Annotations>")
    files = list_cell_tiles(tmp_path)
    with pytest.raises(StimageError, match="no <Region>"):
        load_cell_tile(files[2])
    with pytest.raises(StimageError, match="not found"):
        list_cell_tiles(tmp_path / "nope")
    with pytest.raises(StimageError, match="16-bit"):
        write_instances(tmp_path / "x.png", np.array([[70000]]))


@pytest.mark.real_data
def test_monuseg_folder_is_a_cell_folder(shared):
    from data_pipelines.monuseg import list_monuseg

    root = shared / "data" / "monuseg"
    files = list_cell_tiles(root / "train")
    assert [f.image for f in files] == [p for p, _ in list_monuseg(root, "train")]
    t = load_cell_tile(files[0])
    p = extract_patches(t.rgb, t.instances, size=256, stride=256)
    assert len(p) == 16 and p.images.shape == (16, 256, 256, 3)     # 1000² → starts 0, 256, 512, 744


# --- augmentation ------------------------------------------------------------------------------------------------

def test_dihedral_pairs_stay_aligned_and_hook_touches_images_only():
    rng = np.random.default_rng(0)
    inst = rng.integers(0, 50, (6, 16, 16)).astype(np.int32)
    types = (inst % 5).astype(np.int16)
    # The image encodes each pixel's label: R = instance id, G = type, B = constant
    images = np.stack([inst, types, np.full_like(inst, 7)], -1).astype(np.uint8)
    seen = set()
    for seed in range(4):
        out_i, out_l, out_t = augment_pairs(np.random.default_rng(seed), images, inst, types)
        np.testing.assert_array_equal(out_i[..., 0], out_l)
        np.testing.assert_array_equal(out_i[..., 1], out_t)
        for a, b in zip(out_l, inst):
            seen.update(t for t in range(8) if np.array_equal(dihedral(b, t), a))
    assert seen == set(range(8))
    hooked, lab, _ = augment_pairs(rng, images, inst, types, hook=lambda x: 255 - x, geometric=False)
    np.testing.assert_array_equal(hooked, 255 - images)
    np.testing.assert_array_equal(lab, inst)
    with pytest.raises(StimageError, match="changed the image batch shape"):
        augment_pairs(rng, images, inst, types, hook=lambda x: x[:1])


# --- registration -----------------------------------------------------------------------------------------------

def _texture(size=400, seed=0):
    """Blobs of random size and brightness on smooth noise: plenty of SIFT keypoints."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.float32), (0, 0), 3)
    for _ in range(150):
        c = tuple(int(v) for v in rng.integers(10, size - 10, 2))
        cv2.circle(img, c, int(rng.integers(3, 9)), float(rng.uniform(0, 255)), -1)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


@pytest.mark.parametrize("full", [False, True])
def test_register_affine_recovers_a_known_transform(full):
    fixed = _texture()
    a = np.deg2rad(12.0)
    s = 1.08
    m_true = np.array([[s * np.cos(a), -s * np.sin(a), 25.0], [s * np.sin(a), s * np.cos(a), -18.0]])
    if full:
        m_true[0, 1] += 0.05  # a shear: only the full affine can fit it
    inv = cv2.invertAffineTransform(m_true)
    moving = cv2.warpAffine(fixed, inv, (360, 360), flags=cv2.INTER_LINEAR)  # moving px → fixed px is m_true
    m = register_affine(moving.astype(np.uint16) * 200, fixed, full_affine=full)  # uint16 like DAPI
    grid = np.stack(np.meshgrid(np.linspace(40, 320, 8), np.linspace(40, 320, 8)), -1).reshape(-1, 2)
    err = np.linalg.norm(warp_points(m, grid) - warp_points(m_true, grid), axis=1)
    assert err.max() < 1.0


def test_register_affine_refuses_unrelated_or_flat_images():
    with pytest.raises(StimageError, match="keypoints|matches|RANSAC"):
        register_affine(np.zeros((100, 100), np.uint8), _texture(100))
    with pytest.raises(StimageError, match="2-D"):
        register_affine(np.zeros((10, 10, 3)), np.zeros((10, 10)))
    with pytest.raises(StimageError, match="2×3"):
        warp_points(np.eye(3), np.zeros((1, 2)))


def test_nuclear_grey_makes_haematoxylin_bright():
    rgb = np.full((20, 20, 3), (235, 190, 215), np.uint8)   # eosin-pink background
    rgb[5:10, 5:10] = (70, 40, 130)                           # haematoxylin-purple nucleus
    g = nuclear_grey(rgb)
    assert g.dtype == np.uint8 and g[7, 7] > 200 and g[15, 15] < 60
