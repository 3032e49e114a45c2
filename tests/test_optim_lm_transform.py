"""LM as an Optax-style transform (lsq_jax.optim.lm_transform): its applied updates against theta + step
computed on the flat parameters (tests/lm_updates.py) bit for bit, the hybrid's Adam phase against the
recipe, and the hybrid's state against the training state that checkpoints hold."""
import functools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from lsq_jax.checkpoint import Checkpointer, abstract_like
from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.config.optim import OptimConfig
from lsq_jax.mesh import make_mesh, replicated
from lsq_jax.optim import lm, recipe
from lsq_jax.optim.lm_transform import adam_then_lm, levenberg_marquardt, make_lm_optimizer

from config_files import get_config
from lm_updates import lm_update, lm_update_cg
from trees import assert_trees_bitwise_equal
from steps import initial_state

DATA = pathlib.Path(__file__).resolve().parent / "data"
NAN = float("nan")


def mlp_residual(params, batch):
    return jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"] - batch["y"]


def mlp_problem():
    """A small tanh MLP (P = 17, several leaves) near the parameters that generated its data."""
    rng = np.random.default_rng(0)
    p_star = {"w1": rng.normal(size=(2, 3)), "b1": 0.1 * rng.normal(size=3), "w2": rng.normal(size=(3, 2)),
              "b2": 0.1 * rng.normal(size=2)}
    x = rng.normal(size=(8, 2))
    batch = {"x": x, "y": np.asarray(mlp_residual(p_star, {"x": x, "y": 0.0}))}
    theta, unravel = ravel_pytree(jax.tree.map(jnp.asarray, p_star))
    return mlp_residual, unravel(theta + 0.05 * rng.normal(size=theta.size)), batch, 2


def rosenbrock(params, batch):
    t = params["t"]
    return jnp.stack([10.0 * (t[1] - t[0] ** 2), 1.0 - t[0]])[None] + 0.0 * params["unseen"] + 0.0 * batch["z"]


def rosenbrock_problem():
    """Rosenbrock from (-1.2, 1), where the undamped Gauss-Newton step overshoots (a rejected step), with a
    parameter the residuals do not see set to -0.0 (a rejected step must keep its sign bit)."""
    return rosenbrock, {"t": jnp.array([-1.2, 1.0]), "unseen": jnp.array([-0.0])}, {"z": np.zeros((1, 2))}, 1


def applied(tx, residual_fn, n_chunks):
    """params, batch, state -> (optax.apply_updates(params, updates), state, metrics), jitted."""
    def step(params, batch, state):
        updates, state, metrics = tx.update(None, state, params, residual_fn=residual_fn, batch=batch,
                                            n_chunks=n_chunks)
        return optax.apply_updates(params, updates), state, metrics

    return jax.jit(step)


