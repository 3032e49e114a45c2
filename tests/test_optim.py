"""The training recipe's Optax transforms (SPEC §5) against the reference's traces and closed forms."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsq_jax import optim

NAN = float("nan")


def _bits(x):
    return np.asarray(x).tobytes()


def _assert_trees_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert _bits(x) == _bits(y)


@pytest.fixture(scope="module")
def schedules(reference_dir):
    return json.loads((reference_dir / "schedules.json").read_text())


# --------------------------------------------------------------------------------------------------
# EMA filter


def test_ema_filter_matches_reference(reference_dir):
    # Bitwise in eager mode; under jit XLA may fuse m * alpha + g * (1 - alpha) into an FMA, which can
    # move the last bit, hence rtol 1e-15.
    z = np.load(reference_dir / "ema.npz")
    # torch.nn.Linear(3, 2): flat vector = weight (2, 3) row-major, then bias (2,).
    unflatten = lambda v: {"weight": jnp.asarray(v[:6].reshape(2, 3)), "bias": jnp.asarray(v[6:])}
    flatten = lambda t: np.concatenate([np.ravel(t["weight"]), np.ravel(t["bias"])])
    tx = optim.ema_filter(alpha=0.98, lam=2.0)
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
    tx = optim.ema_filter(alpha=0.9, lam=0.5)
    state = tx.init(jnp.zeros(4, jnp.float32))
    assert state.ema.dtype == jnp.float32
    m = gs[0].astype(np.float64)
    for g in gs:
        out, state = tx.update(jnp.asarray(g), state)
        m = 0.9 * m + 0.1 * g
        assert out.dtype == jnp.float32 and state.ema.dtype == jnp.float32
        np.testing.assert_allclose(out, g + 0.5 * m, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# LR controller


def _adaptive_from_reference(c):
    return optim.scale_by_lr_controller(
        c["base_lr"], schedule="adaptive", step_rate=c["step_size"], gamma=c["gamma"],
        lr_floor=c["threshold"], metric_decay=c["gradient_variance_metric_lambda"],
        metric_threshold=c["gradient_variance_threshold"], no_increase_length=c["no_increase_length"],
        initial_decay=True)


def test_adaptive_lr_matches_reference_trace(schedules):
    ref = schedules["AdaptiveStepLR"]
    tx = _adaptive_from_reference(ref["constructor"])
    state = tx.init(jnp.zeros((), jnp.float64))
    assert _bits(state.lr) == _bits(np.float64(ref["lr_after_construction"]))  # 0.09: the initial decay
    assert float(state.metric_ema) == ref["ema_initial"] and not bool(state.grow)
    updates_by_iteration = {u["iteration"]: u for u in ref["updates"]}
    update = jax.jit(tx.update)
    for i in range(120):
        metric = ref["metric_sequence"][i // 5] if i % 5 == 0 else NAN  # NaN = no measurement
        lr_in_force = ref["lr_after_construction"] if i == 0 else ref["lr_after_step"][i - 1]
        u, state = update(jnp.ones((), jnp.float64), state, grad_metric=metric)
        # Applied step i uses the lr the reference's optimizer.step() used at iteration i.
        assert _bits(-u) == _bits(np.float64(lr_in_force)), i
        assert _bits(state.lr) == _bits(np.float64(ref["lr_after_step"][i])), i
        assert int(state.applied_steps) == ref["last_epoch_after_step"][i]
        assert bool(state.grow) == (not ref["should_decrement_after_step"][i]), i
        if i in updates_by_iteration:
            rec = updates_by_iteration[i]
            assert float(state.metric_ema) == pytest.approx(rec["ema_after"], rel=1e-15, abs=0)
            assert bool(state.grow) == (not rec["should_decrement_after"])
    # The strict ">" at i = 20: the EMA is already below 0.9 but the flag still says decay.
    assert updates_by_iteration[20]["ema_after"] < 0.9 and updates_by_iteration[20]["should_decrement_after"]


def test_adaptive_lr_trace_in_one_jitted_scan(schedules):
    """The data-dependent measurement (step % 5 == 0) inside one jitted program, as in the train step."""
    ref = schedules["AdaptiveStepLR"]
    tx = _adaptive_from_reference(ref["constructor"])
    metric_seq = jnp.asarray(ref["metric_sequence"])

    def body(state, i):
        metric = jnp.where(i % 5 == 0, metric_seq[i // 5], jnp.nan)
        u, state = tx.update(jnp.ones((), jnp.float64), state, grad_metric=metric)
        return state, (-u, state.lr, state.grow, state.metric_ema)

    run = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(120)))
    _, (lr_used, lr_after, grow, ema) = run(tx.init(jnp.zeros((), jnp.float64)))
    np.testing.assert_array_equal(lr_after, ref["lr_after_step"])
    np.testing.assert_array_equal(lr_used, [ref["lr_after_construction"]] + ref["lr_after_step"][:-1])
    np.testing.assert_array_equal(~np.asarray(grow), ref["should_decrement_after_step"])
    for rec in ref["updates"]:
        assert float(ema[rec["iteration"]]) == pytest.approx(rec["ema_after"], rel=1e-15, abs=0)


def test_step_threshold_matches_reference_trace(schedules):
    ref = schedules["StepThresholdLR"]
    c = ref["constructor"]
    tx = optim.scale_by_lr_controller(c["base_lr"], schedule="step", step_rate=c["step_size"],
                                      gamma=c["gamma"], lr_floor=c["threshold"])
    state = tx.init(jnp.zeros((), jnp.float64))
    assert float(state.lr) == ref["lr_after_construction"]
    update = jax.jit(tx.update)
    for i in range(120):
        lr_in_force = ref["lr_after_construction"] if i == 0 else ref["lr_after_step"][i - 1]
        u, state = update(jnp.ones((), jnp.float64), state)
        assert float(-u) == lr_in_force, i
        assert float(state.lr) == ref["lr_after_step"][i], i
    # ... and that is the closed form, including the floor from last_epoch 70 on.
    closed = [max(0.1 * 0.5 ** ((i + 1) // 10), 1e-3) for i in range(120)]
    np.testing.assert_array_equal(ref["lr_after_step"], closed)


def test_step_threshold_closed_form_non_dyadic_gamma():
    lr0, gamma, step_rate, floor = 3e-3, 0.9, 7, 1e-3
    tx = optim.scale_by_lr_controller(lr0, schedule="step", step_rate=step_rate, gamma=gamma, lr_floor=floor)
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    for n in range(80):
        u, state = update(jnp.ones(2), state)
        np.testing.assert_allclose(-u, max(lr0 * gamma ** (n // step_rate), floor), rtol=1e-15)


def _run_controller(tx, metrics, dtype=jnp.float64):
    state = tx.init(jnp.zeros((), dtype))
    update = jax.jit(tx.update)
    used = []
    for m in metrics:
        u, state = update(jnp.ones((), dtype), state, grad_metric=m)
        used.append(float(-u))
    return np.asarray(used), state


def test_adaptive_growth_is_uncapped():
    # metric_decay 0 makes the EMA the last metric; metric 0 < threshold, so "grow" once n > 0.
    tx = optim.scale_by_lr_controller(1.0, schedule="adaptive", step_rate=2, gamma=0.5, lr_floor=1e-10,
                                      initial_decay=False, metric_decay=0.0, no_increase_length=0)
    used, _ = _run_controller(tx, [0.0] * 80)
    # Step 0 sees n = 0 (not > 0): decay flag, but no boundary until n + 1 = 2. From then on, x2 per period.
    np.testing.assert_array_equal(used, [2.0 ** (n // 2) for n in range(80)])
    assert used[-1] == 2.0 ** 39  # far above lr0: growth has no cap


def test_adaptive_floor_applies_to_decay_only():
    tx = optim.scale_by_lr_controller(1.0, schedule="adaptive", step_rate=1, gamma=0.5, lr_floor=0.1,
                                      initial_decay=True, metric_decay=0.0, no_increase_length=0)
    used, state = _run_controller(tx, [1.0] * 10 + [0.0] * 11)
    expected = [max(0.5 ** (n + 1), 0.1) for n in range(11)] + [0.1 * 2.0 ** k for k in range(1, 11)]
    np.testing.assert_array_equal(used, expected)
    assert float(state.lr) == 0.1 * 2.0 ** 11  # 204.8 > lr0


def test_no_metric_means_no_measurement():
    tx = optim.scale_by_lr_controller(1.0, schedule="adaptive", step_rate=1, gamma=0.5, no_increase_length=0)
    state = tx.init(jnp.zeros(()))
    for metric in (None, NAN, float("inf"), jnp.nan):
        kwargs = {} if metric is None else {"grad_metric": metric}
        _, new = jax.jit(tx.update)(jnp.ones(()), state, **kwargs)
        assert float(new.metric_ema) == 1.0 and not bool(new.grow)
    _, new = tx.update(jnp.ones(()), state, grad_metric=0.5)
    assert float(new.metric_ema) == pytest.approx(0.95, rel=1e-15)


def test_initial_decay_flag_and_constant_schedule():
    no_decay = optim.scale_by_lr_controller(0.1, schedule="adaptive", step_rate=10, gamma=0.9,
                                            initial_decay=False)
    assert float(no_decay.init(jnp.zeros(())).lr) == 0.1
    # initial_decay only concerns the adaptive schedule.
    for schedule in ("step", "constant"):
        tx = optim.scale_by_lr_controller(0.1, schedule=schedule, step_rate=10, gamma=0.9, initial_decay=True)
        assert float(tx.init(jnp.zeros(())).lr) == 0.1
    used, _ = _run_controller(
        optim.scale_by_lr_controller(0.1, schedule="constant", step_rate=1, gamma=0.5), [NAN] * 5)
    np.testing.assert_array_equal(used, [0.1] * 5)


# --------------------------------------------------------------------------------------------------
# Step guard


def _quadratic():
    params = {"a": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([[0.3, 0.7], [-1.1, 2.0]])}
    c = {"a": np.array([1.0, 3.0, 0.5]), "b": np.array([[2.0, 1.0], [0.25, 4.0]])}
    target = {"a": np.array([0.1, 0.2, -0.3]), "b": np.array([[1.0, -1.0], [0.5, 0.0]])}
    grad = lambda p: jax.tree.map(lambda pi, ci, ti: jnp.asarray(ci * (np.asarray(pi) - ti)), p, c, target)
    return params, grad


def _recipe_cfg(**kw):
    base = dict(optimizer="adam", lr=0.01, schedule="adaptive", step_rate=2, gamma=0.9, ema_lambda=2.0,
                no_increase_length=0)
    return optim.OptimConfig(**{**base, **kw})


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_guard_skips_non_finite_and_changes_nothing(bad):
    tx = optim.make_optimizer(_recipe_cfg())
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
    _assert_trees_bitwise_equal(new_state.inner_state, state.inner_state)
    assert int(optim.skipped_steps(new_state)) == 1 and int(optim.skipped_steps(state)) == 0
    assert int(optim.applied_steps(new_state)) == 3
    # The next good step is exactly the step a run without the bad one would have taken.
    u1, s1 = update(grad(params), new_state, params, grad_metric=NAN)
    u2, s2 = update(grad(params), state, params, grad_metric=NAN)
    _assert_trees_bitwise_equal(u1, u2)
    _assert_trees_bitwise_equal(s1.inner_state, s2.inner_state)
    assert int(s1.skipped) == 1


def test_guard_counts_consecutive_skips_without_giving_up():
    tx = optim.make_optimizer(_recipe_cfg(ema_lambda=0.0))
    params, grad = _quadratic()
    state0 = tx.init(params)
    state = state0
    update = jax.jit(tx.update)
    for _ in range(7):
        _, state = update(jax.tree.map(lambda g: g * np.inf, grad(params)), state, params)
    assert int(optim.skipped_steps(state)) == 7
    _assert_trees_bitwise_equal(state.inner_state, state0.inner_state)


def test_guard_clips_and_optional_skip_norm():
    g_small = {"w": jnp.asarray([3.0, 4.0])}      # norm 5
    g_mid = {"w": jnp.asarray([30.0, 40.0])}      # norm 50
    g_big = {"w": jnp.asarray([300.0, 400.0])}    # norm 500
    reference = optim.step_guard(optax.identity(), clip_norm=100.0)
    strict = optim.step_guard(optax.identity(), clip_norm=100.0, skip_norm=10.0)
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
    unclipped = optim.step_guard(optax.identity(), clip_norm=None)
    u, s = unclipped.update(g_big, unclipped.init(params))
    np.testing.assert_array_equal(u["w"], g_big["w"])
    u, s = unclipped.update({"w": jnp.asarray([1.0, np.nan])}, unclipped.init(params))
    assert int(s.skipped) == 1 and not np.any(u["w"])


def test_guard_skips_when_the_norm_overflows():
    guard = optim.step_guard(optax.identity())
    g = {"w": jnp.asarray([1e200, 1e200], jnp.float64)}  # finite entries, the squared norm overflows
    u, s = guard.update(g, guard.init({"w": jnp.zeros(2)}))
    assert int(s.skipped) == 1 and not np.any(u["w"])


def test_metric_on_a_skipped_step_is_still_absorbed():
    # The reference updates its scheduler's metric before, and independently of, the skip test.
    tx = optim.make_optimizer(_recipe_cfg())
    params, grad = _quadratic()
    state = tx.init(params)
    g_bad = jax.tree.map(lambda g: g * np.nan, grad(params))
    _, new_state = jax.jit(tx.update)(g_bad, state, params, grad_metric=0.1)
    assert int(optim.skipped_steps(new_state)) == 1
    lr_state = optim.lr_controller_state(new_state)
    assert float(lr_state.metric_ema) == pytest.approx(0.9 * 1.0 + (1 - 0.9) * 0.1, rel=1e-15)
    assert int(lr_state.applied_steps) == 0 and float(lr_state.lr) == float(optim.current_lr(state))
    # Everything but the metric EMA (and the flag) is untouched.
    old = optim.lr_controller_state(state)
    _assert_trees_bitwise_equal(new_state.inner_state[:-1], state.inner_state[:-1])
    assert _bits(lr_state.lr) == _bits(old.lr)
    # A bare step_guard (no on_skip) keeps every inner leaf, the metric EMA included.
    ctrl = optim.scale_by_lr_controller(0.1, schedule="adaptive", step_rate=1, gamma=0.5)
    guard = optim.step_guard(ctrl)
    s0 = guard.init(jnp.zeros(2))
    _, s1 = guard.update(jnp.asarray([np.nan, 1.0]), s0, grad_metric=0.1)
    _assert_trees_bitwise_equal(s1.inner_state, s0.inner_state)


# --------------------------------------------------------------------------------------------------
# make_optimizer against closed-form (numpy) optimizer sequences


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
    tx = optim.make_optimizer(cfg)
    state = tx.init(params)
    update = jax.jit(tx.update)
    lrs_used = []
    for _ in range(n_steps):
        lrs_used.append(float(optim.current_lr(state)))
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
    assert int(optim.applied_steps(state)) == 9 and int(optim.skipped_steps(state)) == 0


def test_make_optimizer_ema_then_adam_matches_numpy():
    params, grad = _quadratic()
    cfg = _recipe_cfg(ema_alpha=0.98, ema_lambda=2.0, lr=0.05, step_rate=3)
    tx = optim.make_optimizer(cfg)
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
    cfg = optim.OptimConfig(optimizer="adamw", lr=0.02, schedule="constant", weight_decay=0.3)
    new_params, _, _ = _run_optimizer(cfg, params, grad, 6)
    expected, _ = _numpy_adam(params, grad, [0.02] * 6, wd=0.3)
    for k in expected:
        np.testing.assert_allclose(new_params[k], expected[k], rtol=1e-13, atol=1e-15)


def test_make_optimizer_sgd_momentum_matches_numpy():
    params, grad = _quadratic()
    cfg = optim.OptimConfig(optimizer="sgd", lr=0.1, schedule="step", step_rate=4, gamma=0.5, momentum=0.9)
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
    cfg = optim.OptimConfig(optimizer=optimizer, schedule="adaptive", ema_lambda=2.0,
                            weight_decay=0.0 if optimizer == "adam" else 0.01)
    params = {"w": jnp.ones((3, 2), dtype), "b": jnp.zeros(2, dtype)}
    tx = optim.make_optimizer(cfg)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params,
                                        grad_metric=jnp.asarray(0.5))
    for leaf in jax.tree.leaves((updates, state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == dtype
        else:
            assert leaf.dtype in (jnp.int32, jnp.bool_)
    assert optim.current_lr(state).dtype == dtype


def test_extra_args_are_forwarded_and_ignored():
    params, grad = _quadratic()
    tx = optim.make_optimizer(_recipe_cfg())
    state = tx.init(params)
    u1, s1 = tx.update(grad(params), state, params, grad_metric=NAN, some_other_arg=3)
    u2, s2 = tx.update(grad(params), state, params)
    _assert_trees_bitwise_equal((u1, s1), (u2, s2))


def test_optimizer_metrics_and_readers():
    params, grad = _quadratic()
    tx = optim.make_optimizer(_recipe_cfg(lr=0.1, gamma=0.5))
    state = tx.init(params)
    _, state = tx.update(grad(params), state, params, grad_metric=0.2)
    metrics = optim.optimizer_metrics(state)
    assert set(metrics) == {"learning_rate", "applied_steps", "skipped_steps",
                            "gradient_cosine_metric_lrscheduler", "lr_grow"}
    # lr0 * gamma (initial decay); one applied step is not yet a period of 2.
    assert float(metrics["learning_rate"]) == float(optim.current_lr(state)) == 0.1 * 0.5
    assert int(metrics["applied_steps"]) == 1 and int(metrics["skipped_steps"]) == 0
    assert float(metrics["gradient_cosine_metric_lrscheduler"]) == pytest.approx(0.92, rel=1e-15)
    with pytest.raises(ValueError, match="LRControllerState"):
        optim.current_lr(optax.adam(1e-3).init(params))


# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("field, value", [
    ("optimizer", "rmsprop"), ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", "0.1"),
    ("schedule", "cosine"), ("step_rate", 0), ("step_rate", 2.5), ("step_rate", True),
    ("gamma", 0.0), ("gamma", 1.5), ("lr_floor", -1e-10), ("initial_decay", 1), ("metric_decay", 1.5),
    ("metric_threshold", math.inf), ("no_increase_length", -1), ("clip_norm", 0.0), ("skip_norm", -1.0),
    ("ema_alpha", 1.2), ("ema_lambda", -0.5), ("b1", 1.0), ("b2", -0.1), ("eps", -1e-16),
    ("weight_decay", -1.0), ("momentum", 1.5), ("l1", -1.0),
])
def test_config_rejects_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"OptimConfig.{field} = ") as info:
        optim.OptimConfig(**{field: value})
    assert repr(value) in str(info.value) and "allowed" in str(info.value)


def test_config_weight_decay_only_for_adamw_and_sgd():
    with pytest.raises(ValueError, match="weight_decay"):
        optim.OptimConfig(optimizer="adam", weight_decay=0.1)
    optim.OptimConfig(optimizer="adamw", weight_decay=0.1)
    optim.OptimConfig(optimizer="sgd", weight_decay=0.1)
    cfg = optim.OptimConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # frozen


def test_factories_validate_hyperparameters():
    with pytest.raises(ValueError, match="alpha = 2"):
        optim.ema_filter(alpha=2.0)
    with pytest.raises(ValueError, match="lam = -1"):
        optim.ema_filter(lam=-1.0)
    with pytest.raises(ValueError, match="learning_rate = 0"):
        optim.scale_by_lr_controller(0.0)
    with pytest.raises(ValueError, match="schedule = 'linear'"):
        optim.scale_by_lr_controller(0.1, schedule="linear")
    with pytest.raises(ValueError, match="clip_norm = -1"):
        optim.step_guard(optax.identity(), clip_norm=-1.0)
