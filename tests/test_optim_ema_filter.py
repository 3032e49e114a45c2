"""The EMA gradient filter (lsq_jax.optim.ema_filter) against the reference's gradfilter_ema."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.optim.ema_filter import ema_filter


def test_ema_filter_matches_reference(reference_dir):
    # Bitwise in eager mode; under jit XLA may fuse m * alpha + g * (1 - alpha) into an FMA, which can
    # move the last bit, hence rtol 1e-15.
    z = np.load(reference_dir / "ema.npz")
    # torch.nn.Linear(3, 2): flat vector = weight (2, 3) row-major, then bias (2,).
    unflatten = lambda v: {"weight": jnp.asarray(v[:6].reshape(2, 3)), "bias": jnp.asarray(v[6:])}
    flatten = lambda t: np.concatenate([np.ravel(t["weight"]), np.ravel(t["bias"])])
    tx = ema_filter(alpha=0.98, lam=2.0)
    state = tx.init(unflatten(np.zeros(8)))
    update = jax.jit(tx.update)
    for t in range(6):
        filtered, state = update(unflatten(z["raw_grads"][t]), state)
        np.testing.assert_allclose(flatten(filtered), z["filtered_grads"][t], rtol=1e-15, atol=0)
        np.testing.assert_allclose(flatten(state.ema), z["ema_state"][t], rtol=1e-15, atol=0)
        assert int(state.count) == t + 1
    # Op by op (no fusion) the reference's order of operations reproduces it bit for bit.
    with jax.disable_jit():
        state = tx.init(unflatten(np.zeros(8)))
        for t in range(6):
            filtered, state = tx.update(unflatten(z["raw_grads"][t]), state)
            np.testing.assert_array_equal(flatten(filtered), z["filtered_grads"][t])
            np.testing.assert_array_equal(flatten(state.ema), z["ema_state"][t])
    # The first emitted value is (1 + lam) g, with m = g.
    first, s1 = tx.update(unflatten(z["raw_grads"][0]), tx.init(unflatten(np.zeros(8))))
    np.testing.assert_allclose(flatten(first), 3.0 * z["raw_grads"][0], rtol=1e-15, atol=0)
    np.testing.assert_allclose(flatten(s1.ema), z["raw_grads"][0], rtol=1e-15, atol=0)


def test_ema_filter_recurrence_and_dtype():
    rng = np.random.default_rng(0)
    gs = rng.normal(size=(5, 4)).astype(np.float32)
    tx = ema_filter(alpha=0.9, lam=0.5)
    state = tx.init(jnp.zeros(4, jnp.float32))
    assert state.ema.dtype == jnp.float32
    m = gs[0].astype(np.float64)
    for g in gs:
        out, state = tx.update(jnp.asarray(g), state)
        m = 0.9 * m + 0.1 * g
        assert out.dtype == jnp.float32 and state.ema.dtype == jnp.float32
        np.testing.assert_allclose(out, g + 0.5 * m, rtol=1e-6)


def test_ema_filter_validates_hyperparameters():
    with pytest.raises(ValueError, match="alpha: got 2"):
        ema_filter(alpha=2.0)
    with pytest.raises(ValueError, match="lam: got -1"):
        ema_filter(lam=-1.0)
