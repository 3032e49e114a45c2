"""Levenberg-Marquardt as a trainer of the system: its step against numpy, convergence from the exact
explicit-gradient weights plus noise, the hybrid's phases, and bit-identical resume through the CLI."""
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lsq_jax import main
from lsq_jax.checkpoint import Checkpointer, abstract_like
from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.data.keys import run_keys
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.eval import report as eval_report
from lsq_jax.mesh import make_mesh, replicated
from lsq_jax.models.backbone import SequenceModel
from lsq_jax.models.exact_weights import explicit_gradient_params
from lsq_jax.optim import lm, lr_controller
from lsq_jax.plan.run import make_plan
from lsq_jax.train.state import init_state, place_state
from lsq_jax.train.step import Steps, advance, example_loss, lm_residuals
from steps import full_size_fns, initial_state

from config_files import get_config
from xla_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

EPS = np.finfo(np.float64).eps
TINY = {"task.n_dims": 2, "model.n_embd": 7, "model.n_layer": 2, "train.batch_size": 300,
        "train.eval_batch_size": 64}  # width D(D+5)/2 = 7: the exact weights fit


def tiny_experiment(**overrides):
    c = get_config("baseconv", "lm")
    c.update_from_flattened_dict({**TINY, **overrides})
    return experiment_from_config(c)


def lm_batch(exp, step=0):
    """The residuals, targets' mean square and the keys of the problems LM fits at iteration `step`."""
    index = (step - exp.optim.lm_after) // exp.optim.lm_refresh_every if exp.optim.lm_refresh_every else 0
    return example_keys(run_keys(exp.seed)["lm"], index, 0, exp.train.batch_size)


def residuals(exp, params, keys):
    return lm_residuals(params, keys, model=SequenceModel(exp.model), task=make_task(exp.task),
                              n_points=exp.task.n_points, n_dims=None)


def run_lm(exp, params, n):
    mesh = make_mesh()
    state = place_state(initial_state(exp)._replace(params=params), mesh)
    fns = full_size_fns(exp, mesh, lm=True)
    history = []
    for i in range(n):
        state, metrics = advance(fns, state, i)
        history.append(float(metrics["loss"]))
    return state, history


@pytest.mark.slow
def test_lm_residuals_mean_square_is_the_task_loss():
    exp = tiny_experiment()
    params = initial_state(exp).params
    keys = lm_batch(exp)
    loss, _ = example_loss(params, keys, model=SequenceModel(exp.model), task=make_task(exp.task),
                                 n_points=exp.task.n_points, n_dims=None)
    r = residuals(exp, params, keys)
    assert r.shape == (300, 2)
    np.testing.assert_allclose(float(jnp.mean(r ** 2)), float(loss), rtol=1e-14)


@pytest.mark.slow
def test_one_lm_step_is_the_numpy_solve_of_the_damped_normal_equations():
    exp = tiny_experiment(**{"train.batch_size": 120, "optim.lm_damping": 1e-2, "optim.lm_tries": 1,
                             "optim.lm_geodesic": False})
    assert exp.optim.lm_scaling == "isotropic"
    params = initial_state(exp).params
    keys = lm_batch(exp)
    theta, unravel = ravel_pytree(params)
    J = np.asarray(jax.jacrev(lambda t: residuals(exp, unravel(t), keys).reshape(-1))(theta))
    r = np.asarray(residuals(exp, params, keys)).reshape(-1)
    m = r.size
    jtj, jtr = J.T @ J / m, J.T @ r / m
    d = np.full(jtj.shape[0], np.trace(jtj) / jtj.shape[0])  # isotropic: mean(diag JtJ) I
    delta = np.linalg.solve(jtj + 1e-2 * np.diag(d), -jtr)
    trial = np.mean(np.asarray(residuals(exp, unravel(theta + delta), keys)) ** 2)
    state, history = run_lm(exp, params, 1)
    lm_state = state.opt_state["lm"]
    assert history[0] == pytest.approx(r @ r / m, rel=1e-13)
    if trial < r @ r / m:  # accepted: the new parameters are theta + delta
        np.testing.assert_allclose(ravel_pytree(state.params)[0], theta + delta, rtol=1e-8, atol=1e-10)
        assert int(lm_state.accepted) == 1
    else:
        np.testing.assert_array_equal(ravel_pytree(state.params)[0], theta)
        assert int(lm_state.rejected) == 1


