"""Stacked ensembles: vmap equals loop equals a plain optax loop per member; resume; sharding; FSTimage CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data_pipelines import keys
from data_pipelines.errors import StimageError
from stimage_jax.cli import main
from stimage_jax.ensemble.model import EnsembleModel
from stimage_jax.ensemble.stacked import (create_members, fit_ensemble, member_mesh, resolve_strategy,
                                          unstack_members)
from stimage_jax.ensemble.train import TrainConfig
from stimage_jax.nb.distribution import nb_nll
from stimage_jax.nb.head import NBHead, init_head_from_data

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def nb_data(rng):
    n, d, g = 240, 8, 3
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, g)) * 0.3
    mu = np.exp(1.0 + x @ w)
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(np.float32)
    return x, y


def _make(x, y, dropout=0.1):
    def make(rngs):
        return NBHead(x.shape[1], y.shape[1], rngs=rngs, dropout=dropout)
    return make


def _stacked(x, y, n_members, seed=0, dropout=0.1):
    keys_ = jax.random.split(jax.random.key(seed), n_members)
    return init_head_from_data(create_members(_make(x, y, dropout), keys_), x, y), keys_


def _kernel(h):
    return np.asarray(h.mu_out.kernel[...])


CFG = TrainConfig(lr=3e-2, max_epochs=8, patience=2, batch_size=32, checkpoint_every=1)
# A step so large that members stop early, each at its own epoch (3, 9 and 7 of 12).
ES = TrainConfig(lr=0.3, max_epochs=12, patience=2, batch_size=32, checkpoint_every=1)


def test_create_members_equals_one_key_at_a_time(nb_data):
    x, y = nb_data
    stacked, ks = _stacked(x, y, 3)
    for m, mem in enumerate(unstack_members(stacked)):
        single = init_head_from_data(_make(x, y)(nnx.Rngs(ks[m])), x, y)
        np.testing.assert_array_equal(_kernel(mem), _kernel(single))
    assert not np.allclose(_kernel(stacked)[0], _kernel(stacked)[1])  # members differ


@pytest.mark.parametrize("cfg", [CFG, ES], ids=["no_stop", "early_stop"])
def test_vmap_equals_loop_with_per_member_early_stopping(nb_data, cfg):
    x, y = nb_data
    a, ks = _stacked(x, y, 3)
    b, _ = _stacked(x, y, 3)
    a, ha = fit_ensemble(a, x[:160], y[:160], x[160:], y[160:], keys=ks, config=cfg, strategy="vmap",
                         progress=False, mesh=None)
    b, hb = fit_ensemble(b, x[:160], y[:160], x[160:], y[160:], keys=ks, config=cfg, strategy="loop",
                         progress=False)
    assert [len(h) for h in ha] == [len(h) for h in hb]
    if cfg is ES:  # each member stopped at its own epoch, and vmap kept the stopped ones frozen
        assert len({len(h) for h in ha}) == 3 and max(len(h) for h in ha) < cfg.max_epochs
    for h1, h2 in zip(ha, hb):
        np.testing.assert_allclose([r["val_loss"] for r in h1], [r["val_loss"] for r in h2], rtol=1e-5)
    np.testing.assert_allclose(_kernel(a), _kernel(b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.r_out.bias[...]), np.asarray(b.r_out.bias[...]), atol=1e-5)


def test_loop_strategy_compiles_its_step_once_for_all_members(nb_data):
    from stimage_jax.training import members_train_step

    x, y = nb_data
    st, ks = _stacked(x, y, 3)
    before = members_train_step._cache_size()
    fit_ensemble(st, x[:160], y[:160], keys=ks, config=TrainConfig(lr=1.23e-2, max_epochs=2, batch_size=32),
                 strategy="loop", progress=False)
    assert members_train_step._cache_size() == before + 1  # one one-member program, not one per member


def _plain_optax_fit(model, x, y, x_val, y_val, key, cfg: TrainConfig):
    """The single-model algorithm written out with plain optax, independently of the library:
    epoch e visits rows in ``permutation(fold_in(key, e))`` order, in sorted fixed-size
    batches (the last padded with weight 0), Adam on the masked NB NLL, the validation NLL
    after each epoch, early stopping after ``patience`` epochs without improvement and the
    best epoch's parameters restored. → (model in eval mode, validation losses)."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)  # plain arrays through jit
    model.eval()
    eval_def = nnx.split(model, nnx.Param, ...)[0]
    tx = optax.adam(cfg.lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, rest, opt, xb, yb, wb):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            return nb_nll(yb, *m(xb), mask=wb[:, None]), nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
        (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), rest, opt

    n, bs = len(y), cfg.batch_size
    best, best_val, bad, vals = params, math.inf, 0, []
    for epoch in range(cfg.max_epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        for s in range(0, n, bs):
            b = np.sort(order[s:s + bs])
            idx = np.concatenate([b, np.repeat(b[:1], bs - len(b))])
            params, rest, opt = step(params, rest, opt, x[idx], y[idx], (np.arange(bs) < len(b)).astype(np.float32))
        vals.append(float(nb_nll(jnp.asarray(y_val), *nnx.merge(eval_def, params, rest)(jnp.asarray(x_val)))))
        if vals[-1] < best_val:
            best, best_val, bad = params, vals[-1], 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    return nnx.merge(eval_def, best, rest), vals


@pytest.mark.parametrize("strategy, cfg", [("vmap", CFG), ("vmap", ES), ("loop", ES)],
                         ids=["vmap-no_stop", "vmap-early_stop", "loop-early_stop"])
def test_one_member_ensemble_equals_a_plain_optax_loop(nb_data, strategy, cfg):
    x, y = nb_data
    stacked, ks = _stacked(x, y, 1)
    stacked, hist = fit_ensemble(stacked, x[:160], y[:160], x[160:], y[160:], keys=ks, config=cfg,
                                 strategy=strategy, progress=False, mesh=None)
    single = init_head_from_data(_make(x, y)(nnx.Rngs(ks[0])), x, y)
    single, vals = _plain_optax_fit(single, x[:160], y[:160], x[160:], y[160:], ks[0], cfg)
    assert len(hist[0]) == len(vals) == (3 if cfg is ES else cfg.max_epochs)  # stopped at the same epoch
    np.testing.assert_allclose([r["val_loss"] for r in hist[0]], vals, rtol=1e-5)
    np.testing.assert_allclose(_kernel(stacked)[0], _kernel(single), atol=1e-5)
    np.testing.assert_allclose(np.asarray(stacked.r_out.bias[...])[0], np.asarray(single.r_out.bias[...]),
                               atol=1e-5)


def test_killed_vmap_run_resumes_identically(nb_data, tmp_path):
    x, y = nb_data
    ref, ks = _stacked(x, y, 2)
    ref, ref_hist = fit_ensemble(ref, x[:160], y[:160], x[160:], y[160:], keys=ks, config=CFG,
                                 strategy="vmap", progress=False, mesh=None)

    def kill(m, epoch, _):
        if epoch == 2:
            raise KeyboardInterrupt

    first, _ = _stacked(x, y, 2)
    with pytest.raises(KeyboardInterrupt):
        fit_ensemble(first, x[:160], y[:160], x[160:], y[160:], keys=ks, config=CFG, strategy="vmap",
                     ckpt_dir=tmp_path, progress=False, mesh=None, on_epoch=kill)
    seen = []
    again, _ = _stacked(x, y, 2)
    got, hist = fit_ensemble(again, x[:160], y[:160], x[160:], y[160:], keys=ks, config=CFG, strategy="vmap",
                             ckpt_dir=tmp_path, progress=False, mesh=None,
                             on_epoch=lambda m, e, _: seen.append(e))
    assert min(seen) == 3  # continued after the checkpoint of epoch 2
    assert hist == ref_hist
    np.testing.assert_array_equal(_kernel(got), _kernel(ref))


def test_truncated_vmap_checkpoint_is_a_clear_error(nb_data, tmp_path):
    x, y = nb_data
    st, ks = _stacked(x, y, 2)
    fit_ensemble(st, x, y, keys=ks, config=TrainConfig(max_epochs=2, checkpoint_every=1), strategy="vmap",
                 ckpt_dir=tmp_path, progress=False, mesh=None)
    for f in (tmp_path / "stacked").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "ocdbt" not in f.name and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    st, _ = _stacked(x, y, 2)
    with pytest.raises(StimageError, match="unreadable"):
        fit_ensemble(st, x, y, keys=ks, config=TrainConfig(max_epochs=2), strategy="vmap",
                     ckpt_dir=tmp_path, progress=False, mesh=None)


def test_resolve_strategy_by_backend():
    assert resolve_strategy("auto", trains_backbone=True, backend="cpu") == "loop"
    assert resolve_strategy("auto", trains_backbone=False, backend="cpu") == "vmap"
    assert resolve_strategy("auto", trains_backbone=True, backend="gpu") == "vmap"
    assert resolve_strategy("loop", trains_backbone=False, backend="tpu") == "loop"
    with pytest.raises(StimageError, match="unknown ensemble strategy"):
        resolve_strategy("pmap", trains_backbone=False)


def test_member_mesh_on_one_device_is_none():
    assert member_mesh(4, 32, devices=jax.devices()[:1]) is None


SHARDED = textwrap.dedent("""
    import json, jax, numpy as np
    from flax import nnx
    from stimage_jax.ensemble.stacked import create_members, fit_ensemble, member_mesh
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.nb.head import NBHead, init_head_from_data
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = rng.poisson(np.exp(1 + x[:, :3] * 0.3)).astype(np.float32)
    cfg = TrainConfig(lr=3e-2, max_epochs=4, patience=2, batch_size=32)
    def run(mesh):
        ks = jax.random.split(jax.random.key(0), 4)
        st = create_members(lambda r: NBHead(8, 3, rngs=r, dropout=0.1), ks)
        st = init_head_from_data(st, x, y)
        st, h = fit_ensemble(st, x[:150], y[:150], x[150:], y[150:], keys=ks, config=cfg,
                             strategy="vmap", progress=False, mesh=mesh)
        return np.asarray(st.mu_out.kernel[...]), h
    mesh = member_mesh(4, 32)
    a, ha = run(mesh)
    b, hb = run(None)
    shapes = {f"{m}x{b}": dict(member_mesh(m, b).shape) for m, b in ((10, 32), (3, 30), (3, 7))
              if member_mesh(m, b) is not None}
    print(json.dumps({"devices": len(jax.devices()), "mesh": dict(mesh.shape), "shapes": shapes,
                      "max_abs": float(np.abs(a - b).max()),
                      "val_a": [[r["val_loss"] for r in h] for h in ha],
                      "val_b": [[r["val_loss"] for r in h] for h in hb]}))
""")


def test_sharded_over_four_cpu_devices_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4 and res["mesh"] == {"member": 4, "batch": 1}
    # Members take the devices that divide their number; the batch takes what divides it.
    assert res["shapes"] == {"10x32": {"member": 2, "batch": 2}, "3x30": {"member": 1, "batch": 3}}
    assert res["max_abs"] < 1e-5
    for va, vb in zip(res["val_a"], res["val_b"]):
        np.testing.assert_allclose(va, vb, rtol=1e-5)


# ---------------------------------------------------------------- FSTimage from the CLI

TRAIN = ["--tile-px", "32", "--lr", "5e-2", "--max-epochs", "40", "--patience", "40", "--genes", "A,B,C", "--quiet"]


def run(*args) -> int:
    return main([str(a) for a in args])


def _counts(a) -> np.ndarray:
    return np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, np.float64)


