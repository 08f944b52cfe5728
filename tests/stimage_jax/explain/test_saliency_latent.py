"""SmoothGrad against analytic gradients; the explain/latent commands end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stimage_jax.cli import main
from stimage_jax.explain.latent import pca_2d
from stimage_jax.explain.saliency import smoothgrad


def run(*args) -> int:
    return main([str(a) for a in args])


def test_smoothgrad_of_linear_function_is_its_weights(rng):
    w = rng.normal(size=(8, 8, 3)).astype(np.float32)
    tile = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    sal = smoothgrad(lambda b: jnp.sum(b * w, axis=(1, 2, 3)), tile, key=jax.random.key(0), n_samples=7)
    np.testing.assert_allclose(sal, np.abs(w).sum(-1), rtol=1e-5)


def test_smoothgrad_averages_noise_of_a_quadratic(rng):
    # f(x) = ½ Σ x²: gradient x + ε; the average over many noisy copies tends to |x|.
    tile = rng.integers(0, 256, (6, 6, 3)).astype(np.float32)
    sal = smoothgrad(lambda b: 0.5 * jnp.sum(b * b, axis=(1, 2, 3)), tile, key=jax.random.key(1), n_samples=4000,
                     noise=0.1)
    expected = np.abs(tile).sum(-1)
    assert np.abs(sal - expected).max() < 0.1 * 255 * 3 * 4 / np.sqrt(4000)  # 4 SE of the noise mean, 3 channels


def test_pca_2d_equals_sklearn_on_standardised_features(rng):
    from sklearn.decomposition import PCA

    x = rng.normal(size=(50, 6)) * np.array([5, 1, 1, 0.1, 3, 2])
    xy, ratio = pca_2d(x)
    z = (x - x.mean(0)) / x.std(0)
    ref = PCA(2).fit(z)
    np.testing.assert_allclose(np.abs(xy), np.abs(ref.transform(z)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_)


@pytest.fixture
def trained(synthetic_study, tmp_path):
    wd = tmp_path / "wd"
    assert run("train", "--data", *synthetic_study[:2], "--workdir", wd, "--backbone", "tiny", "--tile-px", "32",
               "--max-epochs", "20", "--lr", "3e-2", "--genes", "A,B,C", "--members", "2", "--min-coverage", "0",
               "--quiet") == 0
    return wd


def test_explain_saliency_and_latent_cli(trained, synthetic_study, tmp_path, capsys):
    import anndata as ad

    spot = ad.read_h5ad(synthetic_study[2]).obs_names[5]
    out = tmp_path / "ex"
    assert run("explain", "--method", "saliency", "--model", trained, "--data", synthetic_study[2], "--spot", spot,
               "--gene", "A", "--out", out, "--samples", "8") == 0
    sal = np.load(out / f"{spot}_A_saliency.npy")
    assert sal.shape == (32, 32) and np.isfinite(sal).all() and sal.max() > 0
    assert (out / f"{spot}_A_saliency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the printed mean is the model's prediction for that spot
    from stimage_jax.ensemble.model import EnsembleModel
    from stimage_jax.explain.spot import spot_tile

    model = EnsembleModel.load(trained)
    tile = spot_tile(ad.read_h5ad(synthetic_study[2]), model, spot)
    mu, _ = model.member_params(tile[None], progress=False)
    assert f"predicted mean {mu.mean(0)[0, 0]:.2f}" in capsys.readouterr().out

    png = tmp_path / "latent.png"
    assert run("latent", "--model", trained, "--data", synthetic_study[2], "--genes", "A,B", "--out", png,
               "--quiet") == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    (["--spot", "nope", "--gene", "A"], "spot 'nope' is not in the data"),
    (["--spot", "s2_0x0", "--gene", "ZZZ"], "gene 'ZZZ' is not predicted"),
])
def test_explain_bad_input(extra, message, trained, synthetic_study, tmp_path, capsys):
    assert run("explain", "--method", "saliency", "--model", trained, "--data", synthetic_study[2], *extra,
               "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_explain_tile_of_wrong_size(trained, tmp_path, capsys):
    import cv2

    cv2.imwrite(str(tmp_path / "t.png"), np.zeros((40, 40, 3), np.uint8))
    assert run("explain", "--method", "saliency", "--model", trained, "--tile", tmp_path / "t.png", "--gene", "A",
               "--out", tmp_path / "o") == 2
    assert "the model reads 32x32" in capsys.readouterr().err
