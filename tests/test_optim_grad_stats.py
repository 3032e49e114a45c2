"""Gradient statistics (lsq_jax.optim.grad_stats) against the reference's saved values and a loop of
jax.grad."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lsq_jax.optim import grad_stats

STAT_KEYS = ("gradient_l1_norm", "gradient_l2_norm", "gradient_mean", "gradient_variance",
             "gradient_cosine_mean", "gradient_cosine_variance")
GT_KEYS = ("gradient_mean", "gradient_variance", "gradient_cosine_mean", "gradient_cosine_variance")


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


@pytest.fixture(scope="module")
def ref(reference_dir):
    return np.load(reference_dir / "grad_stats.npz")


def test_stats_match_reference(ref):
    stats = jax.jit(grad_stats.gradient_stats)(jnp.asarray(ref["gradients"]))
    assert set(stats) == set(STAT_KEYS)
    for key in STAT_KEYS:
        assert stats[key].dtype == jnp.float64
        assert _rel(stats[key], ref[key]) <= 1e-14, key
    # The saved values are also what `meta` reports.
    reported = json.loads(str(ref["meta"]))["reported"]
    for key in STAT_KEYS:
        assert _rel(stats[key], reported[key]) <= 1e-14, key


def test_stats_vs_gt_match_reference(ref):
    g, gt = jnp.asarray(ref["gradients"]), jnp.asarray(ref["gt_gradient"])
    stats = jax.jit(grad_stats.gradient_stats_vs)(g, gt)
    assert set(stats) == {f"gt_{k}" for k in GT_KEYS}
    for key in GT_KEYS:
        assert _rel(stats[f"gt_{key}"], ref[f"gt_{key}"]) <= 1e-14, key


def test_intermediate_cosines_match_reference(ref):
    g = jnp.asarray(ref["gradients"])
    np.testing.assert_allclose(grad_stats.consecutive_cosines(g), ref["intermediate/cosine_consecutive"],
                               rtol=1e-14, atol=0)
    np.testing.assert_allclose(grad_stats.cosines_vs(g, jnp.asarray(ref["gt_gradient"])),
                               ref["intermediate/cosine_vs_gt"], rtol=1e-14, atol=0)


def test_ema_history_stats_with_prefix(reference_dir):
    # The reference also logs the stats of the EMA filter's history under the prefix "ema".
    z = np.load(reference_dir / "ema.npz")
    stats = grad_stats.gradient_stats(jnp.asarray(z["grad_history_final"]), prefix="ema")
    for key in STAT_KEYS:
        assert _rel(stats[f"ema_{key}"], z[f"history_stats/ema_{key}"]) <= 1e-14, key


def test_stats_against_numpy_formulas():
    # An independent numpy computation on fresh data (as gradient_stats's docstring words the statistics)
    g = np.random.default_rng(0).normal(size=(9, 13)) + 0.5
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    cos = np.array([unit[i - 1] @ unit[i] for i in range(1, 9)])
    expected = {
        "gradient_l1_norm": np.abs(g).sum(1).mean(),
        "gradient_l2_norm": np.sqrt((g ** 2).sum(1)).mean(),
        "gradient_mean": np.abs(g).mean(0).mean(),
        "gradient_variance": g.var(0, ddof=1).mean(),
        "gradient_cosine_mean": cos.mean(),
        "gradient_cosine_variance": cos.var(ddof=1),
    }
    stats = grad_stats.gradient_stats(jnp.asarray(g))
    for key, value in expected.items():
        assert _rel(stats[key], value) <= 1e-13, key


def test_stats_reject_bad_shapes():
    with pytest.raises(ValueError, match="grads_NxP"):
        grad_stats.gradient_stats(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="grads_NxP"):
        grad_stats.gradient_stats(jnp.ones((5,)))


def _toy_problem():
    """A small two-leaf model whose per-key loss draws its own mini-batch from the key."""
    k = jax.random.key(3)
    params = {"w": jax.random.normal(k, (4, 3)), "b": {"c": jnp.arange(3.0)}}

    def loss_fn(p, key):
        x = jax.random.normal(key, (16, 4))
        y = jnp.sin(x[:, :3])
        pred = jnp.tanh(x @ p["w"] + p["b"]["c"])
        return jnp.mean((pred - y) ** 2)

    return params, loss_fn


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.slow
def test_batched_gradients_match_python_loop(chunk_size):
    params, loss_fn = _toy_problem()
    keys = jax.random.split(jax.random.key(7), 8)
    batched = jax.jit(lambda p, ks: grad_stats.batched_gradients(loss_fn, p, ks, chunk_size=chunk_size))(
        params, keys)
    assert batched.shape == (8, 4 * 3 + 3)
    assert batched.dtype == jnp.float64
    looped = []
    for i in range(8):
        g = jax.grad(loss_fn)(params, keys[i])
        looped.append(np.concatenate([np.ravel(g["b"]["c"]), np.ravel(g["w"])]))  # ravel_pytree's leaf order
    np.testing.assert_allclose(batched, np.stack(looped), rtol=1e-13, atol=1e-15)


@pytest.mark.slow
def test_batched_gradients_with_batches_and_legacy_keys():
    params, loss_fn = _toy_problem()
    # A pytree of pre-drawn batches, leading axis N.
    xs = {"x": jax.random.normal(jax.random.key(1), (5, 16, 4))}

    def batch_loss(p, batch):
        return jnp.sum(jnp.tanh(batch["x"] @ p["w"] + p["b"]["c"]) ** 2)

    batched = grad_stats.batched_gradients(batch_loss, params, xs)
    for i in range(5):
        g = jax.grad(batch_loss)(params, {"x": xs["x"][i]})
        np.testing.assert_allclose(batched[i], ravel_pytree(g)[0], rtol=1e-13, atol=1e-15)
    # Legacy uint32 keys, shape (N, 2), work too.
    legacy = jax.random.split(jax.random.PRNGKey(0), 4)
    assert grad_stats.batched_gradients(loss_fn, params, legacy).shape == (4, 15)


def test_batched_gradient_stats_is_stats_of_batched_gradients():
    params, loss_fn = _toy_problem()
    keys = jax.random.split(jax.random.key(11), 6)
    stats = jax.jit(lambda p: grad_stats.batched_gradient_stats(loss_fn, p, keys))(params)
    looped = np.stack([ravel_pytree(jax.grad(loss_fn)(params, keys[i]))[0] for i in range(6)])
    expected = grad_stats.gradient_stats(jnp.asarray(looped))
    for key in STAT_KEYS:
        assert _rel(stats[key], expected[key]) <= 1e-12, key


def test_batched_gradients_rejects_bad_chunk_size():
    params, loss_fn = _toy_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        grad_stats.batched_gradients(loss_fn, params, jax.random.split(jax.random.key(0), 4), chunk_size=0)
