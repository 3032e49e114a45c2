"""The valley step of LM's slow phase (lsq_jax.optim.lm: jacobian_qr, valley_predictor, valley_step and
lm_iteration(valley=True)) against numpy, on a residual with a curved valley: r = A theta + 0.5 [theta^T
B_i theta]_i - b, whose Jacobian A + [theta^T B_i]_i is explicit; on one device and on 2 emulated devices."""
import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.optim import lm

from xla_env import run_on_devices

N, K, P, CHUNKS = 24, 3, 8, 4


def problem(orders=3.0, curvature=1e-3):
    """(params, batch, A, B, b): A's columns span `orders` orders of magnitude, B_i symmetric of size
    `curvature`, b such that r vanishes at a theta*, and the start 0.1 from theta* in every coordinate."""
    rng = np.random.default_rng(7)
    A = rng.standard_normal((N * K, P)) * np.logspace(0, -orders, P)
    B = rng.standard_normal((N * K, P, P)) * curvature
    B = B + np.swapaxes(B, 1, 2)
    solution = rng.standard_normal(P)
    b = A @ solution + 0.5 * np.einsum("ipq,p,q->i", B, solution, solution)
    params = {"t": jnp.asarray(solution + 0.1 * rng.standard_normal(P))}
    batch = tuple(jnp.asarray(x) for x in (A.reshape(N, K, P), B.reshape(N, K, P, P), b.reshape(N, K)))
    return params, batch, A, B, b


def residual_fn(params, chunk):
    A, B, b = chunk
    t = params["t"]
    return jnp.einsum("nkp,p->nk", A, t) + 0.5 * jnp.einsum("nkpq,p,q->nk", B, t, t) - b


def chunk_order():
    """The residuals' order in lsq_jax.optim.lm's strided chunks (chunk c: problems c, c + C, ...)."""
    problems = np.concatenate([np.arange(c, N, CHUNKS) for c in range(CHUNKS)])
    return (problems[:, None] * K + np.arange(K)).reshape(-1)


def numpy_residual(theta, A, B, b):
    return A @ theta + 0.5 * np.einsum("ipq,p,q->i", B, theta, theta) - b, A + np.einsum("ipq,q->ip", B, theta)


def numpy_valley(theta, A, B, b, damping, predictor_damping=lm.VALLEY_DAMPING):
    """The valley step by numpy, D the mean of diag(J^T J) / M: the predictor by least squares on [J; sqrt(M
    lam_v D)] (lam_v `predictor_damping`), then for each scale the chord corrections at `damping` D with J
    fixed; (step, loss, scale) of the lowest loss, the predictor and D."""
    r, J = numpy_residual(theta, A, B, b)
    m = r.size
    D = np.full(P, np.trace(J.T @ J) / P / m)
    aug = np.vstack([J, np.diag(np.sqrt(m * predictor_damping * D))])
    v = np.linalg.lstsq(aug, -np.concatenate([r, np.zeros(P)]), rcond=None)[0]
    damped = J.T @ J / m + damping * np.diag(D)
    best = None
    for a in lm.VALLEY_SCALES:
        x = theta + a * v
        for _ in range(lm.VALLEY_CORRECTIONS):
            x = x - np.linalg.solve(damped, J.T @ numpy_residual(x, A, B, b)[0] / m)
        loss = np.mean(numpy_residual(x, A, B, b)[0] ** 2)
        if best is None or loss < best[1]:
            best = (x - theta, loss, a)
    return best, v, D


def test_jacobian_qr_factors_j_and_r_without_forming_jtj():
    params, batch, A, B, b = problem()
    theta, f, _ = lm._flat(residual_fn, params, batch)
    R, Jt = lm.jacobian_qr(f, theta, batch, CHUNKS)
    r, J = numpy_residual(np.asarray(theta), A, B, b)
    Jr = np.hstack([J, r[:, None]])
    gram = np.asarray(R).T @ np.asarray(R)
    np.testing.assert_allclose(gram, Jr.T @ Jr, rtol=0, atol=1e-14 * np.abs(Jr.T @ Jr).max())
    assert np.allclose(np.tril(np.asarray(R), -1), 0)
    # Jt holds J's rows in the chunks' order
    np.testing.assert_allclose(np.swapaxes(np.asarray(Jt), 1, 2).reshape(-1, P), J[chunk_order()], rtol=1e-13,
                               atol=1e-15)


def test_valley_predictor_is_the_damped_least_squares_solution():
    params, batch, A, B, b = problem(orders=9.0, curvature=0.0)  # J's squared singular values to 1e-18
    theta, f, m = lm._flat(residual_fn, params, batch)
    R, _ = lm.jacobian_qr(f, theta, batch, CHUNKS)
    (_, _, _), expected, D = numpy_valley(np.asarray(theta), A, B, b, 1.0)
    got = np.asarray(lm.valley_predictor(R, lm.VALLEY_DAMPING, jnp.asarray(D), m))
    assert np.linalg.norm(got - expected) < 1e-8 * np.linalg.norm(expected)


