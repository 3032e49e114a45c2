"""task.train_loss='relative': each problem's squared error over its target's squared norm, against numpy on
a small batch; its invariance when one problem is rescaled (closed form); the default ('mse') bit for bit the
plain MSE of Adam's loss and LM's residuals; LM's residuals' mean square equal to the relative loss; the
one-line refusal of a bad value; a saved config without the field."""
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.config.check import ConfigError
from lsq_jax.config.experiment import experiment_from_config, experiment_from_dict, experiment_to_dict
from lsq_jax.config.task import TaskConfig
from lsq_jax.data.keys import run_keys
from lsq_jax.data.samplers import LeastSquaresSample, example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.mesh import make_mesh
from lsq_jax.models.backbone import SequenceModel
from lsq_jax.optim import lm
from lsq_jax.plan.run import make_plan
from lsq_jax.train.step import example_loss, lm_keys, lm_residual_fn, lm_residuals, predict

from config_files import get_config
from steps import initial_state

REPO = pathlib.Path(__file__).resolve().parents[1]

# Wide ranges, so that plain MSE would weigh the problems by orders of magnitude.
RANGES = dict(scale_cond_max=100.0, scale_target=0.1, scale_target_max=10.0)
TASKS = [dict(name="explicit_gradient"), dict(name="explicit_gradient", setting="all"),
         dict(name="multistep_gd"), dict(name="least_squares")]


def _task(train_loss="relative", **fields):
    return make_task(TaskConfig(**{"n_dims": 3, "n_points": 5, "train_loss": train_loss, **RANGES, **fields}))


def _keys(n=16, seed=0):
    return example_keys(jax.random.key(seed), 0, 0, n)


def _prediction(task, targets, seed=1):
    """A model output (B, seq_len, out_dims) whose read-out is the target times (1 + delta), delta ~ N(0, 0.1)
    per entry: equivariant to a problem's scale, as a model that has learned the step is."""
    rng = np.random.default_rng(seed)
    batch, n_pos = targets.shape[:2]
    pred = rng.standard_normal((batch, task.seq_len(), task.out_dims))
    y = np.asarray(targets) * (1 + 0.1 * rng.standard_normal(targets.shape))
    positions = list(task.target_positions())
    assert len(positions) == n_pos
    pred[:, positions, : targets.shape[-1]] = y
    return pred


def _numpy_relative(y_pred, y):
    err = np.sum((y_pred - y) ** 2, axis=(1, 2))
    return np.mean(err / np.sum(y**2, axis=(1, 2)))


@pytest.mark.parametrize("fields", TASKS, ids=lambda f: "-".join(f.values()))
def test_relative_loss_is_the_mean_squared_relative_error(fields):
    task = _task(**fields)
    batch = task.sample(_keys())
    pred = _prediction(task, batch.targets)
    y_pred = np.asarray(task.read(pred))
    y = np.asarray(batch.targets)
    want = _numpy_relative(y_pred, y)
    np.testing.assert_allclose(float(task.train_loss(pred, batch.targets)), want, rtol=1e-14)
    # the targets span orders of magnitude; the plain MSE is a different number, the test MSE still that
    norms = np.sum(y**2, axis=(1, 2))
    assert norms.max() / norms.min() > 100
    np.testing.assert_allclose(float(task.loss(pred, batch.targets)), np.mean((y_pred - y) ** 2), rtol=1e-14)
    np.testing.assert_allclose(float(task.eval_metrics(pred, batch.targets)["mse"]), np.mean((y_pred - y) ** 2),
                               rtol=1e-14)
    # LM's residuals: per problem the error over sqrt of the target's mean square, their mean square the loss
    res = np.asarray(task.train_residuals(pred, batch.targets))
    k = y[0].size
    want_res = (y_pred - y).reshape(len(y), -1) / np.sqrt(norms / k)[:, None]
    np.testing.assert_allclose(res, want_res, rtol=1e-14)
    np.testing.assert_allclose(np.mean(res**2), want, rtol=1e-14)


@pytest.mark.parametrize("fields", TASKS, ids=lambda f: "-".join(f.values()))
@pytest.mark.parametrize("power", [-3, 2, 6])
def test_rescaling_one_problem_leaves_the_relative_loss_unchanged(fields, power):
    """Problem 3's x* and x0 times c = 10^power: every target of these tasks is linear in (x*, x0) for a
    fixed A, so its target is c times the old one; with its prediction scaled alike, its relative error is
    unchanged and so is the loss, while the plain MSE changes by (c^2 - 1) e_3 / (B P C), e_3 its old
    squared error (closed forms)."""
    task = _task(**fields)
    raw = task.sample(_keys()).raw
    c, i = 10.0**power, 3
    x_star = raw.x_star.at[i].multiply(c)
    x0 = raw.x0.at[i].multiply(c)
    scaled = LeastSquaresSample(a=raw.a, b=jnp.einsum("bld,bd->bl", raw.a, x_star), x_star=x_star, x0=x0)
    _, y = task.build(raw)
    _, y_scaled = task.build(scaled)
    want_y = np.asarray(y).copy()
    want_y[i] *= c
    np.testing.assert_allclose(y_scaled, want_y, rtol=1e-12, atol=1e-300)
    pred = _prediction(task, y)
    pred_scaled = pred.copy()
    pred_scaled[i] *= c
    relative = float(task.train_loss(pred, y))
    np.testing.assert_allclose(float(task.train_loss(pred_scaled, y_scaled)), relative, rtol=1e-12)
    mse = _task("mse", **fields)
    e_i = np.sum((np.asarray(task.read(pred))[i] - np.asarray(y)[i]) ** 2)
    want_mse = float(mse.train_loss(pred, y)) + (c**2 - 1) * e_i / np.asarray(y).size
    np.testing.assert_allclose(float(mse.train_loss(pred_scaled, y_scaled)), want_mse, rtol=1e-10)


