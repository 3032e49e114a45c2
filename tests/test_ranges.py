"""Training over a range of problems: the samplers' log-uniform kappa and target scale against their closed
forms, a batch mixing row counts against the per-size losses combined by hand (Adam's step and LM's
residuals), the one-line refusals of bad ranges, and a run's report of the cells inside its range."""
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.flatten_util
import numpy as np
import pytest

from lsq_jax.config.check import ConfigError
from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.config.task import TaskConfig
from lsq_jax.data import samplers
from lsq_jax.data.keys import run_keys
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.mesh import make_mesh
from lsq_jax.models.backbone import SequenceModel
from lsq_jax.optim import lm
from lsq_jax.plan.run import make_plan
from lsq_jax.train.step import batch_gradient, example_loss, lm_keys, lm_residual_fn, lm_residuals

from config_files import SMALL_REPORT_FLAGS, get_config
from steps import initial_state

REPO = pathlib.Path(__file__).resolve().parents[1]

N = 4000  # problems per statistic: the empirical quantiles' standard error is ~0.008 in units of the range


def _keys(n=N, seed=0):
    return example_keys(jax.random.key(seed), 0, 0, n)


def test_log_uniform_kappa_has_its_quantiles_and_the_exact_singular_values():
    """kappa ~ lo (hi/lo)^U: the q-quantile of log(kappa/lo)/log(hi/lo) is q; each A's singular values are
    the affine map onto [1, kappa] of the singular values of the Gaussian draw it came from."""
    lo, hi = 2.0, 500.0
    s = samplers.least_squares(_keys(), 6, 4, scale_cond=lo, scale_cond_max=hi)
    sv = np.linalg.svd(np.asarray(s.a), compute_uv=False)
    np.testing.assert_allclose(sv[:, -1], 1.0, rtol=1e-12)
    kappa = sv[:, 0]
    assert lo <= kappa.min() and kappa.max() <= hi
    q = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(np.log(kappa / lo) / np.log(hi / lo), q), q, atol=0.03)
    # the Gaussian draw of the same keys without a range: its spectrum mapped onto [1, kappa]
    s0 = np.linalg.svd(np.asarray(samplers.least_squares(_keys(), 6, 4).a), compute_uv=False)
    expected = 1 + (s0 - s0[:, -1:]) * ((kappa[:, None] - 1) / (s0[:, :1] - s0[:, -1:]))
    np.testing.assert_allclose(sv, expected, rtol=1e-10)
    # b = A x* and the x* draw are untouched by the range of kappa
    np.testing.assert_allclose(np.einsum("bld,bd->bl", s.a, s.x_star), s.b, rtol=1e-12, atol=1e-12)


def test_log_uniform_target_scale_has_its_quantiles():
    """With unit x*, x0: ||x*|| = ||x0|| = the problem's scale, log-uniform on [lo, hi]."""
    lo, hi = 0.1, 10.0
    s = samplers.least_squares(_keys(), 5, 3, normalize_x=True, scale_target=lo, scale_target_max=hi)
    norm = np.linalg.norm(np.asarray(s.x_star), axis=1)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(s.x0), axis=1), norm, rtol=1e-14)
    q = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(np.log(norm / lo) / np.log(hi / lo), q), q, atol=0.03)
    # mean of a log-uniform variable: (hi - lo) / log(hi / lo), to ~4 standard errors
    std = np.sqrt((hi**2 - lo**2) / (2 * np.log(hi / lo)) - ((hi - lo) / np.log(hi / lo)) ** 2)
    assert abs(norm.mean() - (hi - lo) / np.log(hi / lo)) < 4 * std / np.sqrt(N)


def test_fixed_values_draw_exactly_what_they_drew_before():
    """A range whose ends are equal is the fixed value: the same arrays bit for bit."""
    plain = samplers.least_squares(_keys(64), 5, 3, scale_cond=10.0, scale_target=2.0)
    same = samplers.least_squares(_keys(64), 5, 3, scale_cond=10.0, scale_target=2.0, scale_cond_max=10.0,
                                  scale_target_max=2.0)
    for a, b in zip(plain, same):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _experiment(variant, **overrides):
    c = get_config("baseconv", variant)
    c.update_from_flattened_dict({"task.n_dims": 3, "task.n_points": 6, "model.n_embd": 8, "model.n_layer": 1,
                                  "train.batch_size": 12, **overrides})
    return experiment_from_config(c)