@pytest.mark.parametrize("predictor_damping", [1e-16, lm.VALLEY_DAMPING, 1e-12])
def test_valley_predictor_by_cg_is_the_damped_least_squares_solution(predictor_damping):
    """CG's products go through the held Jacobian, so the formed J^T J only preconditions: J's squared
    singular values span 1e-18 of the largest, and with J^T J perturbed by 1e-14 of its largest entry (the
    round-off it carries at scale) the predictor stays the least-squares solution, where a Cholesky solve
    of the perturbed matrix fails or is far off."""
    params, batch, A, B, b = problem(orders=9.0, curvature=0.0)
    theta, f, m = lm._flat(residual_fn, params, batch)
    _, Jt = lm.held_jacobian(f, theta, batch, CHUNKS)
    JtJ, Jtr, _ = lm.normal_equations(residual_fn, params, batch, CHUNKS)
    noise = np.random.default_rng(1).standard_normal((P, P))
    rounded = JtJ + (noise + noise.T) * 1e-14 * float(jnp.abs(JtJ).max())
    (_, _, _), expected, D = numpy_valley(np.asarray(theta), A, B, b, 1.0, predictor_damping)
    for formed in (JtJ, rounded):
        got = np.asarray(lm.valley_predictor_cg(Jt, formed, Jtr, predictor_damping, jnp.asarray(D), m))
        assert np.linalg.norm(got - expected) < 1e-8 * np.linalg.norm(expected)
    cholesky = np.asarray(lm.damped_solve(rounded, Jtr, predictor_damping, jnp.asarray(D))[0])
    assert not np.linalg.norm(cholesky - expected) < 1e-3 * np.linalg.norm(expected)  # NaN or far off


def test_valley_step_is_the_best_corrected_predictor():
    params, batch, A, B, b = problem()
    theta, f, m = lm._flat(residual_fn, params, batch)
    damping = 1e-6
    (step, loss, scale), v, D = numpy_valley(np.asarray(theta), A, B, b, damping)
    _, Jt = lm.jacobian_qr(f, theta, batch, CHUNKS)
    JtJ, Jtr, _ = lm.normal_equations(residual_fn, params, batch, CHUNKS)
    factor = lm.damped_solve(JtJ, Jtr, damping, jnp.asarray(D))[3]
    got_step, got_loss, got_scale = lm.valley_step(f, theta, batch, CHUNKS, m, Jt, jnp.asarray(v), factor)
    assert float(got_scale) == scale
    start = np.mean(numpy_residual(np.asarray(theta), A, B, b)[0] ** 2)
    assert abs(float(got_loss) - loss) < 1e-12 * start and loss < 1e-6 * start
    assert np.linalg.norm(np.asarray(got_step) - step) < 1e-8 * np.linalg.norm(step)


def iterate(valley, n_devices=0, wait=0, predictor_damping=lm.VALLEY_DAMPING, cg=False):
    """One lm_iteration at a damping so large that the LM step gains almost nothing (so the valley step is
    due where `wait` is 0), the valley step's predictor at `predictor_damping` (by CG with `cg`): (step,
    metrics) on `n_devices` emulated devices (0: no shard_map, and the new state too)."""
    params, batch, *_ = problem()
    state = lm.init_lm_state(P, damping0=1e3, valley=valley)
    if valley:
        state = state._replace(valley_wait=jnp.asarray(wait, jnp.int32),
                               valley_damping=jnp.asarray(predictor_damping, state.damping.dtype))
    run = functools.partial(lm.lm_iteration, residual_fn, state=state, max_tries=1, valley=valley, valley_cg=cg)
    if not n_devices:
        step, new_state, metrics = jax.jit(lambda p, b: run(p, b, n_chunks=CHUNKS))(params, batch)
        return np.asarray(step), jax.tree.map(np.asarray, metrics), new_state
    mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
    sharded = jax.shard_map(lambda p, b: (lambda o: (o[0], o[2]))(run(p, b, n_chunks=CHUNKS // n_devices,
                                                                      axis_name="data")),
                            mesh=mesh, in_specs=(jax.P(), jax.P("data")), out_specs=jax.P(), check_vma=False)
    place = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
    step, metrics = jax.jit(sharded)(place(params, jax.P()), place(batch, jax.P("data")))
    return np.asarray(step), jax.tree.map(np.asarray, metrics)


def expected_damping(damping, scale):
    """The next predictor damping after a try that won with `scale`, by the rule's words."""
    f = lm.VALLEY_DAMPING_FACTOR
    move = {max(lm.VALLEY_SCALES): 1 / f, min(lm.VALLEY_SCALES): f}.get(scale, 1.0)
    return float(np.clip(damping * move, *lm.VALLEY_DAMPING_RANGE))


