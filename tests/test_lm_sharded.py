"""LM with J^T J split by rows over the devices (lsq_jax.optim.lm.lm_iteration_sharded and its block
Cholesky), and the matrix-free CG path across devices: against numpy's solve of the damped normal equations
and against the Cholesky path, on one device and on 2 and 4 emulated devices (one subprocess)."""
import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lsq_jax.optim import lm

from xla_env import run_on_devices

D_IN, HIDDEN, K_OUT, N = 3, 6, 3, 48  # P = 3 * 6 + 6 + 6 * 3 + 3 = 45: padded to 46 on 2 devices, 48 on 4
DAMPING = 0.3  # lam: with the isotropic scaling, cond(JtJ + lam D) stays below ~200


def mlp_residual(params, batch):
    x, y = batch
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"] - y


def problem():
    rng = np.random.default_rng(3)
    params = {"w1": rng.normal(size=(D_IN, HIDDEN)) / np.sqrt(D_IN), "b1": 0.1 * rng.normal(size=HIDDEN),
              "w2": rng.normal(size=(HIDDEN, K_OUT)) / np.sqrt(HIDDEN), "b2": 0.1 * rng.normal(size=K_OUT)}
    x = rng.normal(size=(N, D_IN))
    return jax.tree.map(jnp.asarray, params), (jnp.asarray(x), jnp.asarray(np.sin(x[:, :K_OUT] * 2.0)))


def numpy_step(params, batch):
    """The damped Gauss-Newton step with the isotropic scaling, J by forward mode, solved by numpy."""
    theta, unravel = ravel_pytree(params)
    f = lambda t: mlp_residual(unravel(t), batch).reshape(-1)
    r, J = np.asarray(f(theta)), np.asarray(jax.jacfwd(f)(theta))
    JtJ, Jtr = J.T @ J / r.size, J.T @ r / r.size
    D = np.full(theta.size, np.mean(np.diag(JtJ)))
    return np.linalg.solve(JtJ + DAMPING * np.diag(D), -Jtr)


ITERATIONS = {
    "cholesky": functools.partial(lm.lm_iteration, max_tries=1),
    "sharded": functools.partial(lm.lm_iteration_sharded, max_tries=1),
    "cg": functools.partial(lm.lm_iteration_cg, max_tries=1, tol=1e-14, maxiter=200),
}


def step_on(solver, n_devices, geodesic=False, n_chunks=1):
    """The proposed step of one `solver` iteration on the first `n_devices` devices (0: no shard_map)."""
    params, batch = problem()
    state = lm.init_lm_state(ravel_pytree(params)[0].size, damping0=DAMPING)
    iterate = functools.partial(ITERATIONS[solver], mlp_residual, geodesic=geodesic)
    if not n_devices:
        return np.asarray(jax.jit(lambda p, b: iterate(p, b, state, n_chunks)[0])(params, batch))
    mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
    run = jax.shard_map(lambda p, b: iterate(p, b, state, n_chunks, axis_name="data")[0], mesh=mesh,
                        in_specs=(jax.P(), jax.P("data")), out_specs=jax.P(), check_vma=False)
    place = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
    return np.asarray(jax.jit(run)(place(params, jax.P()), place(batch, jax.P("data"))))


def rows_on(n_devices, n_chunks):
    """Every device's rows of JtJ (row_sharded_normal_equations), stacked in device order: (P', P')."""
    params, batch = problem()
    mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
    build = lambda p, b: lm.row_sharded_normal_equations(mlp_residual, p, b, n_chunks, axis_name="data")[0]
    run = jax.shard_map(build, mesh=mesh, in_specs=(jax.P(), jax.P("data")), out_specs=jax.P("data"),
                        check_vma=False)
    place = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
    return np.asarray(jax.jit(run)(place(params, jax.P()), place(batch, jax.P("data"))))