@pytest.mark.slow
def test_lm_from_the_exact_weights_plus_noise_reaches_near_machine_precision():
    """The explicit-gradient task's exact solution in the trained form, perturbed by N(0, 1e-3^2): 45 LM
    iterations (about 39 reach it, measured) bring the test MSE to eps * mean(target^2), a relative RMS
    error of sqrt(eps). The batch has N K = 4 P residuals or more, so that fitting it fits the task."""
    exp = tiny_experiment(**{"train.batch_size": 1300})
    assert 1300 * 2 >= 4 * make_plan(exp, make_mesh()).n_params
    exact = explicit_gradient_params(exp.model, exp.task.n_dims, exp.task.n_points)
    theta, unravel = ravel_pytree(exact)
    noisy = unravel(theta + 1e-3 * jax.random.normal(jax.random.key(1), theta.shape))
    keys = example_keys(jax.random.key(7), 0, 0, 2048)
    test_mse = lambda p: float(jnp.mean(residuals(exp, p, keys) ** 2))
    targets = make_task(exp.task).sample(keys, n_points=exp.task.n_points).targets
    tol = EPS * float(jnp.mean(targets ** 2))
    assert test_mse(exact) <= 100 * EPS * tol  # the construction itself is exact to rounding
    assert test_mse(noisy) > 1e6 * tol
    state, history = run_lm(exp, noisy, 45)
    assert test_mse(state.params) <= tol, history


ON_DEVICES = textwrap.dedent("""
    import sys, numpy as np, jax
    jax.config.update("jax_enable_x64", True)
    from jax.flatten_util import ravel_pytree
    from steps import initial_state
    from test_lm_training import ON_DEVICES_RUN, run_lm, tiny_experiment
    exp = tiny_experiment(**ON_DEVICES_RUN, **{"optim.lm_chunk": int(sys.argv[3])})
    assert jax.device_count() == int(sys.argv[2])
    state, history = run_lm(exp, initial_state(exp).params, 3)
    np.savez(sys.argv[1], theta=ravel_pytree(state.params)[0], history=history,
             accepted=int(state.opt_state["lm"].accepted))
""")
ON_DEVICES_RUN = {"train.batch_size": 48, "optim.lm_damping": 1e-2}


