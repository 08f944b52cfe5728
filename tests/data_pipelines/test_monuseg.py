"""MoNuSeg XML → instance map: hand-written polygons with known pixels, errors, one real tile."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from data_pipelines.errors import StimageError
from data_pipelines.monuseg import (list_monuseg, load_monuseg_pair, monuseg_mpp, read_monuseg_polygons,
                                    read_monuseg_xml)


def write_xml(path, polygons, mpp="0.25"):
    """An ImageScope-style XML: one Region per polygon of (x, y) vertices."""
    regions = "".join(
        f'<Region Id="{i}"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in poly)
        + "</Vertices></Region>" for i, poly in enumerate(polygons, start=1))
    mpp_attr = f' MicronsPerPixel="{mpp}"' if mpp is not None else ""
    path.write_text(f'<Annotations{mpp_attr}><Annotation Id="1"><Regions>'
                    f'<RegionAttributeHeaders/>{regions}</Regions></Annotation></Annotations>')
    return path


def square(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_overlap_later_region_wins(tmp_path):
    # Region 1: cols/rows 2..5 (16 px, outline included); region 2: 4..7 drawn over it.
    xml = write_xml(tmp_path / "a.xml", [square(2, 2, 5, 5), square(4, 4, 7, 7)])
    m = read_monuseg_xml(xml, (10, 12))
    expected = np.zeros((10, 12), np.int32)
    expected[2:6, 2:6] = 1
    expected[4:8, 4:8] = 2
    assert m.dtype == np.int32 and m.shape == (10, 12)
    np.testing.assert_array_equal(m, expected)
    assert np.bincount(m.ravel()).tolist() == [120 - 28, 12, 16]


def test_vertices_rounded_and_x_is_column(tmp_path):
    # (2.4, 0.6)..(3.6, 4.4) rounds to cols 2..4, rows 1..4; a (3, H, W)-style shape is accepted.
    xml = write_xml(tmp_path / "b.xml", [[(2.4, 0.6), (3.6, 0.6), (3.6, 4.4), (2.4, 4.4)]])
    m = read_monuseg_xml(xml, (6, 8, 3))
    assert m.shape == (6, 8)
    rows, cols = np.nonzero(m)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (1, 4, 2, 4)
    assert m.sum() == 12


def test_wholly_covered_region_keeps_its_id_absent(tmp_path):
    xml = write_xml(tmp_path / "c.xml", [square(3, 3, 4, 4), square(1, 1, 6, 6), square(8, 1, 9, 2)])
    m = read_monuseg_xml(xml, (10, 10))
    assert sorted(np.unique(m).tolist()) == [0, 2, 3]  # id 1 drawn over by 2; id 3 stays 3
    assert (m == 2).sum() == 36 and (m == 3).sum() == 4


def test_polygons_and_mpp(tmp_path):
    xml = write_xml(tmp_path / "d.xml", [square(0, 0, 1, 1), [(5, 5), (6.5, 5.5), (5, 7)]], mpp="0.2527")
    polys = read_monuseg_polygons(xml)
    assert [p.shape for p in polys] == [(4, 2), (3, 2)]
    np.testing.assert_allclose(polys[1][1], [6.5, 5.5])
    assert monuseg_mpp(xml) == pytest.approx(0.2527)
    assert monuseg_mpp(write_xml(tmp_path / "e.xml", [square(0, 0, 1, 1)], mpp=None)) is None
    assert monuseg_mpp(write_xml(tmp_path / "f.xml", [square(0, 0, 1, 1)], mpp="abc")) is None


def test_border_clicks_are_clipped(tmp_path):
    # Annotators click a few px past the border: the polygon is kept and clipped.
    xml = write_xml(tmp_path / "g.xml", [square(-2, -2, 2, 2)])
    m = read_monuseg_xml(xml, (5, 5))
    assert (m == 1).sum() == 9


def one_line_error(match: str):
    return pytest.raises(StimageError, match=match)


def test_bad_input_errors(tmp_path):
    empty = tmp_path / "empty.xml"
    empty.write_text('<Annotations><Annotation><Regions/></Annotation></Annotations>')
    with one_line_error("no <Region> polygons") as e:
        read_monuseg_xml(empty, (10, 10))
    assert "\n" not in str(e.value)
    garbage = tmp_path / "garbage.xml"
    garbage.write_text("<Annotations><Region>not closed")
    with one_line_error("not readable XML") as e:
        read_monuseg_xml(garbage, (10, 10))
    assert "\n" not in str(e.value)
    with one_line_error("not found"):
        read_monuseg_xml(tmp_path / "missing.xml", (10, 10))
    big = write_xml(tmp_path / "big.xml", [square(900, 900, 950, 950)])
    with one_line_error("does not fit the 100×100 image"):
        read_monuseg_xml(big, (100, 100))
    no_vertex = tmp_path / "nv.xml"
    no_vertex.write_text('<Annotations><Region Id="1"><Vertices/></Region></Annotations>')
    with one_line_error("Region 1 has no Vertex"):
        read_monuseg_xml(no_vertex, (10, 10))
    bad_vertex = tmp_path / "bv.xml"
    bad_vertex.write_text('<Annotations><Region Id="1"><Vertices><Vertex X="a" Y="1"/></Vertices></Region>'
                          '</Annotations>')
    with one_line_error("without numeric X and Y"):
        read_monuseg_xml(bad_vertex, (10, 10))
    with one_line_error("is not"):
        read_monuseg_xml(big, (0, 10))


def test_list_and_load_pair(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0] = 200  # red in RGB: checks the BGR → RGB conversion
    for name in ("b", "a"):
        cv2.imwrite(str(train / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        write_xml(train / f"{name}.xml", [square(1, 1, 3, 3)])
    pairs = list_monuseg(tmp_path, "train")
    assert [(i.name, x.name) for i, x in pairs] == [("a.png", "a.xml"), ("b.png", "b.xml")]
    rgb, inst = load_monuseg_pair(*pairs[0])
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8 and rgb[0, 0].tolist() == [200, 0, 0]
    assert inst.shape == (20, 30) and (inst == 1).sum() == 9
    cv2.imwrite(str(train / "c.png"), img)
    with one_line_error("has no annotation c.xml"):
        list_monuseg(tmp_path, "train")
    with one_line_error("not found"):
        list_monuseg(tmp_path, "test")
    with one_line_error("unknown"):
        list_monuseg(tmp_path, "val")


@pytest.mark.real_data
def test_real_monuseg_tile(shared):
    root = shared / "data" / "monuseg"
    pairs = list_monuseg(root, "test")
    assert len(pairs) == 7 and len(list_monuseg(root, "train")) == 13
    image, xml = pairs[0]
    assert image.stem == "TCGA-2Z-A9J9-01A-01-TS1"
    rgb, inst = load_monuseg_pair(image, xml)
    regions = list(ET.parse(xml).getroot().iter("Region"))
    assert rgb.shape == (1000, 1000, 3) and inst.shape == (1000, 1000)
    ids = np.unique(inst)[1:]
    assert len(regions) == 575 and ids.tolist() == list(range(1, 576))  # every nucleus visible
    area = np.bincount(inst.ravel())[1:]
    mpp = monuseg_mpp(xml)
    assert mpp == pytest.approx(0.2527)
    # Nuclei are ~5-10 µm across: median area 10-100 µm²; 0.2-0.5 of the tile is nuclei.
    assert 10 < np.median(area) * mpp ** 2 < 100
    assert 0.1 < (inst > 0).mean() < 0.5
    # ImageScope's own per-Region "Area" (px², inside the outline) vs ours (outline included).
    ratio = area / np.array([float(r.get("Area")) for r in regions])
    assert 1.0 < np.median(ratio) < 1.3