@pytest.fixture
def study_with_embeddings(synthetic_study, tmp_path):
    """The synthetic study with an 'emb' obsm of colour-derived features (a stand-in for UNI)."""
    paths = []
    for p in synthetic_study:
        a = ad.read_h5ad(p)
        rng = np.random.default_rng(len(paths))
        # Informative: the generating counts (log) plus noise, 6 dims.
        x = np.log1p(_counts(a))
        a.obsm["emb"] = np.concatenate([x, rng.normal(size=(a.n_obs, 3))], 1).astype(np.float32)
        q = tmp_path / f"emb_{p.name}"
        a.write_h5ad(q)
        paths.append(q)
    return paths


def test_fstimage_two_backbones_and_embeddings(study_with_embeddings, tmp_path, capsys):
    wd, pred = tmp_path / "fst", tmp_path / "p.h5ad"
    assert run("train", "--data", *study_with_embeddings[:2], "--workdir", wd, "--backbone", "tiny,resnet_tiny",
               "--embeddings", "emb", "--members", "2", *TRAIN) == 0
    model = EnsembleModel.load(wd)
    assert [s["name"] for s in model.sources] == ["tiny", "resnet_tiny", "emb_emb"]
    assert model.config["members"] == 6 and model.member_sources == ["tiny"] * 2 + ["resnet_tiny"] * 2 + ["emb_emb"] * 2
    assert run("--quiet", "predict", "--model", wd, "--data", study_with_embeddings[2], "--out", pred) == 0
    p = ad.read_h5ad(pred)
    assert p.obsm[keys.MEMBER_MU].shape == (64, 6, 3)
    # The mean is the members' average NB mean; the embedding members see the counts and fit best.
    np.testing.assert_allclose(p.X, p.obsm[keys.MEMBER_MU].mean(1), rtol=1e-5)
    truth = _counts(ad.read_h5ad(study_with_embeddings[2]))
    emb_mu = p.obsm[keys.MEMBER_MU][:, 4:, 0].mean(1)
    assert np.corrcoef(emb_mu, truth[:, 0])[0, 1] > 0.8
    # Prediction without the embedding in the input is a clear error naming the key.
    plain = tmp_path / "plain.h5ad"
    a = ad.read_h5ad(study_with_embeddings[2])
    del a.obsm["emb"]
    a.write_h5ad(plain)
    capsys.readouterr()
    assert run("--quiet", "predict", "--model", wd, "--data", plain, "--out", tmp_path / "q.h5ad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "emb" in err[0]
    # Embedding members cannot be exported to a tiles-only ONNX graph.
    assert run("export-onnx", "--model", wd, "--out", tmp_path / "m.onnx") == 2
    assert "embedding" in capsys.readouterr().err


def test_embeddings_from_npy_folder(synthetic_study, tmp_path):
    folder = tmp_path / "uni"
    folder.mkdir()
    for p in synthetic_study:
        a = ad.read_h5ad(p)
        sample = str(a.obs[keys.SAMPLE].iloc[0])
        np.save(folder / f"{sample}.npy", np.log1p(_counts(a)).astype(np.float32))
    wd = tmp_path / "npy"
    assert run("train", "--data", *synthetic_study[:2], "--workdir", wd, "--embeddings", folder,
               "--members", "2", *TRAIN) == 0
    model = EnsembleModel.load(wd)
    assert [s["kind"] for s in model.sources] == ["embeddings"] and model.config["members"] == 2
    assert run("--quiet", "predict", "--model", wd, "--data", synthetic_study[2], "--out", tmp_path / "p.h5ad") == 0


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "tiny,vgg"], "unknown backbone 'vgg'"),
    (["--backbone", "tiny,tiny"], "twice"),
    (["--backbone", "tiny", "--embeddings", "nope"], "nope"),
    (["--backbone", "tiny", "--embeddings", "short"], "one row per spot"),
    (["--backbone", "tiny,resnet_tiny", "--fine-tune"], "one backbone"),
])
def test_fstimage_bad_input_one_line_exit_2(extra, message, study_with_embeddings, tmp_path, capsys):
    data = list(study_with_embeddings[:2])
    if "short" in extra:
        folder = tmp_path / "short"
        folder.mkdir()
        for p in data:
            b = ad.read_h5ad(p)
            np.save(folder / f"{b.obs[keys.SAMPLE].iloc[0]}.npy", np.zeros((b.n_obs - 1, 4), np.float32))
        extra = [folder if e == "short" else e for e in extra]
    code = run("train", "--data", *data, "--workdir", tmp_path / "w", *extra, *TRAIN)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_checkpoint_from_another_gene_set_is_refused(synthetic_study, tmp_path, capsys):
    wd = tmp_path / "g"
    base = ["train", "--data", *synthetic_study[:2], "--workdir", wd, "--backbone", "tiny", "--tile-px", "32",
            "--max-epochs", "1", "--quiet"]
    assert run(*base, "--genes", "A,B") == 0
    capsys.readouterr()
    assert run(*base, "--genes", "A,C") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "genes" in err[0]