# (problem, damping0, transform settings, lm_update's (lm_update_cg's) settings, accepted); unset, the tries,
# the CG iterations and CG's forcing term are OptimConfig's (10, 100 and on)
CASES = {
    "cholesky accepted": (mlp_problem, 1e-3, {}, {"max_tries": 10}, True),
    "geodesic accepted": (mlp_problem, 1e-3, {"geodesic": True}, {"geodesic": True, "max_tries": 10}, True),
    "cg accepted": (mlp_problem, 1e-3, {"solver": "cg", "cg_iters": 30}, {"maxiter": 30, "forcing": True}, True),
    "cg to its tolerance": (mlp_problem, 1e-3, {"solver": "cg", "cg_forcing": False}, {"forcing": False}, True),
    "cholesky rejected": (rosenbrock_problem, 1e-10, {"max_tries": 1}, {"max_tries": 1}, False),
    "geodesic rejected": (rosenbrock_problem, 1e-10, {"geodesic": True, "max_tries": 1},
                          {"geodesic": True, "max_tries": 1}, False),
    # at the forcing term the first step is short enough to be accepted here; solved to 1e-10 it is not
    "cg rejected": (rosenbrock_problem, 1e-10, {"solver": "cg", "cg_forcing": False}, {}, False),
    "cg at the forcing term": (rosenbrock_problem, 1e-10, {"solver": "cg"}, {"forcing": True}, True),
    "retried until accepted": (rosenbrock_problem, 1e-10, {"max_tries": 40}, {"max_tries": 40}, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_applied_updates_are_lm_updates_new_params_bit_for_bit(case):
    problem, damping0, settings, reference_settings, accepted = CASES[case]
    residual_fn, params, batch, n_chunks = problem()
    tx = levenberg_marquardt(damping0=damping0, **settings)
    state = tx.init(params)
    assert_trees_bitwise_equal(state, lm.init_lm_state(ravel_pytree(params)[0].size, jnp.float64, damping0))
    reference = lm_update_cg if settings.get("solver") == "cg" else lm_update
    expected = jax.jit(functools.partial(reference, residual_fn, n_chunks=n_chunks, **reference_settings))(
        params, batch, state)
    got = applied(tx, residual_fn, n_chunks)(params, batch, state)
    assert bool(got[2]["accepted"]) == accepted
    assert accepted == (int(got[1].accepted) == 1)
    if case == "retried until accepted":
        assert int(got[2]["tries"]) > 1
    assert_trees_bitwise_equal(got, expected)
    if not accepted:
        assert_trees_bitwise_equal(got[0], params)


def lm_config(**lm_settings):
    return OptimConfig(optimizer="lm", lr=0.01, schedule="adaptive", step_rate=2, ema_lambda=2.0,
                       no_increase_length=0, lm_damping=1e-10, **{"lm_solver": "cholesky", **lm_settings})


def test_hybrid_adam_phase_is_the_recipe_bit_for_bit():
    cfg = lm_config()
    _, params, _, _ = mlp_problem()
    adam, hybrid = recipe.make_optimizer(cfg), make_lm_optimizer(cfg)
    adam_state, state = adam.init(params), hybrid.init(params)
    lm_state = state["lm"]
    rng = np.random.default_rng(1)
    for metric in (0.5, NAN, 0.2):  # a measurement, none, another
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
        expected, adam_state = jax.jit(adam.update)(grads, adam_state, params, grad_metric=metric)
        updates, state = jax.jit(hybrid.adam.update)(grads, state, params, grad_metric=metric)
        assert_trees_bitwise_equal(updates, expected)
        assert_trees_bitwise_equal(state, {"adam": adam_state, "lm": lm_state})
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("lm_settings,reference,reference_settings", [
    ({"lm_geodesic": True, "lm_tries": 40, "lm_scaling": "marquardt", "lm_rule": "delayed"}, lm_update,
     {"geodesic": True, "max_tries": 40, "scaling": "marquardt", "rule": "delayed"}),
    ({"lm_solver": "cg", "lm_cg_iters": 7}, lm_update_cg, {"maxiter": 7, "forcing": True}),
    ({"lm_solver": "cg", "lm_geodesic": True, "lm_cg_forcing": False}, lm_update_cg, {"geodesic": True}),
], ids=["cholesky", "cg", "cg_geodesic"])
def test_hybrid_lm_phase_is_the_configured_lm_update(lm_settings, reference, reference_settings):
    """The LM phase of make_lm_optimizer(cfg) is the LM iteration the config's settings ask for; the Adam
    part of the state is left as it was."""
    cfg = lm_config(**lm_settings)
    residual_fn, params, batch, n_chunks = rosenbrock_problem()
    hybrid = make_lm_optimizer(cfg)
    state = hybrid.init(params)
    lm_state = lm.init_lm_state(3, jnp.float64, cfg.lm_damping)
    expected = jax.jit(functools.partial(reference, residual_fn, n_chunks=n_chunks, **reference_settings))(
        params, batch, lm_state)
    new_params, new_state, metrics = applied(hybrid.phase(lm=True), residual_fn, n_chunks)(params, batch, state)
    assert_trees_bitwise_equal((new_params, new_state["lm"], metrics), expected)
    assert_trees_bitwise_equal(new_state["adam"], state["adam"])


def tiny_lm_experiment():
    c = get_config("baseconv", "lm")
    c.update_from_flattened_dict({"task.n_dims": 2, "model.n_embd": 7, "model.n_layer": 2, "optim.lm_after": 2,
                                  "optim.lm_solver": "cholesky"})
    return experiment_from_config(c)


def test_hybrid_state_is_todays_optimizer_state():
    exp = tiny_lm_experiment()
    state = initial_state(exp)
    hybrid_state = make_lm_optimizer(exp.optim).init(state.params)
    assert_trees_bitwise_equal(hybrid_state, state.opt_state)
    by_hand = {"adam": recipe.make_optimizer(exp.optim).init(state.params),
               "lm": lm.init_lm_state(ravel_pytree(state.params)[0].size, exp.model.jnp_dtype,
                                     exp.optim.lm_damping)}
    assert_trees_bitwise_equal(hybrid_state, by_hand)


def test_an_old_lm_checkpoint_restores_into_the_hybrids_state(tmp_path):
    workdir = tmp_path / "workdir_lm"
    shutil.copytree(DATA / "workdir_lm", workdir)

    def hybrid_state(exp):
        state = initial_state(exp)
        return state._replace(opt_state=make_lm_optimizer(exp.optim).init(state.params))

    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step, _, restored = ckpt.restore_newest(lambda saved: abstract_like(
            jax.eval_shape(lambda: hybrid_state(saved)), replicated(make_mesh())))
    finally:
        ckpt.close()
    assert step == 2
    lm_state = restored.opt_state["lm"]
    assert isinstance(lm_state, lm.LMState)
    # One Adam step, then one LM iteration: its solves, every one counted, the last accepted or none.
    assert int(lm_state.iteration) >= 1 and int(lm_state.accepted) <= 1
    assert int(lm_state.accepted) + int(lm_state.rejected) == int(lm_state.iteration)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="solver='qr'"):
        levenberg_marquardt("qr")
    with pytest.raises(ValueError, match="rule='fast'"):
        levenberg_marquardt(rule="fast")
    with pytest.raises(ValueError, match="max_tries=0"):
        levenberg_marquardt(max_tries=0)
    with pytest.raises(ValueError, match="damping0"):
        levenberg_marquardt(damping0=0.0)
    with pytest.raises(ValueError, match="solver='auto' is not allowed: must be one of cholesky, sharded, cg"):
        levenberg_marquardt("auto")
    with pytest.raises(ValueError, match="^cg_iters: got 100; allowed None with lm_solver='cholesky' "
                                         r"\(only 'cg' reads it\)"):
        levenberg_marquardt("cholesky", cg_iters=100)
    with pytest.raises(ValueError, match="valley_cg=True is not allowed without valley=True"):
        levenberg_marquardt("cholesky", valley_cg=True)
    with pytest.raises(ValueError, match="optimizer='lm'"):
        make_lm_optimizer(OptimConfig(optimizer="adam"))
    with pytest.raises(ValueError, match="lm_solver='auto' is picked by the run's plan"):
        make_lm_optimizer(OptimConfig(optimizer="lm"))


def test_adam_then_lm_accepts_a_transform_without_extra_args():
    _, params, _, _ = mlp_problem()
    hybrid = adam_then_lm(optax.sgd(0.1), levenberg_marquardt())
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = hybrid.phase(lm=False).update(grads, hybrid.init(params), params, grad_metric=0.5)
    assert_trees_bitwise_equal(updates, jax.tree.map(lambda g: -0.1 * g, grads))


def test_the_hybrids_adam_phase_chains():
    _, params, _, _ = mlp_problem()
    hybrid = adam_then_lm(optax.sgd(0.1), levenberg_marquardt())
    chained = optax.chain(hybrid.adam, optax.scale(2.0))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, (state, _) = chained.update(grads, chained.init(params), params, grad_metric=0.5)
    assert_trees_bitwise_equal(updates, jax.tree.map(lambda g: -0.2 * g, grads))
    assert set(state) == {"adam", "lm"}