@pytest.mark.slow
def test_mixed_rows_batch_loss_is_the_mean_of_the_per_size_losses():
    """Rows L in [4, 6]: the batch's loss and gradient are the mean over the three equal shares (4
    problems each, global indices 0-3 with L = 4, 4-7 with L = 5, 8-11 with L = 6) of each share's loss,
    computed here on its own."""
    exp = _experiment("smoke", **{"task.n_points_min": 4, "task.scale_cond_max": 10.0})
    plan = make_plan(exp, make_mesh())
    params = initial_state(exp).params
    key = run_keys(exp.seed)["data"]
    (loss, _), grads = jax.jit(lambda p: batch_gradient(p, key, 3, plan=plan, phase=plan.full_size()))(params)
    model, task = SequenceModel(exp.model), make_task(exp.task)

    def by_hand(p):
        parts = [example_loss(p, example_keys(key, 3, 4 * i, 4), model=model, task=task, n_points=n,
                              n_dims=None)[0] for i, n in enumerate((4, 5, 6))]
        return (parts[0] + parts[1] + parts[2]) / 3

    want_loss, want = jax.jit(jax.value_and_grad(by_hand))(params)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-13)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_lm_fits_the_residuals_of_every_row_count():
    """LM's batch with rows in [4, 6]: the residuals of each share at its own L, stacked; their mean square
    (the loss of LM's normal equations, built in chunks of problems of every L) is the mean of the per-size
    losses."""
    exp = _experiment("lm", **{"task.n_points_min": 4, "optim.lm_chunk": 2})
    plan = make_plan(exp, make_mesh())
    assert plan.lm_chunks == 2
    params = initial_state(exp).params
    keys = lm_keys(plan, 0)
    assert len(keys) == 3
    fn = lm_residual_fn(plan, plan.full_size(lm=True))
    model, task = SequenceModel(exp.model), make_task(exp.task)
    lm_key = run_keys(exp.seed)["lm"]
    want = jax.jit(lambda p: [lm_residuals(p, example_keys(lm_key, 0, 4 * i, 4), model=model, task=task,
                                           n_points=n, n_dims=None) for i, n in enumerate((4, 5, 6))])(params)
    got, (_, _, loss) = jax.jit(lambda p: (fn(p, keys), lm.normal_equations(fn, p, keys, plan.lm_chunks)))(params)
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-14)
    np.testing.assert_allclose(float(loss), np.mean([np.mean(np.square(w)) for w in want]), rtol=1e-13)