@pytest.mark.slow
def test_lm_on_4_devices_equals_one_device(tmp_path):
    """The :lm step (geodesic acceleration, retries) on 4 emulated devices, each device building J^T J from
    its own 4 chunks of 3 problems (against 6 on one device) and one reduction adding them: the same
    accepted steps and parameters as one device, to round-off. (Two processes of two devices each:
    tests/test_multiprocess.py.)"""
    exp = tiny_experiment(**ON_DEVICES_RUN, **{"optim.lm_chunk": 6})
    state, history = run_lm(exp, initial_state(exp).params, 3)
    theta, accepted = ravel_pytree(state.params)[0], int(state.opt_state["lm"].accepted)
    assert accepted >= 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"),
                                                                     os.environ.get("PYTHONPATH")]))}
    for n, chunk in ((4, 3),):
        env["XLA_FLAGS"] = xla_flags(f"--xla_force_host_platform_device_count={n}",
                                     "--xla_cpu_collective_call_terminate_timeout_seconds=600")
        out = tmp_path / f"{n}.npz"
        proc = subprocess.run([sys.executable, "-c", ON_DEVICES, str(out), str(n), str(chunk)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        z = np.load(out)
        assert int(z["accepted"]) == accepted
        np.testing.assert_allclose(z["history"], history, rtol=1e-13)
        assert np.linalg.norm(z["theta"] - theta) <= 1e-11 * np.linalg.norm(theta)


def final_state(workdir):
    """The whole training state of a workdir's newest checkpoint (optimizer state included)."""
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        sharding = replicated(make_mesh())
        _, _, state = ckpt.restore_newest(
            lambda saved: abstract_like(jax.eval_shape(lambda: initial_state(saved)), sharding))
    finally:
        ckpt.close()
    return state


def _run(argv):
    err = io.StringIO()
    with redirect_stderr(err):
        return main.run(["lsq_jax.main", *argv], log=lambda _: None), err.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("valley", [False, True])
def test_the_hybrid_resumes_bit_identically(tmp_path, monkeypatch, valley):
    """3 Adam steps, then LM: a run stopped at step 4 and resumed (inside the LM phase, so both optimizers'
    states come back from the checkpoint) ends bit for bit as a run that never stopped; with the valley
    step, its wait comes back too."""
    lm_after = 3
    monkeypatch.setattr(eval_report, "write_evaluation", lambda *a, **k: {})
    args = [f"--config={REPO / 'configs' / 'baseconv.py'}:lm", *(f"--config.{k}={v}" for k, v in TINY.items()),
            f"--config.optim.lm_after={lm_after}", "--config.train.checkpoint_every=4",
            "--config.train.log_every=2", "--config.optim.lm_refresh_every=3",
            *(["--config.optim.lm_valley=True"] if valley else [])]
    assert _run([*args, "--config.train.num_steps=8", f"--workdir={tmp_path / 'full'}"])[0] == 0
    assert _run([*args, "--config.train.num_steps=4", f"--workdir={tmp_path / 'part'}"])[0] == 0
    status, err = _run([*args, "--config.train.num_steps=8", f"--workdir={tmp_path / 'part'}"])
    assert status == 0, err
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "part")
    assert int(a.step) == int(b.step) == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lm_state = a.opt_state["lm"]
    assert type(lm_state) is (lm.ValleyLMState if valley else lm.LMState)
    assert int(lm_state.accepted) >= 1 and int(lm_state.iteration) >= 8 - lm_after
    adam_applied = int(lr_controller.applied_steps(a.opt_state["adam"]))
    assert adam_applied == lm_after  # the recipe ran exactly the hybrid's first steps


@pytest.mark.slow
@pytest.mark.parametrize("forcing", [False, True])
def test_matrix_free_solver_trains_through_the_same_step(forcing):
    """optim.lm_solver=cg (Gauss-Newton-CG, no P x P matrix) from random initialisation: steps are accepted
    and the loss falls (slowly: the CG path solves once per iteration, so each early rejection costs one;
    at the forcing term, capped at 0.5 while the gradient is large, more slowly still on this problem)."""
    exp = tiny_experiment(**{"optim.lm_solver": "cg", "optim.lm_cg_iters": 50, "optim.lm_geodesic": False,
                             "optim.lm_cg_forcing": forcing})
    state, history = run_lm(exp, initial_state(exp).params, 12)
    assert np.all(np.isfinite(history)) and np.all(np.diff(history) <= 0), history
    assert history[-1] < (0.95 if forcing else 0.9) * history[0], history
    assert int(state.opt_state["lm"].accepted) >= 2


def test_matrix_free_chunks_hold_activations_not_jacobian_rows():
    """At the published size (batch 1,024, 21 tokens of width 64) CG's chunks are the step's microbatches:
    the fewest whose (problems, tokens, width) activation holds at most 2^17 elements, 64 problems (97
    would fit; 64 is the largest divisor of 1,024 below), 16 chunks; the Cholesky path's Jacobian budget
    of 2^22 entries would give 16 problems (5 x 43,787 entries each), 64 chunks."""
    config = get_config("baseconv", None)
    config.optim.update(optimizer="lm", lm_solver="cg")
    plan = make_plan(experiment_from_config(config), make_mesh(1), backend="cpu")
    assert (plan.n_params, plan.lm_chunks) == (43_787, 16)


@pytest.mark.slow
def test_restarts_drop_a_stalled_start(tmp_path, monkeypatch):
    """Three starts of two LM iterations each, the second one stalled (all-zero parameters: the model's
    output is 0 whatever the input, and only its output bias can move): it is not chosen, the start with
    the lowest training loss goes on, and the run ends as a run from that start alone would."""
    from lsq_jax.train import loop

    def init(plan, start=0):
        state = init_state(plan, start)
        return state._replace(params=jax.tree.map(jnp.zeros_like, state.params)) if start == 1 else state

    monkeypatch.setattr(loop, "init_state", init)
    monkeypatch.setattr(eval_report, "write_evaluation", lambda *a, **k: {})
    args = [f"--config={REPO / 'configs' / 'baseconv.py'}:lm", *(f"--config.{k}={v}" for k, v in TINY.items()),
            "--config.train.num_steps=4", "--config.train.log_every=1", "--config.optim.lm_geodesic=false"]
    status, err = _run([*args, "--config.optim.lm_restarts=3", "--config.optim.lm_restart_steps=2",
                        f"--workdir={tmp_path / 'w'}"])
    assert status == 0, err
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    chosen = next(r for r in records if "restart_losses" in r)
    losses = chosen["restart_losses"]
    assert chosen["step"] == 2 and len(losses) == 3
    exp = tiny_experiment()
    targets = make_task(exp.task).sample(lm_batch(exp), n_points=exp.task.n_points).targets
    zero_output = float(jnp.mean(targets ** 2))  # the loss of the all-zero start: its output is 0
    assert 0.99 * zero_output < losses[1] <= zero_output  # LM never raises the loss, and barely moved here
    assert chosen["restart_chosen"] == int(np.argmin(losses)) != 1
    # The chosen start's own run, without restarts, from its initialisation: the same final state.
    k = chosen["restart_chosen"]
    monkeypatch.setattr(loop, "init_state", lambda plan, start=0: init(plan, k))
    assert _run([*args, f"--workdir={tmp_path / 'alone'}"])[0] == 0
    a, b = final_state(tmp_path / "w"), final_state(tmp_path / "alone")
    assert int(a.step) == int(b.step) == 4
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_preemption_during_the_restarts_saves_nothing(tmp_path):
    """best_start gives up (None) at the first preemption check; train then ends preempted with no checkpoint,
    so the rerun starts over and makes the same choice."""
    from lsq_jax.train import loop

    exp = tiny_experiment(**{"optim.lm_restarts": 2, "optim.lm_restart_steps": 3, "optim.lm_geodesic": False})
    plan = make_plan(exp, make_mesh())
    checks = []
    out = loop.best_start(Steps(plan), place_state(initial_state(exp), plan.mesh), writer=None, log=lambda _: None,
                          preempted=lambda step: checks.append(step) or True)
    assert out is None and checks == [1]