def spd_problem(size=45, padded=48):
    """A positive definite matrix (condition about 40) padded as the sharded path pads (1 on the padding's
    diagonal), a right-hand side zero on the padding, and numpy's factor and solution."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(size, 2 * size))
    a = np.eye(padded)
    a[:size, :size] = x @ x.T / (2 * size) + 1e-3 * np.eye(size)
    rhs = np.zeros(padded)
    rhs[:size] = rng.normal(size=size)
    return a, rhs, np.linalg.cholesky(a), np.linalg.solve(a, rhs)


def cholesky_on(n_devices, padded):
    """(factor, solution) of spd_problem by sharded_cholesky and sharded_cho_solve on `n_devices` (0: none)."""
    a, rhs, _, _ = spd_problem(padded=padded)
    solve = lambda rows, v, axis=None: (lm.sharded_cholesky(rows, axis),
                                        lm.sharded_cho_solve(lm.sharded_cholesky(rows, axis), v, axis))
    if not n_devices:
        return tuple(np.asarray(x) for x in jax.jit(solve)(a, rhs))
    mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
    run = jax.shard_map(functools.partial(solve, axis="data"), mesh=mesh, in_specs=(jax.P("data"), jax.P()),
                        out_specs=(jax.P("data"), jax.P()), check_vma=False)
    place = lambda x, spec: jax.device_put(jnp.asarray(x), jax.NamedSharding(mesh, spec))
    return tuple(np.asarray(x) for x in jax.jit(run)(place(a, jax.P("data")), place(rhs, jax.P())))


def assert_factor_and_solution(factor, solution, padded):
    _, _, expected_factor, expected = spd_problem(padded=padded)
    np.testing.assert_allclose(factor, expected_factor, rtol=0, atol=1e-12)
    assert rel_err(solution, expected) < 1e-11 and np.all(solution[45:] == 0)


def test_sharded_cholesky_on_one_device_is_numpys():
    assert_factor_and_solution(*cholesky_on(0, 45), 45)


def test_damped_rows_add_the_damping_to_this_devices_diagonal_and_1_to_the_padding():
    rows = jnp.asarray(np.arange(12.0).reshape(2, 6))  # rows 0, 1 of a 6 x 6 matrix, P = 4 padded to 6
    got = np.asarray(lm.damped_rows(rows, 0.5, jnp.asarray([2.0, 4.0, 6.0, 8.0])))
    np.testing.assert_array_equal(got, np.arange(12.0).reshape(2, 6) + np.array([[1, 0, 0, 0, 0, 0],
                                                                                   [0, 2, 0, 0, 0, 0]]))


def numpy_gram(params, batch):
    """J^T J / M with J by forward mode."""
    theta, unravel = ravel_pytree(params)
    J = np.asarray(jax.jacfwd(lambda t: mlp_residual(unravel(t), batch).reshape(-1))(theta))
    return J.T @ J / J.shape[0]


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("solver", ["sharded", "cg"])
def test_one_device_step_is_the_numpy_solve(solver):
    params, batch = problem()
    expected = numpy_step(params, batch)
    # CG's D is a Hutchinson estimate of the same mean diagonal: its step is the damped solve of its own D
    assert rel_err(step_on(solver, 0), expected) < (1e-11 if solver == "sharded" else 0.2)


def test_sharded_step_equals_the_cholesky_step_with_the_acceleration():
    assert rel_err(step_on("sharded", 0, geodesic=True), step_on("cholesky", 0, geodesic=True)) < 1e-11


def test_row_sharded_matvec_and_diagonal_on_one_device():
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)))
    v = np.arange(5.0)
    np.testing.assert_array_equal(lm.row_sharded_matvec(rows)(v), rows @ v)
    np.testing.assert_array_equal(lm.row_sharded_diagonal(rows, 5), np.diag(rows))
    assert [lm.padded_size(51, n) for n in (1, 2, 4, 17)] == [51, 52, 52, 51]


ON_DEVICES = textwrap.dedent("""
    import sys, numpy as np, jax
    jax.config.update("jax_enable_x64", True)
    from test_lm_sharded import cholesky_on, rows_on, step_on
    assert jax.device_count() == 4
    steps = {f"{solver}_{n}_{chunks}": step_on(solver, n, geodesic=True, n_chunks=chunks)
             for solver, n, chunks in (("sharded", 2, 3), ("sharded", 4, 2), ("cg", 2, 2))}
    rows = {f"rows_{n}_{chunks}": rows_on(n, chunks) for n, chunks in ((2, 3), (4, 2))}
    factors = {f"{what}_{n}": x for n in (2, 4) for what, x in zip(("factor", "solution"), cholesky_on(n, 48))}
    np.savez(sys.argv[1], **steps, **rows, **factors)
