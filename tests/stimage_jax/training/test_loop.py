"""The shared train state and jitted steps: one Adam step on the loss, compiled once per
architecture and optimiser, and the member-vmapped step equal to each member alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stimage_jax.ensemble.stacked import create_members
from stimage_jax.ensemble.train import SpotLoss, adam
from stimage_jax.nb.distribution import nb_nll
from stimage_jax.nb.head import NBHead, init_head_from_data
from stimage_jax.training import TrainState, eval_step, members_eval_step, members_train_step, train_step

D, G, B = 6, 3, 16


@pytest.fixture
def data(rng):
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.poisson(3.0, size=(B, G)).astype(np.float32)
    w = np.ones(B, np.float32)
    w[-3:] = 0.0  # padding rows
    return x, y, w


def _member(tree, m: int) -> list[np.ndarray]:
    """Member ``m``'s slice of every leaf, as NumPy (PRNG keys as their key data)."""
    def host(a):
        return np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)[m]
    return [host(a) for a in jax.tree.leaves(tree)]


def _head(x, y, seed=0, dropout=0.0):
    return init_head_from_data(NBHead(D, G, rngs=nnx.Rngs(seed), dropout=dropout), x, y)


def test_train_step_is_one_adam_step_on_the_masked_loss(data):
    x, y, w = data
    head = _head(x, y, dropout=0.2)
    state = TrainState.create(head, optax.adam(1e-2), SpotLoss("nb"))
    params = jax.tree.map(np.asarray, state.params)
    count = int(state.rest["dropout"]["rngs"]["count"])

    # The reference: the same module (train mode: dropout on, same RNG state), optax by hand.
    ref = _head(x, y, dropout=0.2)
    ref.train()
    graphdef, p, rest = nnx.split(ref, nnx.Param, ...)
    p, rest = nnx.to_pure_dict(p), nnx.to_pure_dict(rest)
    def loss_fn(p_):
        return nb_nll(jnp.asarray(y), *nnx.merge(graphdef, p_, rest)(jnp.asarray(x)), mask=jnp.asarray(w)[:, None])
    loss, grads = jax.value_and_grad(loss_fn)(p)
    tx = optax.adam(1e-2)
    updates, _ = tx.update(grads, tx.init(p), p)
    expected = optax.apply_updates(p, updates)

    state, metrics = train_step(state, (jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))
    assert int(state.step) == 1
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics["loss_sum"]) == pytest.approx(float(loss) * 13, rel=1e-6)  # 13 real rows
    for a, b, before in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        assert not np.array_equal(np.asarray(a), before)
    assert int(state.rest["dropout"]["rngs"]["count"]) == count + 1  # the dropout stream advanced
    # Evaluation: dropout off, nothing changes, the loss of the module in eval mode.
    m1 = eval_step(state, (jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))
    m2 = eval_step(state, (jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))
    assert float(m1["loss"]) == float(m2["loss"])
    trained = state.module()
    assert float(m1["loss"]) == pytest.approx(
        float(nb_nll(jnp.asarray(y[:13]), *trained(jnp.asarray(x[:13])))), rel=1e-6)


def test_steps_compile_once_per_architecture_and_optimiser(data):
    x, y, w = data
    batch = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
    before = train_step._cache_size()
    for seed in (1, 2, 3):  # new modules, new states: the same program
        state = TrainState.create(_head(x, y, seed=seed), adam(3.21e-3), SpotLoss("nb"))
        train_step(state, batch)
    assert train_step._cache_size() == before + 1
    train_step(TrainState.create(_head(x, y), adam(4.32e-3), SpotLoss("nb")), batch)   # another optimiser
    train_step(TrainState.create(_head(x, y), adam(3.21e-3), SpotLoss("mse_log1p")), batch)  # another loss
    assert train_step._cache_size() == before + 3


def test_members_step_equals_each_member_alone_and_stopped_members_keep_their_state(data, rng):
    x, y, w = data
    keys = jax.random.split(jax.random.key(0), 3)
    stacked = init_head_from_data(create_members(lambda r: NBHead(D, G, rngs=r, dropout=0.1), keys), x, y)
    state = TrainState.create(stacked, adam(1e-2), SpotLoss("nb"), n_members=3)
    assert state.step.shape == (3,)
    # Each member its own batch (its own data order).
    xs = np.stack([x[rng.permutation(B)] for _ in range(3)])
    ys = np.stack([y] * 3)
    ws = np.stack([w] * 3)
    alone = []
    for m in range(3):
        one = jax.tree.map(lambda a: a[m], state)  # noqa: B023
        one = one.replace(opt_state=jax.tree.map(jnp.copy, one.opt_state))
        alone.append(train_step(one, (jnp.asarray(xs[m]), jnp.asarray(ys[m]), jnp.asarray(ws[m])))[0])
    old_member_1 = _member(state.arrays(), 1)
    active = jnp.asarray([True, False, True])
    state, metrics = members_train_step(state, (jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(ws)), active)
    assert metrics["loss"].shape == (3,)
    np.testing.assert_array_equal(np.asarray(state.step), [1, 0, 1])
    for m in (0, 2):
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(alone[m].params)):
            np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b), rtol=1e-6, atol=1e-7)
    for a, b in zip(_member(state.arrays(), 1), old_member_1):
        np.testing.assert_array_equal(a, b)  # params, optimiser, dropout stream and step untouched
    # Evaluation: every member on one shared batch.
    ev = members_eval_step(state, (jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))
    for m in (0, 2):
        assert float(ev["loss"][m]) == pytest.approx(
            float(eval_step(alone[m], (jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))["loss"]), rel=1e-6)