@pytest.mark.parametrize("cg", [False, True])
@pytest.mark.parametrize("predictor_damping", [lm.VALLEY_DAMPING, 1e-12, 1e-16])
def test_lm_iteration_takes_the_valley_step_where_it_ends_lower(predictor_damping, cg):
    params, batch, A, B, b = problem()
    plain_step, plain, plain_state = iterate(False)
    step, metrics, state = iterate(True, predictor_damping=predictor_damping, cg=cg)
    assert type(plain_state) is lm.LMState and int(state.valley_wait) == 0
    assert plain["accepted"] and plain["trial_loss"] > lm.VALLEY_WHEN * plain["loss"]
    (expected, loss, scale), _, _ = numpy_valley(np.asarray(params["t"]), A, B, b, lm.VALLEY_CORRECTION_DAMPING,
                                                 predictor_damping)
    assert metrics["accepted"] and float(metrics["valley_scale"]) == scale
    assert float(metrics["valley_damping"]) == predictor_damping
    np.testing.assert_allclose(float(state.valley_damping), expected_damping(predictor_damping, scale), rtol=1e-15)
    assert abs(float(metrics["valley_loss"]) - loss) < 1e-12 * plain["loss"] and loss < plain["trial_loss"]
    assert np.linalg.norm(step - expected) < 1e-8 * np.linalg.norm(expected)
    # the LM step's own figures are unchanged
    for name in ("loss", "trial_loss", "damping", "gain_ratio"):
        assert metrics[name] == plain[name], name
    for plain_count, count in zip(plain_state, state):
        np.testing.assert_array_equal(count, plain_count)


def test_valley_waits_after_a_try_that_lost(monkeypatch):
    plain_step, plain, _ = iterate(False)
    step, metrics, state = iterate(True, wait=2)  # not due: the LM step, one iteration less to wait
    assert np.isnan(metrics["valley_loss"]) and int(state.valley_wait) == 1
    assert float(state.valley_damping) == lm.VALLEY_DAMPING  # no try, no move
    np.testing.assert_array_equal(step, plain_step)
    monkeypatch.setattr(lm, "VALLEY_SCALES", (1e3,))  # a predictor so long that the try loses
    step, metrics, state = iterate(True)
    assert metrics["valley_loss"] > plain["loss"] and metrics["valley_scale"] == 0
    assert int(state.valley_wait) == lm.VALLEY_BACKOFF
    np.testing.assert_allclose(float(state.valley_damping), lm.VALLEY_DAMPING * lm.VALLEY_DAMPING_FACTOR, rtol=1e-15)
    np.testing.assert_array_equal(step, plain_step)


@pytest.mark.parametrize("scale, valley_loss, power", [
    (2.0, 0.5, -1),  # the longest scale won: a longer predictor (a smaller damping)
    (0.3, 0.5, 1),  # the shortest won: a shorter one
    (1.0, 0.5, 0), (0.7, 0.5, 0), (0.5, 0.5, 0),
    (0.0, 0.9, -1),  # lost to the LM step, yet lowered the loss: too short
    (0.0, 1.0, 1), (0.0, 3.0, 1), (0.0, np.inf, 1),  # raised it: too long
])
def test_next_valley_damping_follows_the_try(scale, valley_loss, power):
    low, high = lm.VALLEY_DAMPING_RANGE
    for damping in (lm.VALLEY_DAMPING, low, high):
        got = lm.next_valley_damping(jnp.asarray(damping), jnp.asarray(1.0), jnp.asarray(valley_loss),
                                     jnp.asarray(scale))
        expected = np.clip(damping * lm.VALLEY_DAMPING_FACTOR**power, low, high)
        np.testing.assert_allclose(float(got), expected, rtol=1e-15)


def test_valley_is_not_tried_after_a_step_that_gained_enough():
    params, batch, *_ = problem()
    state = lm.init_lm_state(P, damping0=1e-6, valley=True)
    step, state, metrics = jax.jit(lambda p, b: lm.lm_iteration(residual_fn, p, b, state, CHUNKS, valley=True))(
        params, batch)
    assert metrics["accepted"] and metrics["trial_loss"] < lm.VALLEY_WHEN * metrics["loss"]
    assert np.isnan(metrics["valley_loss"]) and metrics["valley_scale"] == 0 and int(state.valley_wait) == 0


ON_DEVICES = textwrap.dedent("""
    import sys, numpy as np, jax
    jax.config.update("jax_enable_x64", True)
    from test_lm_valley import iterate
    step, metrics = iterate(True, 2, cg=CG)
    np.savez(sys.argv[1], step=step, **{k: metrics[k] for k in ("loss", "valley_loss", "valley_scale")})
""")


@pytest.mark.slow
@pytest.mark.parametrize("predictor", ["qr", "cg"])
def test_valley_step_on_2_devices_equals_one_device(tmp_path, predictor):
    """Each device factors its own rows and the devices' R are factored again (or CG's products sum J^T J v
    over the devices); the chord corrections sum J^T r over the devices: the step on 2 emulated devices is
    the one-device step to round-off."""
    out = tmp_path / "valley.npz"
    run_on_devices(ON_DEVICES.replace("CG", str(predictor == "cg")), out, 2)
    z = np.load(out)
    step, metrics, _ = iterate(True, cg=predictor == "cg")
    assert float(z["valley_scale"]) == float(metrics["valley_scale"]) > 0
    assert abs(float(z["valley_loss"]) - float(metrics["valley_loss"])) < 1e-12 * float(metrics["loss"])
    assert np.linalg.norm(z["step"] - step) < 1e-9 * np.linalg.norm(step)
