"""The learning-rate controller (lsq_jax.optim.lr_controller) against the reference's schedulers' traces
and closed forms."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.optim.lr_controller import scale_by_lr_controller

NAN = float("nan")


def _bits(x):
    return np.asarray(x).tobytes()


@pytest.fixture(scope="module")
def schedules(reference_dir):
    return json.loads((reference_dir / "schedules.json").read_text())


def _adaptive_from_reference(c):
    return scale_by_lr_controller(
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
    tx = scale_by_lr_controller(c["base_lr"], schedule="step", step_rate=c["step_size"],
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
    tx = scale_by_lr_controller(lr0, schedule="step", step_rate=step_rate, gamma=gamma, lr_floor=floor)
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
    tx = scale_by_lr_controller(1.0, schedule="adaptive", step_rate=2, gamma=0.5, lr_floor=1e-10,
                                      initial_decay=False, metric_decay=0.0, no_increase_length=0)
    used, _ = _run_controller(tx, [0.0] * 80)
    # Step 0 sees n = 0 (not > 0): decay flag, but no boundary until n + 1 = 2. From then on, x2 per period.
    np.testing.assert_array_equal(used, [2.0 ** (n // 2) for n in range(80)])
    assert used[-1] == 2.0 ** 39  # far above lr0: growth has no cap


def test_adaptive_floor_applies_to_decay_only():
    tx = scale_by_lr_controller(1.0, schedule="adaptive", step_rate=1, gamma=0.5, lr_floor=0.1,
                                      initial_decay=True, metric_decay=0.0, no_increase_length=0)
    used, state = _run_controller(tx, [1.0] * 10 + [0.0] * 11)
    expected = [max(0.5 ** (n + 1), 0.1) for n in range(11)] + [0.1 * 2.0 ** k for k in range(1, 11)]
    np.testing.assert_array_equal(used, expected)
    assert float(state.lr) == 0.1 * 2.0 ** 11  # 204.8 > lr0


def test_no_metric_means_no_measurement():
    tx = scale_by_lr_controller(1.0, schedule="adaptive", step_rate=1, gamma=0.5, no_increase_length=0)
    state = tx.init(jnp.zeros(()))
    for metric in (None, NAN, float("inf"), jnp.nan):
        kwargs = {} if metric is None else {"grad_metric": metric}
        _, new = jax.jit(tx.update)(jnp.ones(()), state, **kwargs)
        assert float(new.metric_ema) == 1.0 and not bool(new.grow)
    _, new = tx.update(jnp.ones(()), state, grad_metric=0.5)
    assert float(new.metric_ema) == pytest.approx(0.95, rel=1e-15)


def test_initial_decay_flag_and_constant_schedule():
    no_decay = scale_by_lr_controller(0.1, schedule="adaptive", step_rate=10, gamma=0.9,
                                            initial_decay=False)
    assert float(no_decay.init(jnp.zeros(())).lr) == 0.1
    # initial_decay only concerns the adaptive schedule.
    for schedule in ("step", "constant"):
        tx = scale_by_lr_controller(0.1, schedule=schedule, step_rate=10, gamma=0.9, initial_decay=True)
        assert float(tx.init(jnp.zeros(())).lr) == 0.1
    used, _ = _run_controller(
        scale_by_lr_controller(0.1, schedule="constant", step_rate=1, gamma=0.5), [NAN] * 5)
    np.testing.assert_array_equal(used, [0.1] * 5)


def test_lr_controller_validates_hyperparameters():
    with pytest.raises(ValueError, match="learning_rate: got 0"):
        scale_by_lr_controller(0.0)
    with pytest.raises(ValueError, match="schedule: got 'linear'"):
        scale_by_lr_controller(0.1, schedule="linear")