def test_lm_jacobian_over_row_counts_is_forward_modes():
    """LM's Jacobian with rows in [4, 6], built one row count at a time (the other counts left out), against
    forward mode through the stacked residuals of the whole batch: the same matrix in the same order, and
    the normal equations J^T J / M, J^T r / M from it."""
    exp = _experiment("lm", **{"task.n_points_min": 4, "optim.lm_chunk": 2})
    plan = make_plan(exp, make_mesh())
    theta, unravel = jax.flatten_util.ravel_pytree(initial_state(exp).params)
    keys = lm_keys(plan, 0)
    fn = lm_residual_fn(plan, plan.full_size(lm=True))
    f = lambda t, b: fn(unravel(t), b).reshape(-1)
    (r, Jt), J, (JtJ, Jtr, _) = jax.jit(lambda t: (
        lm.chunk_jacobian(f, t, keys, True), jax.jacfwd(lambda u: f(u, keys))(t),
        lm.normal_equations(fn, unravel(t), keys, plan.lm_chunks)))(theta)
    J, m = np.asarray(J), r.size
    assert Jt.shape == J.T.shape == (theta.size, 3 * 4 * 3)
    np.testing.assert_allclose(r, f(theta, keys), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(Jt, J.T, rtol=1e-12, atol=1e-14 * np.abs(J).max())
    np.testing.assert_allclose(JtJ, J.T @ J / m, rtol=1e-12, atol=1e-14 * np.abs(J.T @ J / m).max())
    np.testing.assert_allclose(Jtr, J.T @ np.asarray(r) / m, rtol=1e-12, atol=1e-14 * np.abs(J.T @ r / m).max())


@pytest.mark.parametrize("field, value, allowed", [
    ("n_points_min", 0, "None or integers in [1, n_points=6]"),
    ("n_points_min", 7, "None or integers in [1, n_points=6]"),
    ("scale_cond_max", 0.5, "None or finite numbers >= scale_cond=1"),
    ("scale_target_max", float("inf"), "None or finite numbers >= scale_target=1"),
])
def test_bad_ranges_are_one_config_error(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"^{field}: got .*; allowed {re.escape(allowed)}"):
        TaskConfig(name="explicit_gradient", n_dims=3, n_points=6, **{field: value})


def test_a_range_of_rows_is_refused_where_it_cannot_hold():
    with pytest.raises(ConfigError, match=r"^n_points_min: got 4; allowed None for explicit_gradient 'all'"):
        TaskConfig(name="explicit_gradient", n_dims=3, n_points=6, setting="all", n_points_min=4)
    with pytest.raises(ConfigError, match=r"^train.batch_size: got 10; allowed multiples of 3"):
        _experiment("smoke", **{"task.n_points_min": 4, "train.batch_size": 10})
    with pytest.raises(ConfigError, match=r"^task.n_points_min: got 4; allowed None with a points curriculum"):
        _experiment("smoke", **{"task.n_points_min": 4, "curriculum.points.start": 4,
                                "curriculum.points.inc": 1, "curriculum.points.interval": 10})


def test_a_bad_range_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "lsq_jax.main", "--config=configs/baseconv.py:smoke",
                           f"--workdir={workdir}", "--config.task.scale_cond_max=0.5"],
                          capture_output=True, text=True, cwd=str(REPO))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "task.scale_cond_max: got 0.5" in proc.stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_a_run_over_ranges_reports_in_and_out_of_its_range(tmp_path):
    """The CLI trains over rows [5, 6], kappa [1, 10] and target scale [0.5, 2], and its report says which
    cells lie inside that range: every trained L and the ranges' ends in, the rest out."""
    from lsq_jax import main

    out = []
    status = main.run(["lsq_jax.main", f"--config={REPO / 'configs' / 'baseconv.py'}:smoke",
                       f"--workdir={tmp_path}", "--config.train.num_steps=4", "--config.task.n_dims=4",
                       "--config.model.n_embd=16", "--config.model.n_layer=2",
                       "--config.task.n_points=6", "--config.task.n_points_min=5", "--config.model.n_positions=9",
                       "--config.task.scale_cond_max=10", "--config.task.scale_target=0.5",
                       "--config.task.scale_target_max=2", "--config.optim.schedule=step",
                       "--config.train.grad_stats_batches=0", *SMALL_REPORT_FLAGS], log=out.append)
    assert status == 0, out[-20:]
    stdout = "\n".join(out)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    ood = report["ood"]
    assert ood["trained"] == {"n_points": [5, 6], "every_prefix": False, "kappa": [1.0, 10.0],
                              "scale_target": [0.5, 2.0], "n_dims": 4}
    cells = {(c["axis"], c["kappa"], c["scale_target"], c["n_points"], c["n_dims"]): c for c in ood["cells"]}
    expected_in = {("in_distribution", 1.0, 1.0, 6, 4), ("kappa", 10.0, 1.0, 6, 4), ("scale", 1.0, 0.5, 6, 4),
                   ("scale", 1.0, 2.0, 6, 4), ("rows", 1.0, 1.0, 5, 4)}
    assert {k for k, c in cells.items() if c["in_range"]} == expected_in
    # outside: kappa 100 and 1,000, scales 0.01 to 100 but the ends, 4 rows (fewer; 3 < D is not drawn),
    # 8 (more), 2 and 3 dims
    assert {k[3] for k in cells if k[0] == "rows"} == {4, 5, 8}
    for cell in ood["cells"]:
        assert set(cell["methods"]) == {"learned", "baseconv_gd", "linear_attention_gd", "gd"}
        learned = cell["methods"]["learned"]
        assert {"step_error", "step_error_gap", "final_forward_error", "final_vs_gd"} <= set(learned)
        assert "final_error_gap" not in learned
    assert cells[("in_distribution", 1.0, 1.0, 6, 4)]["methods"]["learned"]["step_error_gap"] == 1.0
    assert " OUT " in stdout and "generality" in stdout
