"""LIME over segments: recovers the segment a known function reads; the CLI end to end."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pandas as pd

from stimage_jax.cli import main
from stimage_jax.explain.lime_nuclei import lime_weights


def test_lime_weight_lands_on_the_segment_the_output_reads():
    rng = np.random.default_rng(0)
    tile = np.full((32, 32, 3), 200, np.uint8)
    segments = np.zeros((32, 32), np.int32)
    for k, (y, x) in enumerate([(4, 4), (4, 20), (20, 4), (20, 20)], start=1):
        segments[y:y + 8, x:x + 8] = k
        tile[y:y + 8, x:x + 8] = rng.integers(0, 256, (8, 8, 3))
    mask = jnp.asarray(segments == 3, jnp.float32)[None, :, :, None]
    # the output reads the texture of segment 3: hidden (mean-coloured) it is ~flat
    fn = lambda b: jnp.sum(jnp.abs(b - b.mean(axis=(1, 2), keepdims=True)) * mask, axis=(1, 2, 3)) / 1000.0  # noqa: E731
    weights, _, score = lime_weights(fn, tile, segments, num_samples=300, seed=0, batch_size=32)
    assert max(weights, key=lambda k: weights[k]) == 3
    assert weights[3] > 10 * max(abs(weights[k]) for k in weights if k != 3)
    assert score > 0.9


def test_explain_lime_cli_on_a_trained_model(synthetic_study, tmp_path, capsys):
    import anndata as ad

    wd = tmp_path / "wd"
    assert main(["train", "--data", str(synthetic_study[0]), str(synthetic_study[1]), "--workdir", str(wd),
                 "--backbone", "tiny", "--tile-px", "32", "--max-epochs", "5", "--genes", "A,B",
                 "--min-coverage", "0", "--quiet"]) == 0
    spot = ad.read_h5ad(synthetic_study[2]).obs_names[3]
    out = tmp_path / "lime"
    assert main(["explain", "--model", str(wd), "--data", str(synthetic_study[2]), "--spot", spot, "--gene", "A",
                 "--samples", "100", "--out", str(out)]) == 0
    table = pd.read_csv(out / f"{spot}_A_lime.csv")
    assert list(table.columns) == ["nucleus", "area_px", "area_um2", "centroid_x", "centroid_y", "weight"]
    assert (out / f"{spot}_A_lime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "LIME over" in capsys.readouterr().out


def test_explain_lime_through_onnx_matches_jax(synthetic_study, tmp_path):
    import anndata as ad

    wd = tmp_path / "wd"
    assert main(["train", "--data", str(synthetic_study[0]), str(synthetic_study[1]), "--workdir", str(wd),
                 "--backbone", "tiny", "--tile-px", "32", "--max-epochs", "5", "--genes", "A,B",
                 "--min-coverage", "0", "--quiet"]) == 0
    assert main(["export-onnx", "--model", str(wd), "--out", str(tmp_path / "m.onnx")]) == 0
    spot = ad.read_h5ad(synthetic_study[2]).obs_names[3]
    for model, out in ((wd, "j"), (tmp_path / "m.onnx", "o")):
        assert main(["explain", "--model", str(model), "--data", str(synthetic_study[2]), "--spot", spot,
                     "--gene", "A", "--samples", "100", "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "o" / f"{spot}_A_lime.png").exists()
    # The same LIME fit through either runtime (synthetic discs are not nuclei: use quadrants)
    from export.predict import OnnxEnsemble
    from stimage_jax.ensemble.model import EnsembleModel
    from stimage_jax.explain.saliency import gene_forward_fn
    from stimage_jax.explain.spot import spot_tile

    jm, om = EnsembleModel.load(wd), OnnxEnsemble(tmp_path / "m.onnx")
    tile = spot_tile(ad.read_h5ad(synthetic_study[2]), jm, spot)
    segments = np.zeros((32, 32), np.int32)
    segments[:16, 16:], segments[16:, :16], segments[16:, 16:] = 1, 2, 3
    wj, _, _ = lime_weights(gene_forward_fn(jm, "A"), tile, segments, num_samples=200, batch_size=50)
    wo, _, _ = lime_weights(gene_forward_fn(om, "A"), tile, segments, num_samples=200, batch_size=50)
    scale = max(abs(v) for v in wj.values())
    assert scale > 0
    for k in range(4):  # both runtimes read the same uint8 tiles: the same fit up to float rounding
        assert abs(wo[k] - wj[k]) < 1e-3 * scale, (wo, wj)