""")


@pytest.mark.slow
def test_sharded_and_cg_steps_on_2_and_4_devices_equal_one_device(tmp_path):
    """The row-sharded step (P = 45, padded to 46 and 48; on 2 and 4 devices) equals the Cholesky step on one
    device, and CG's step on 2 devices its step on one, to round-off, with the geodesic acceleration; the
    devices' rows of J^T J, stacked, are numpy's J^T J; the block Cholesky over them is numpy's."""
    out = tmp_path / "steps.npz"
    run_on_devices(ON_DEVICES, out, 4)
    z = np.load(out)
    cholesky = step_on("cholesky", 0, geodesic=True)
    assert rel_err(z["sharded_2_3"], cholesky) < 1e-11 and rel_err(z["sharded_4_2"], cholesky) < 1e-11
    assert rel_err(z["cg_2_2"], step_on("cg", 0, geodesic=True, n_chunks=4)) < 1e-11
    gram = numpy_gram(*problem())
    for name, padded in (("rows_2_3", 46), ("rows_4_2", 48)):  # each device built only its own rows
        expected = np.pad(gram, (0, padded - gram.shape[0]))
        np.testing.assert_allclose(z[name], expected, rtol=0, atol=1e-13 * np.abs(gram).max())
    for n in (2, 4):  # the block Cholesky over the devices: 2 and 4 blocks of 24 and 12 rows
        assert_factor_and_solution(z[f"factor_{n}"], z[f"solution_{n}"], 48)


# --------------------------------------------------------------------------------------------------
# optim.lm_solver='auto': the plan's pick.


def lm_experiment(**overrides):
    from lsq_jax.config.experiment import experiment_from_config

    from config_files import get_config
    config = get_config("baseconv", "lm")
    config.update_from_flattened_dict({"task.n_dims": 2, "model.n_embd": 7, "model.n_layer": 2,
                                       "train.batch_size": 48, "train.eval_batch_size": 64, **overrides})
    return experiment_from_config(config)


@pytest.mark.parametrize("n_devices, limit, picked", [
    (1, None, "cholesky"), (2, 100, "cholesky"), (2, 99, "sharded"), (2, 49, "cg"), (1, 99, "cg"), (2, 1, "cg")])
def test_auto_picks_the_first_solver_whose_training_estimate_fits(n_devices, limit, picked):
    """The training estimate leaves out the final test batch; with nothing fitting, CG (the plan then refuses
    the run if it does not fit either)."""
    from lsq_jax.plan.run import pick_lm_solver

    need = {"cholesky": 90, "sharded": 40, "cg": 20}
    size = lambda e: (1, {"state": 10, "lm_normal_equations": need[e.optim.lm_solver], "evaluation": 10**9})
    exp, line = pick_lm_solver(lm_experiment(), size, limit, n_devices)
    assert exp.optim.lm_solver == picked and f"picked {picked!r}" in line
    assert (exp.optim.lm_tries, exp.optim.lm_cg_iters, exp.optim.lm_cg_forcing) == {
        "cholesky": (10, None, None), "sharded": (10, None, None), "cg": (1, 100, True)}[picked]


def test_the_plan_holds_the_pick_and_a_named_solver_is_kept():
    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import make_plan

    auto = make_plan(lm_experiment(), make_mesh(1))
    assert auto.exp.optim.lm_solver == "cholesky" and auto.report.exp is auto.exp
    assert auto.lm_choice.startswith("optim.lm_solver=auto picked 'cholesky'")
    small = make_plan(lm_experiment(), make_mesh(1), lm_memory_budget=auto.memory["state"] * 2)
    assert small.exp.optim.lm_solver == "cg" and small.lm_chunks == 1
    named = lm_experiment(**{"optim.lm_solver": "cholesky"})
    plan = make_plan(named, make_mesh(1), lm_memory_budget=1)
    assert plan.exp == named and plan.lm_choice == ""


def test_sharded_chunks_keep_the_gathered_jacobian_within_the_budget():
    """With 'sharded' each device gathers the chunk's Jacobians of all n devices, so the 2^22-entry budget
    holds n times the local rows: on 2 devices the fewest chunks of the 24 local problems whose gathered
    Jacobian fits, where Cholesky's local one fits in fewer."""
    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import LM_CHUNK_ENTRIES, lm_chunks, lm_outputs, make_plan

    cholesky, sharded = (lm_experiment(**{"optim.lm_solver": s}) for s in ("cholesky", "sharded"))
    task = make_plan(cholesky, make_mesh(1)).task
    k = lm_outputs(cholesky, task)
    n_params = LM_CHUNK_ENTRIES // (8 * k)  # 8 problems' local Jacobian fills the budget, 4 problems' gathered
    assert lm_chunks(cholesky, task, n_params, 2) == 3  # 24 / 3 = 8 problems
    assert lm_chunks(sharded, task, n_params, 2) == 6  # 24 / 6 = 4 problems, 2 x 4 gathered
