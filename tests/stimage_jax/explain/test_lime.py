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
