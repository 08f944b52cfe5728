"""``stimage segment-nuclei`` (issue 7's contract, issue 13 item 12) on a real MoNuSeg tile."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.cell_patches import read_instances
from data_pipelines.tiles import load_image
from stimage_jax.cells.instance_metrics import instance_stats
from stimage_jax.cells.nuclei import segment_nuclei
from stimage_jax.cli import main


@pytest.mark.real_data
def test_segment_nuclei_writes_the_library_instance_map(shared, tmp_path, capsys):
    tile = sorted((shared / "data" / "monuseg" / "test").glob("*.png"))[0]
    crop = tmp_path / "crop.png"
    import cv2

    cv2.imwrite(str(crop), cv2.cvtColor(load_image(tile)[:400, :400], cv2.COLOR_RGB2BGR))
    out = tmp_path / "inst.png"
    before = crop.read_bytes()
    assert main(["segment-nuclei", "--image", str(crop), "--out", str(out), "--mpp", "0.25"]) == 0
    got = read_instances(out)
    want = segment_nuclei(load_image(crop), mpp=0.25)
    assert got.ndim == 2 and got.max() > 20  # a 100 µm square of tissue holds dozens of nuclei
    np.testing.assert_array_equal(got, want)
    assert crop.read_bytes() == before
    # Against the pathologists' outlines of the same crop: a real segmentation, not noise.
    truth = read_instances(tile.with_suffix(".xml"), load_image(tile).shape[:2])[:400, :400]
    assert instance_stats(got, truth)["dice"] > 0.6
    # Refusals: existing output, output equal to the input, wrong suffix.
    for args, msg in ([["--out", str(out)], "already exists"], [["--out", str(crop), "--overwrite"], "also an input"],
                      [["--out", str(tmp_path / "x.jpg")], "must end in .png"]):
        capsys.readouterr()
        assert main(["segment-nuclei", "--image", str(crop), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert crop.read_bytes() == before
