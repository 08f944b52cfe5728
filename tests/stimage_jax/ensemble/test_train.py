"""One model through the ensemble's loop (``fit_ensemble`` with one member): learns a known
NB model, stops early, resumes bit-identically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.errors import StimageError
from stimage_jax.ensemble.stacked import fit_ensemble, stack_members, unstack_members
from stimage_jax.ensemble.train import TrainConfig
from stimage_jax.nb.distribution import nb_nll
from stimage_jax.nb.head import NBHead, init_head_from_data


@pytest.fixture
def nb_data(rng):
    n, d, g = 500, 12, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, g)) * 0.3
    mu = np.exp(1.0 + x @ w)
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(np.float32)
    return x, y, w


def _head(x, y, seed=0, dropout=0.0):
    h = NBHead(x.shape[1], y.shape[1], rngs=nnx.Rngs(seed), dropout=dropout)
    return init_head_from_data(h, x, y)


def fit_one(model, x_train, y_train, x_val=None, y_val=None, *, key, config, ckpt_dir=None, on_epoch=None):
    """Train one model as a one-member ensemble → (trained model, its history)."""
    stacked, hists = fit_ensemble(stack_members([model]), x_train, y_train, x_val, y_val, keys=key[None],
                                  config=config, strategy="vmap", ckpt_dir=ckpt_dir, progress=False, mesh=None,
                                  on_epoch=on_epoch)
    return unstack_members(stacked)[0], hists[0]


def test_recovers_generating_weights_and_dispersion(nb_data):
    x, y, w = nb_data
    # No validation: train to convergence, so the fit is the maximum-likelihood one.
    h, hist = fit_one(_head(x, y), x, y, key=jax.random.key(0), config=TrainConfig(lr=1e-2, max_epochs=200))
    learned = np.asarray(h.mu_out.kernel[...]) / np.asarray(h.feat_scale[...])[:, None]
    assert np.corrcoef(learned.ravel(), w.ravel())[0, 1] > 0.95
    r = np.exp(np.asarray(h.r_out.bias[...]))
    assert np.all((r > 2.0) & (r < 4.5)), r  # simulated dispersion 3
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_early_stopping_restores_best(nb_data):
    x, y, _ = nb_data
    cfg = TrainConfig(lr=0.3, max_epochs=60, patience=3)  # too large a step: overfits/oscillates fast
    h, hist = fit_one(_head(x[:50], y[:50]), x[:50], y[:50], x[400:], y[400:], key=jax.random.key(1), config=cfg)
    vals = [r["val_loss"] for r in hist]
    best = int(np.argmin(vals))
    assert len(hist) == best + 1 + cfg.patience < cfg.max_epochs
    # The returned model is the best epoch's: its validation NLL, computed here in one pass.
    val_nll = float(nb_nll(jnp.asarray(y[400:]), *h(jnp.asarray(x[400:]))))
    assert val_nll == pytest.approx(vals[best], rel=1e-5)


def test_killed_run_resumes_identically(nb_data, tmp_path):
    x, y, _ = nb_data
    cfg = TrainConfig(lr=1e-2, max_epochs=6, patience=100, checkpoint_every=1)
    ref, ref_hist = fit_one(_head(x, y, dropout=0.2), x[:400], y[:400], x[400:], y[400:],
                            key=jax.random.key(2), config=cfg)

    def kill(m, epoch, _):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_one(_head(x, y, dropout=0.2), x[:400], y[:400], x[400:], y[400:], key=jax.random.key(2),
                config=cfg, ckpt_dir=tmp_path / "m", on_epoch=kill)
    seen = []
    got, hist = fit_one(_head(x, y, dropout=0.2), x[:400], y[:400], x[400:], y[400:], key=jax.random.key(2),
                        config=cfg, ckpt_dir=tmp_path / "m", on_epoch=lambda m, e, _: seen.append(e))
    assert seen == [3, 4, 5]  # continued after the checkpoint of epoch 2
    assert [h["val_loss"] for h in hist] == pytest.approx([h["val_loss"] for h in ref_hist], rel=1e-6)
    np.testing.assert_array_equal(np.asarray(got.mu_out.kernel[...]), np.asarray(ref.mu_out.kernel[...]))


def test_truncated_checkpoint_is_a_clear_error(nb_data, tmp_path):
    x, y, _ = nb_data
    cfg = TrainConfig(lr=1e-2, max_epochs=2, checkpoint_every=1)
    fit_one(_head(x, y), x[:100], y[:100], key=jax.random.key(0), config=cfg, ckpt_dir=tmp_path / "m")
    for f in (tmp_path / "m").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "ocdbt" not in f.name and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(StimageError, match="unreadable"):
        fit_one(_head(x, y), x[:100], y[:100], key=jax.random.key(0), config=cfg, ckpt_dir=tmp_path / "m")


def test_feature_dead_in_training_cannot_blow_up_predictions(nb_data):
    x, y, _ = nb_data
    x = x.copy()
    x[:, 0] = 0.0  # a ReLU channel that never fired on the training tiles
    h = _head(x, y)
    h, _ = fit_one(h, x, y, key=jax.random.key(0), config=TrainConfig(lr=1e-2, max_epochs=5))
    probe = x[:4].copy()
    alive = np.asarray(h(probe)[0])
    probe[:, 0] = 50.0  # ... fires on a new slide
    np.testing.assert_allclose(np.asarray(h(probe)[0]), alive, rtol=1e-6)
    assert np.isfinite(np.asarray(h.feat_scale[...])[1:]).all()


def test_init_starts_each_head_at_the_marginal_fit_of_its_loss(nb_data):
    x, y, _ = nb_data
    y = y.copy()
    y[:, 0] = (np.arange(len(y)) % 5 == 0)  # a rare gene: mean 0.2, log(mean) < 0
    nb = _head(x, y)
    np.testing.assert_allclose(np.asarray(nb.mu_out.bias[...]), np.log(y.mean(0) + 1e-3), rtol=1e-5)
    h = init_head_from_data(NBHead(x.shape[1], y.shape[1], rngs=nnx.Rngs(0)), x, y, loss="mse_log1p")
    np.testing.assert_allclose(np.asarray(h.mu_out.bias[...]), np.log1p(y).mean(0), rtol=1e-5)
    assert np.asarray(h.mu_out.bias[...])[0] > 0  # the clamped prediction starts above 0
