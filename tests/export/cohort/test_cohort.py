"""Cohort prediction on whole slides cut from HER2ST C sections: manifest, failures,
resume by fingerprint, cohort.h5ad, and local workers / Dask LocalCluster equal to the
single-process run (run without JAX importable)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from stimage_jax.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[3]


def _manifest(out: Path) -> dict:
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "status", "error", "seconds", "fingerprint"]
    return {r["slide_id"]: r for r in rows}


def _mtimes(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "slides").glob("*.h5ad"))}


@pytest.fixture(scope="module")
def local_run(cohort_inputs, tmp_path_factory):
    """The single-process run (stimage cohort predict, default --workers 1) of all 6 slides."""
    out = tmp_path_factory.mktemp("cohort") / "local"
    code = main(["cohort", "predict", "--quiet", "--model", str(cohort_inputs["model"]), "--slides",
                 str(cohort_inputs["csv"]), "--out", str(out), "--genes", "ERBB2"])
    return code, out


def test_local_run_writes_manifest_cohort_and_records_failures(local_run, cohort_inputs, capsys):
    code, out = local_run
    assert code == 1  # two slides failed: the exit status says so
    m = _manifest(out)
    assert list(m) == cohort_inputs["good"] + cohort_inputs["bad"]  # the CSV's order
    for sid in cohort_inputs["good"]:
        assert m[sid]["status"] == "ok" and m[sid]["error"] == "" and len(m[sid]["fingerprint"]) == 64
        assert (out / "slides" / f"{sid}_ERBB2.png").read_bytes()[:4] == b"\x89PNG"
    for sid in cohort_inputs["bad"]:
        assert m[sid]["status"] == "failed"
        assert "unreadable or truncated" in m[sid]["error"] and "\n" not in m[sid]["error"]
        assert not (out / "slides" / f"{sid}.h5ad").exists()
    c = ad.read_h5ad(out / "cohort.h5ad")
    assert list(c.obs_names) == cohort_inputs["good"] and c.n_vars == 4
    for sid in cohort_inputs["good"]:
        s = ad.read_h5ad(out / "slides" / f"{sid}.h5ad")
        assert s.n_obs > 20 and int(c.obs.loc[sid, "n_tiles"]) == s.n_obs
        # X = mean over tissue tiles of the predicted mean; layers = mean tile variances
        np.testing.assert_allclose(c[sid].X.ravel(), np.asarray(s.X, np.float64).mean(0), rtol=1e-6)
        np.testing.assert_allclose(c[sid].layers["var_epistemic"].ravel(),
                                   np.asarray(s.layers["var_epistemic"], np.float64).mean(0), rtol=1e-6)
        # tissue area: coverage of each 100 µm tile x 0.01 mm²
        assert c.obs.loc[sid, "tissue_mm2"] == pytest.approx(s.obs["tissue_coverage"].sum() * 0.01, rel=1e-6)
        assert c.obs.loc[sid, "fingerprint"] == m[sid]["fingerprint"]
    assert c.obs["model_hash"].nunique() == 1 and (c.obs["seconds"] > 0).all()
    assert np.isfinite(c.X).all() and (c.X > 0).all()


def test_rerun_skips_done_slides_and_settings_or_model_change_redo_them(local_run, cohort_inputs, tiny_onnx, tmp_path,
                                                                       capsys):
    import shutil

    _, src = local_run
    out = tmp_path / "resume"
    shutil.copytree(src, out)
    before, fps = _mtimes(out), {k: v["fingerprint"] for k, v in _manifest(out).items()}
    args = ["cohort", "predict", "--quiet", "--model", str(cohort_inputs["model"]), "--slides",
            str(cohort_inputs["good_csv"]), "--out", str(out), "--genes", "ERBB2"]
    assert main(args) == 0
    assert "4 ok (4 already done), 0 failed" in capsys.readouterr().out
    assert _mtimes(out) == before  # nothing rewritten
    m = _manifest(out)
    assert {k: v["fingerprint"] for k, v in m.items()} == {k: fps[k] for k in cohort_inputs["good"]}
    # another min_coverage is another prediction: every slide is redone
    assert main(args + ["--min-coverage", "0.5"]) == 0
    after = _mtimes(out)
    assert all(after[k] != before[k] for k in before)
    assert all(_manifest(out)[k]["fingerprint"] != fps[k] for k in cohort_inputs["good"])
    # same file name, other weights: keyed by content, so redone too
    tiny_onnx(tmp_path / "tiny.onnx", seed=1)
    shutil.copy(tmp_path / "tiny.onnx", tmp_path / "m.onnx")
    args2 = [a if a != str(cohort_inputs["model"]) else str(tmp_path / "m.onnx") for a in args]
    assert main(args2 + ["--min-coverage", "0.5"]) == 0
    assert all(_mtimes(out)[k] != after[k] for k in after)


def _no_jax_env(tmp_path: Path) -> dict:
    """PYTHONPATH stubs: importing jax, flax, optax or stimage_jax raises ImportError (also in
    spawned workers, which inherit the environment)."""
    stubs = tmp_path / "stubs"
    for name in ("jax", "flax", "optax", "stimage_jax"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(ROOT)])}


def test_two_local_workers_without_jax_equal_the_single_process_run(local_run, cohort_inputs, tmp_path):
    _, ref = local_run
    out = tmp_path / "w2"
    proc = subprocess.run([sys.executable, "-m", "export.cohort", "predict", "--quiet", "--model",
                           str(cohort_inputs["model"]), "--slides", str(cohort_inputs["csv"]), "--out", str(out),
                           "--workers", "2", "--genes", "ERBB2"], capture_output=True, text=True,
                          env=_no_jax_env(tmp_path), cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the two bad slides
    assert "failed: trunc:" in proc.stdout and "4 ok" in proc.stdout
    _assert_same(ref, out, cohort_inputs)


def test_dask_local_cluster_of_two_equals_the_single_process_run(local_run, cohort_inputs, tmp_path):
    from export.cohort import predict_cohort

    _, ref = local_run
    out = tmp_path / "dask"
    r = predict_cohort(str(cohort_inputs["model"]), cohort_inputs["csv"], out, dask_local=2, genes=["ERBB2"],
                       progress=False)
    assert (r["ok"], r["failed"]) == (4, 2)
    assert len({v["pid"] for v in r["results"].values() if "pid" in v}) == 2  # both workers did slides
    assert not any(v.get("jax_loaded") for v in r["results"].values())
    _assert_same(ref, out, cohort_inputs)


def _assert_same(ref: Path, out: Path, inputs) -> None:
    a, b = _manifest(ref), _manifest(out)
    assert {k: (v["status"], v["error"], v["fingerprint"]) for k, v in a.items()} == \
        {k: (v["status"], v["error"], v["fingerprint"]) for k, v in b.items()}
    ca, cb = ad.read_h5ad(ref / "cohort.h5ad"), ad.read_h5ad(out / "cohort.h5ad")
    assert list(ca.obs_names) == list(cb.obs_names)
    np.testing.assert_array_equal(ca.X, cb.X)
    for layer in ("var_aleatoric", "var_epistemic"):
        np.testing.assert_array_equal(ca.layers[layer], cb.layers[layer])
    for sid in inputs["good"]:
        sa, sb = ad.read_h5ad(ref / "slides" / f"{sid}.h5ad"), ad.read_h5ad(out / "slides" / f"{sid}.h5ad")
        assert list(sa.obs_names) == list(sb.obs_names)
        np.testing.assert_array_equal(sa.X, sb.X)


@pytest.mark.parametrize("case", ["header", "duplicate", "gene", "model"])
def test_bad_input_is_one_line_before_any_work(case, cohort_inputs, tmp_path, capsys):
    d = cohort_inputs["dir"]
    table, model, extra = cohort_inputs["csv"], cohort_inputs["model"], []
    if case == "header":
        table = tmp_path / "t.csv"
        table.write_text("id,file\ns0,slides/s0.tif\n")
    elif case == "duplicate":
        table = d / "dup.csv"
        table.write_text("slide_id,path\ns0,slides/s0.tif\ns0,slides/s1.tif\n")
    elif case == "gene":
        extra = ["--genes", "NOPE"]
    else:
        model = tmp_path / "broken.onnx"
        model.write_bytes(b"not onnx")
    code = main(["cohort", "predict", "--quiet", "--model", str(model), "--slides", str(table),
                 "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stimage: error:") and err.count("\n") == 1
    assert {"header": "slide_id,path", "duplicate": "listed twice", "gene": "NOPE",
            "model": "not an ONNX model"}[case] in err
    assert not (tmp_path / "o" / "manifest.csv").exists()


def test_a_jax_workdir_model_runs_through_the_same_path(synthetic_study, make_slide, tmp_path, capsys):
    """`stimage cohort predict` with a training workdir: the JAX loader, named in the task."""
    wd = tmp_path / "wd"
    assert main(["train", "--quiet", "--data", *map(str, synthetic_study[:2]), "--workdir", str(wd),
                 "--backbone", "tiny", "--tile-px", "32", "--members", "2", "--max-epochs", "1",
                 "--genes", "A,B"]) == 0
    make_slide(tmp_path / "a.tif", mpp=1.0)
    (tmp_path / "s.csv").write_text("slide_id,path\na,a.tif\n")
    assert main(["cohort", "predict", "--quiet", "--model", str(wd), "--slides", str(tmp_path / "s.csv"),
                 "--out", str(tmp_path / "o")]) == 0
    c = ad.read_h5ad(tmp_path / "o" / "cohort.h5ad")
    assert list(c.var_names) == ["A", "B"] and c.obs.loc["a", "n_tiles"] > 20
    assert c.uns["stimage"]["cohort"]["model_hash"] == c.obs.loc["a", "model_hash"]


def test_dask_address_of_a_running_cluster(local_run, cohort_inputs, tmp_path):
    """--dask ADDRESS: the same tasks on a cluster someone else started."""
    from distributed import LocalCluster

    from export.cohort import predict_cohort

    _, ref = local_run
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        r = predict_cohort(str(cohort_inputs["model"]), cohort_inputs["good_csv"], tmp_path / "remote",
                           dask=cluster.scheduler_address, genes=["ERBB2"], progress=False)
    assert (r["ok"], r["failed"]) == (4, 0)
    np.testing.assert_array_equal(ad.read_h5ad(ref / "cohort.h5ad").X, ad.read_h5ad(tmp_path / "remote" / "cohort.h5ad").X)


def test_cohort_h5ad_feeds_clinical_bulk(local_run, tmp_path, capsys):
    _, ref = local_run
    c = ad.read_h5ad(ref / "cohort.h5ad")
    counts = np.round(np.asarray(c.X, np.float64) * 1000).astype(int)
    import pandas as pd

    pd.DataFrame(counts, index=c.obs_names, columns=c.var_names).to_csv(tmp_path / "bulk.csv")
    assert main(["clinical", "bulk", "--pred", str(ref / "cohort.h5ad"), "--bulk", str(tmp_path / "bulk.csv"),
                 "--out", str(tmp_path / "b")]) == 0
    s = pd.read_csv(tmp_path / "b" / "bulk_samples.csv")
    assert list(s["sample"]) == list(c.obs_names) and (s["pcc"] > 0.9).all()
    assert '"pred_transform": "log"' in capsys.readouterr().out  # auto: log1p for predictions, CPM for counts