def test_a_target_that_is_zero_weighs_its_plain_squared_error():
    """s_b = 1 for an all-zero target: its term is the mean of its squared errors, ||e||^2 / K."""
    task = _task()
    batch = task.sample(_keys(4))
    y = np.asarray(batch.targets).copy()
    y[1] = 0.0
    pred = _prediction(task, y)
    pred[1, -1, :3] = 0.5
    y_pred = np.asarray(task.read(pred))
    terms = np.sum((y_pred - y) ** 2, axis=(1, 2)) / np.array([np.sum(v**2) if np.any(v) else v.size for v in y])
    np.testing.assert_allclose(float(task.train_loss(pred, y)), np.mean(terms), rtol=1e-14)


def _experiment(**overrides):
    c = get_config("baseconv", "lm")
    c.update_from_flattened_dict({"task.n_dims": 3, "task.n_points": 5, "model.n_embd": 8, "model.n_layer": 1,
                                  "train.batch_size": 12, **{f"task.{k}": v for k, v in RANGES.items()},
                                  **overrides})
    return experiment_from_config(c)


def test_the_default_is_the_previous_loss_bit_for_bit():
    """train_loss='mse' (the default): Adam's loss and gradient and LM's residuals are those of the plain MSE
    as it was computed before the field existed, bit for bit."""
    exp = _experiment()
    assert exp.task.train_loss == "mse"
    model, task = SequenceModel(exp.model), make_task(exp.task)
    params = initial_state(exp).params
    keys = _keys(12)
    sizes = dict(model=model, task=task, n_points=5, n_dims=None)

    def previous_loss(p):
        batch = task.sample(keys, n_points=5)
        pred = predict(p, model, task, batch.inputs, 5)
        return task.loss(pred, batch.targets), task.per_position_loss(pred, batch.targets)

    def previous_residuals(p):
        batch = task.sample(keys, n_points=5)
        pred = predict(p, model, task, batch.inputs, 5)
        return (task.read(pred) - batch.targets).reshape(keys.shape[0], -1)

    got = jax.jit(jax.value_and_grad(lambda p: example_loss(p, keys, **sizes), has_aux=True))(params)
    want = jax.jit(jax.value_and_grad(previous_loss, has_aux=True))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(jax.jit(lambda p: lm_residuals(p, keys, **sizes))(params),
                                  jax.jit(previous_residuals)(params))


def test_lm_residuals_mean_square_is_the_relative_loss_with_a_range_of_rows():
    """LM's batch (rows L in [4, 5], two chunks): the mean square of its residuals, as LM's normal equations
    sum it, equals the mean over the row counts' shares of the relative loss (Adam's `example_loss`) on the
    same problems; and differs from the plain MSE of the same model."""
    exp = _experiment(**{"task.train_loss": "relative", "task.n_points_min": 4, "optim.lm_chunk": 2})
    plan = make_plan(exp, make_mesh())
    params = initial_state(exp).params
    keys = lm_keys(plan, 0)
    fn = lm_residual_fn(plan, plan.full_size(lm=True))
    model, task = SequenceModel(exp.model), make_task(exp.task)
    lm_key = run_keys(exp.seed)["lm"]
    share = exp.train.batch_size // 2

    def by_hand(p, t):
        return [example_loss(p, example_keys(lm_key, 0, share * i, share), model=model, task=t, n_points=n,
                             n_dims=None)[0] for i, n in enumerate((4, 5))]

    mse_task = make_task(TaskConfig(**{**experiment_to_dict(exp)["task"], "train_loss": "mse"}))
    (_, _, loss), residuals, parts, mse_parts = jax.jit(
        lambda p: (lm.normal_equations(fn, p, keys, plan.lm_chunks), fn(p, keys), by_hand(p, task),
                   by_hand(p, mse_task)))(params)
    np.testing.assert_allclose(float(loss), np.mean(np.asarray(parts)), rtol=1e-13)
    np.testing.assert_allclose(np.mean(np.square(residuals)), np.mean(np.asarray(parts)), rtol=1e-13)
    assert abs(float(loss) / np.mean(np.asarray(mse_parts)) - 1) > 1e-3


@pytest.mark.parametrize("value", ["rel", "MSE", None, 1])
def test_a_bad_value_is_one_config_error(value):
    with pytest.raises(ConfigError, match=rf"^train_loss: got {re.escape(repr(value))}; allowed 'mse' \| 'relative'$"):
        TaskConfig(n_dims=3, n_points=5, train_loss=value)
    with pytest.raises(ConfigError, match=r"^task.train_loss: got "):
        _experiment(**{"task.train_loss": "rel"})


def test_a_bad_value_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "lsq_jax.main", "--config=configs/baseconv.py:smoke",
                           f"--workdir={workdir}", "--config.task.train_loss=relative_mse"],
                          capture_output=True, text=True, cwd=str(REPO))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0
    assert "task.train_loss: got 'relative_mse'; allowed 'mse' | 'relative'" in proc.stderr
    assert not workdir.exists()


def test_a_saved_config_without_the_field_loads_as_the_plain_mse():
    exp = _experiment(**{"task.train_loss": "relative"})
    saved = experiment_to_dict(exp)
    assert saved["task"]["train_loss"] == "relative"
    assert experiment_from_dict(saved) == exp
    del saved["task"]["train_loss"]
    assert experiment_from_dict(saved).task.train_loss == "mse"
    # a workdir written before the field (and the ranges) existed
    old = json.loads((REPO / "tests" / "data" / "workdir_lm" / "config.json").read_text())
    assert "train_loss" not in old["task"]
    assert experiment_from_dict(old).task.train_loss == "mse"