def test_weights_list_default_and_none_entries(tmp_path):
    from stimage_jax.features.registry import DEFAULT_WEIGHTS
    from stimage_jax.pipeline import _parse_sources

    src = _parse_sources("efficientnet_lite0,tiny", None, "default,none")
    assert src[0]["weights"] == str(DEFAULT_WEIGHTS["efficientnet_lite0"]) and src[1]["weights"] is None
    with pytest.raises(StimageError, match="1 weights file"):
        _parse_sources("efficientnet_lite0,tiny", None, "default")
    with pytest.raises(StimageError, match="not found"):
        _parse_sources("tiny", None, str(tmp_path / "missing.safetensors"))


def test_augmentation_frozen_views_and_fine_tune(synthetic_study, tmp_path):
    """Frozen: K cached views enlarge the training set, validation untouched; fine-tune:
    each member's batches are augmented with its own keys (vmap still equals loop)."""
    from stimage_jax.pipeline import train

    base = dict(genes="A,B", backbone="tiny", tile_px=32, min_coverage=0.0, progress=False,
                config=TrainConfig(lr=3e-2, max_epochs=2, batch_size=16))
    m = train(synthetic_study[:2], tmp_path / "frozen", augment="default", augment_views=2, **base)
    assert m.config["augment"] == "default" and m.config["augment_views"] == 2
    views = sorted((tmp_path / "frozen" / "cache" / "features").glob("s0__*aug-default*-v*.npy"))
    assert len(views) == 2 and not list((tmp_path / "frozen" / "cache" / "features").glob("s1__*aug*"))
    plain = next(p for p in (tmp_path / "frozen" / "cache" / "features").glob("s0__*.npy") if "aug" not in p.name)
    assert not np.allclose(np.load(views[0]), np.load(plain))  # the views are different tiles
    log = (tmp_path / "frozen" / "train_log.csv").read_text()
    assert log.count("\n") == 1 + 2  # one member, 2 epochs

    ft = {**base, "fine_tune": True, "members": 2, "augment": "default"}
    a = train(synthetic_study[:2], tmp_path / "ft_vmap", strategy="vmap", **ft)
    b = train(synthetic_study[:2], tmp_path / "ft_loop", strategy="loop", **ft)
    ka = np.asarray(a.members[0].head.mu_out.kernel[...])
    np.testing.assert_allclose(ka, np.asarray(b.members[0].head.mu_out.kernel[...]), atol=2e-5)
    c = train(synthetic_study[:2], tmp_path / "ft_plain", strategy="vmap", **{**ft, "augment": "none"})
    assert not np.allclose(ka, np.asarray(c.members[0].head.mu_out.kernel[...]), atol=1e-4)  # augmentation acted
