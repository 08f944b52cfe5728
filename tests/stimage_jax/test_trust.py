"""Issue 13 at the command line: a locked workdir, a slide's output set checked before any
file is written, an output that is an input, Visium sample ids, argument types."""

from __future__ import annotations

import pytest

from data_pipelines.io import workdir_lock
from stimage_jax.cli import main

TINY = ["--backbone", "tiny", "--tile-px", "32", "--max-epochs", "2", "--genes", "A,B,C"]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stimage: error:") and "Traceback" not in err[0], err
    return err[0]


def test_second_process_on_a_locked_workdir_is_refused(synthetic_study, tmp_path, capsys):
    wd = tmp_path / "wd"
    args = ["train", "--quiet", "--data", *map(str, synthetic_study[:2]), "--workdir", str(wd), *TINY]
    with workdir_lock(wd):  # another run holds it (flock: a second open file description conflicts)
        assert main(args) == 2
        assert "is in use by another stimage process" in _one_error(capsys)
        assert not (wd / "request.json").exists() and not (wd / "model").exists()
    assert main(args) == 0  # released: the same command runs


def test_slide_outputs_are_all_checked_before_any_is_written(synthetic_study, make_slide, tmp_path, capsys):
    wd = tmp_path / "wd"
    assert main(["train", "--quiet", "--data", *map(str, synthetic_study[:2]), "--workdir", str(wd), *TINY,
                 "--min-coverage", "0"]) == 0
    slide = tmp_path / "s.tif"
    make_slide(slide, mpp=1.0)
    (tmp_path / "p_B.png").write_bytes(b"keep me")  # the second heatmap already exists
    capsys.readouterr()
    assert main(["predict", "--model", str(wd), "--slide", str(slide), "--genes", "A,B",
                 "--out", str(tmp_path / "p.h5ad")]) == 2
    assert "p_B.png already exists" in _one_error(capsys)
    assert not (tmp_path / "p.h5ad").exists() and not (tmp_path / "p_A.png").exists()
    assert (tmp_path / "p_B.png").read_bytes() == b"keep me"
    # --out equal to an input is refused even with --overwrite, and the input is untouched
    before = synthetic_study[2].read_bytes()
    assert main(["predict", "--model", str(wd), "--data", str(synthetic_study[2]), "--out", str(synthetic_study[2]),
                 "--overwrite"]) == 2
    assert "also an input" in _one_error(capsys)
    assert synthetic_study[2].read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["predict", "--model", "m", "--data", "x.h5ad", "--out", "p.h5ad", "--batch-size", "0"],
     "argument --batch-size: must be at least 1"),
    (["predict", "--model", "m", "--data", "x.h5ad", "--out", "p.h5ad", "--interval", "1.5"],
     "argument --interval: must lie strictly between 0 and 1"),
    (["train", "--data", "x.h5ad", "--workdir", "w", "--min-coverage", "nan"], "argument --min-coverage"),
    (["train", "--data", "x.h5ad", "--workdir", "w", "--augment", "rotate"], "invalid choice 'rotate'"),
    (["segment-nuclei", "--image", "x.png", "--out", "y.png", "--mpp", "-1"], "argument --mpp: must be positive"),
])
def test_bad_arguments_are_one_argparse_line(args, message, capsys):
    assert main(args) == 2
    assert message in _one_error(capsys)


@pytest.mark.real_data
def test_read_visium_sample_id_option(shared, tmp_path, capsys):
    import anndata as ad

    out = tmp_path / "v.h5ad"
    assert main(["read", "visium", str(shared / "data" / "visium_fixture"), "--out", str(out),
                 "--sample-id", "patient7"]) == 0
    a = ad.read_h5ad(out)
    assert set(a.obs["sample"]) == {"patient7"} and all(n.startswith("patient7_") for n in a.obs_names)
