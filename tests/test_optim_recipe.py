"""The whole recipe (lsq_jax.optim.recipe): the guard inside it, and make_optimizer against closed-form
(numpy) optimizer sequences."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsq_jax.config.optim import OptimConfig
from lsq_jax.optim.lr_controller import applied_steps, current_lr, lr_controller_state
from lsq_jax.optim.recipe import make_optimizer, optimizer_metrics
from lsq_jax.optim.step_guard import skipped_steps

from trees import assert_trees_bitwise_equal

NAN = float("nan")


def _quadratic():
    params = {"a": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([[0.3, 0.7], [-1.1, 2.0]])}
    c = {"a": np.array([1.0, 3.0, 0.5]), "b": np.array([[2.0, 1.0], [0.25, 4.0]])}
    target = {"a": np.array([0.1, 0.2, -0.3]), "b": np.array([[1.0, -1.0], [0.5, 0.0]])}
    grad = lambda p: jax.tree.map(lambda pi, ci, ti: jnp.asarray(ci * (np.asarray(pi) - ti)), p, c, target)
    return params, grad


def _recipe_cfg(**kw):
    base = dict(optimizer="adam", lr=0.01, schedule="adaptive", step_rate=2, gamma=0.9, ema_lambda=2.0,
                no_increase_length=0)
    return OptimConfig(**{**base, **kw})


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_guard_skips_non_finite_and_changes_nothing(bad):
    tx = make_optimizer(_recipe_cfg())
    params, grad = _quadratic()
    update = jax.jit(tx.update)
    state = tx.init(params)
    for k in range(3):  # some history in every state leaf first
        updates, state = update(grad(params), state, params, grad_metric=0.5 if k == 0 else NAN)
        params = optax.apply_updates(params, updates)
    g_bad = grad(params)
    g_bad["b"] = g_bad["b"].at[1, 0].set(bad)
    updates, new_state = update(g_bad, state, params, grad_metric=NAN)
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float64 and not np.any(leaf)
    assert_trees_bitwise_equal(new_state.inner_state, state.inner_state)
    assert int(skipped_steps(new_state)) == 1 and int(skipped_steps(state)) == 0
    assert int(applied_steps(new_state)) == 3
    # The next good step is exactly the step a run without the bad one would have taken.
    u1, s1 = update(grad(params), new_state, params, grad_metric=NAN)
    u2, s2 = update(grad(params), state, params, grad_metric=NAN)
    assert_trees_bitwise_equal(u1, u2)
    assert_trees_bitwise_equal(s1.inner_state, s2.inner_state)
    assert int(s1.skipped) == 1


def test_guard_counts_consecutive_skips_without_giving_up():
    tx = make_optimizer(_recipe_cfg(ema_lambda=0.0))
    params, grad = _quadratic()
    state0 = tx.init(params)
    state = state0
    update = jax.jit(tx.update)
    for _ in range(7):
        _, state = update(jax.tree.map(lambda g: g * np.inf, grad(params)), state, params)
    assert int(skipped_steps(state)) == 7
    assert_trees_bitwise_equal(state.inner_state, state0.inner_state)


def test_metric_on_a_skipped_step_is_still_absorbed():
    # The reference updates its scheduler's metric before, and independently of, the skip test.
    tx = make_optimizer(_recipe_cfg())
    params, grad = _quadratic()
    state = tx.init(params)
    g_bad = jax.tree.map(lambda g: g * np.nan, grad(params))
    _, new_state = jax.jit(tx.update)(g_bad, state, params, grad_metric=0.1)
    assert int(skipped_steps(new_state)) == 1
    lr_state = lr_controller_state(new_state)
    assert float(lr_state.metric_ema) == pytest.approx(0.9 * 1.0 + (1 - 0.9) * 0.1, rel=1e-15)
    assert int(lr_state.applied_steps) == 0 and float(lr_state.lr) == float(current_lr(state))
    # Everything but the metric EMA (and the flag) is untouched.
    old = lr_controller_state(state)
    assert_trees_bitwise_equal(new_state.inner_state[:-1], state.inner_state[:-1])
    assert_trees_bitwise_equal(lr_state.lr, old.lr)


def _numpy_adam(p, grads_fn, lrs, b1=0.9, b2=0.999, eps=1e-16, ema=None, wd=0.0):
    """torch.optim.Adam/AdamW (eps 1e-16) on numpy arrays, with an optional gradfilter_ema in front."""
    p = {k: np.array(v, dtype=np.float64) for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    e = None
    first_adam_inputs = None
    for t, lr in enumerate(lrs, start=1):
        g = {k: np.asarray(x) for k, x in grads_fn(p).items()}
        if ema is not None:
            alpha, lam = ema
            e = {k: g[k] if e is None else e[k] for k in g}
            e = {k: alpha * e[k] + (1 - alpha) * g[k] for k in g}
            g = {k: g[k] + lam * e[k] for k in g}
        if first_adam_inputs is None:
            first_adam_inputs = g
        for k in p:
            p[k] = p[k] * (1 - lr * wd)  # AdamW's decoupled decay (a no-op for wd = 0)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat = m[k] / (1 - b1 ** t)
            v_hat = v[k] / (1 - b2 ** t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, first_adam_inputs


def _run_optimizer(cfg, params, grad, n_steps):
    tx = make_optimizer(cfg)
    state = tx.init(params)
    update = jax.jit(tx.update)
    lrs_used = []
    for _ in range(n_steps):
        lrs_used.append(float(current_lr(state)))
        updates, state = update(grad(params), state, params, grad_metric=NAN)
        params = optax.apply_updates(params, updates)
    return params, state, lrs_used


def _adaptive_lrs(lr0, gamma, step_rate, n_steps):
    """lr of applied step n under the adaptive schedule with the flag at "decay" and the initial decay."""
    return [lr0 * gamma ** (1 + n // step_rate) for n in range(n_steps)]


def test_make_optimizer_adam_matches_numpy_adam():
    params, grad = _quadratic()
    cfg = _recipe_cfg(ema_lambda=0.0, lr=0.05, step_rate=3)
    new_params, state, lrs = _run_optimizer(cfg, params, grad, 9)
    np.testing.assert_allclose(lrs, _adaptive_lrs(0.05, 0.9, 3, 9), rtol=1e-15)
    expected, _ = _numpy_adam(params, grad, _adaptive_lrs(0.05, 0.9, 3, 9))
    for k in expected:
        np.testing.assert_allclose(new_params[k], expected[k], rtol=1e-13, atol=1e-15)
    assert int(applied_steps(state)) == 9 and int(skipped_steps(state)) == 0


def test_make_optimizer_ema_then_adam_matches_numpy():
    params, grad = _quadratic()
    cfg = _recipe_cfg(ema_alpha=0.98, ema_lambda=2.0, lr=0.05, step_rate=3)
    tx = make_optimizer(cfg)
    # The first Adam input is (1 + lam) g: after one step Adam's first moment is (1 - b1) * 3 g.
    _, s1 = tx.update(grad(params), tx.init(params), params)
    mu = s1.inner_state[1].mu
    for k in params:
        np.testing.assert_allclose(mu[k], 0.1 * 3.0 * np.asarray(grad(params)[k]), rtol=1e-15)
    new_params, _, _ = _run_optimizer(cfg, params, grad, 9)
    expected, first_inputs = _numpy_adam(params, grad, _adaptive_lrs(0.05, 0.9, 3, 9), ema=(0.98, 2.0))
    for k in expected:
        np.testing.assert_allclose(first_inputs[k], 3.0 * np.asarray(grad(params)[k]), rtol=1e-15)
        np.testing.assert_allclose(new_params[k], expected[k], rtol=1e-13, atol=1e-15)


def test_make_optimizer_adamw_matches_numpy_adamw():
    params, grad = _quadratic()
    cfg = OptimConfig(optimizer="adamw", lr=0.02, schedule="constant", weight_decay=0.3)
    new_params, _, _ = _run_optimizer(cfg, params, grad, 6)
    expected, _ = _numpy_adam(params, grad, [0.02] * 6, wd=0.3)
    for k in expected:
        np.testing.assert_allclose(new_params[k], expected[k], rtol=1e-13, atol=1e-15)


def test_make_optimizer_sgd_momentum_matches_numpy():
    params, grad = _quadratic()
    cfg = OptimConfig(optimizer="sgd", lr=0.1, schedule="step", step_rate=4, gamma=0.5, momentum=0.9)
    new_params, _, lrs = _run_optimizer(cfg, params, grad, 10)
    expected_lrs = [0.1 * 0.5 ** (n // 4) for n in range(10)]
    np.testing.assert_array_equal(lrs, expected_lrs)
    p = {k: np.asarray(v) for k, v in params.items()}
    buf = None
    for lr in expected_lrs:  # torch SGD: buf = g on the first step, then buf = 0.9 buf + g
        g = {k: np.asarray(x) for k, x in grad(p).items()}
        buf = g if buf is None else {k: 0.9 * buf[k] + g[k] for k in g}
        p = {k: p[k] - lr * buf[k] for k in p}
    for k in p:
        np.testing.assert_allclose(new_params[k], p[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_float_state_follows_param_dtype(optimizer, dtype):
    cfg = OptimConfig(optimizer=optimizer, schedule="adaptive", ema_lambda=2.0,
                      weight_decay=0.0 if optimizer == "adam" else 0.01)
    params = {"w": jnp.ones((3, 2), dtype), "b": jnp.zeros(2, dtype)}
    tx = make_optimizer(cfg)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params,
                                        grad_metric=jnp.asarray(0.5))
    for leaf in jax.tree.leaves((updates, state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == dtype
        else:
            assert leaf.dtype in (jnp.int32, jnp.bool_)
    assert current_lr(state).dtype == dtype


def test_extra_args_are_forwarded_and_ignored():
    params, grad = _quadratic()
    tx = make_optimizer(_recipe_cfg())
    state = tx.init(params)
    u1, s1 = tx.update(grad(params), state, params, grad_metric=NAN, some_other_arg=3)
    u2, s2 = tx.update(grad(params), state, params)
    assert_trees_bitwise_equal((u1, s1), (u2, s2))


def test_optimizer_metrics_and_readers():
    params, grad = _quadratic()
    tx = make_optimizer(_recipe_cfg(lr=0.1, gamma=0.5))
    state = tx.init(params)
    _, state = tx.update(grad(params), state, params, grad_metric=0.2)
    metrics = optimizer_metrics(state)
    assert set(metrics) == {"learning_rate", "applied_steps", "skipped_steps",
                            "gradient_cosine_metric_lrscheduler", "lr_grow"}
    # lr0 * gamma (initial decay); one applied step is not yet a period of 2.
    assert float(metrics["learning_rate"]) == float(current_lr(state)) == 0.1 * 0.5
    assert int(metrics["applied_steps"]) == 1 and int(metrics["skipped_steps"]) == 0
    assert float(metrics["gradient_cosine_metric_lrscheduler"]) == pytest.approx(0.92, rel=1e-15)
    with pytest.raises(ValueError, match="LRControllerState"):
        current_lr(optax.adam(1e-3).init(params))
