"""The step guard (lsq_jax.optim.step_guard): clipping, the skip test and what a skipped step keeps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsq_jax.optim.lr_controller import scale_by_lr_controller
from lsq_jax.optim.step_guard import step_guard

from trees import assert_trees_bitwise_equal


def test_guard_clips_and_optional_skip_norm():
    g_small = {"w": jnp.asarray([3.0, 4.0])}      # norm 5
    g_mid = {"w": jnp.asarray([30.0, 40.0])}      # norm 50
    g_big = {"w": jnp.asarray([300.0, 400.0])}    # norm 500
    reference = step_guard(optax.identity(), clip_norm=100.0)
    strict = step_guard(optax.identity(), clip_norm=100.0, skip_norm=10.0)
    params = {"w": jnp.zeros(2)}
    # Default (reference): clip only, never skip finite steps.
    u, s = jax.jit(reference.update)(g_big, reference.init(params))
    np.testing.assert_allclose(u["w"], [60.0, 80.0], rtol=1e-15)
    assert int(s.skipped) == 0
    u, s = jax.jit(reference.update)(g_mid, reference.init(params))
    np.testing.assert_array_equal(u["w"], g_mid["w"])
    # skip_norm tests the PRE-clip norm.
    u, s = jax.jit(strict.update)(g_small, strict.init(params))
    np.testing.assert_array_equal(u["w"], g_small["w"])
    assert int(s.skipped) == 0
    for g in (g_mid, g_big):
        u, s = jax.jit(strict.update)(g, strict.init(params))
        np.testing.assert_array_equal(u["w"], [0.0, 0.0])
        assert int(s.skipped) == 1
    # No clipping at all, still skipping non-finite.
    unclipped = step_guard(optax.identity(), clip_norm=None)
    u, s = unclipped.update(g_big, unclipped.init(params))
    np.testing.assert_array_equal(u["w"], g_big["w"])
    u, s = unclipped.update({"w": jnp.asarray([1.0, np.nan])}, unclipped.init(params))
    assert int(s.skipped) == 1 and not np.any(u["w"])


def test_guard_skips_when_the_norm_overflows():
    guard = step_guard(optax.identity())
    g = {"w": jnp.asarray([1e200, 1e200], jnp.float64)}  # finite entries, the squared norm overflows
    u, s = guard.update(g, guard.init({"w": jnp.zeros(2)}))
    assert int(s.skipped) == 1 and not np.any(u["w"])


def test_bare_guard_keeps_every_inner_leaf_on_a_skipped_step():
    # A bare step_guard (no on_skip) keeps every inner leaf, the metric EMA included.
    ctrl = scale_by_lr_controller(0.1, schedule="adaptive", step_rate=1, gamma=0.5)
    guard = step_guard(ctrl)
    s0 = guard.init(jnp.zeros(2))
    _, s1 = guard.update(jnp.asarray([np.nan, 1.0]), s0, grad_metric=0.1)
    assert_trees_bitwise_equal(s1.inner_state, s0.inner_state)


def test_guard_validates_hyperparameters():
    with pytest.raises(ValueError, match="clip_norm: got -1"):
        step_guard(optax.identity(), clip_norm=-1.0)
