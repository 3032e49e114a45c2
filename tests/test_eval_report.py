"""lsq_jax.eval.report and lsq_jax.eval.table against independent numpy computations."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.config.task import TaskConfig
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.eval.report import evaluate_constructions, evaluate_experiment, iterated_report, single_step_report
from lsq_jax.eval.solvers import cg_solver, gd_solver, lstsq_solver, optimal_gd_solver
from lsq_jax.eval.stats import THRESHOLDS
from lsq_jax.eval.table import format_table
from lsq_jax.models.backbone import init_params
from lsq_jax.plan.report import report_sizes

from eval_numpy import (
    EPS,
    conditioned_problems,
    exact_gradient_model,
    gram_eigs,
    numpy_gd,
    numpy_statistics,
    rel_err,
    run,
    sized_plan,
    small_experiment,
)

# ----------------------------------------------------------------------------------------------------------
# Iterated use


def test_iterated_report_against_numpy():
    n_iters = 120
    p = conditioned_problems(8, 24, 16, 4, 4.0)
    solvers = [gd_solver(), optimal_gd_solver(), cg_solver(), lstsq_solver()]
    report = iterated_report(solvers, p, n_iters, n_report_points=20)
    json.dumps(report, allow_nan=False)

    s = np.linalg.svd(p.a, compute_uv=False)
    kappa = s[:, 0] / s[:, -1]
    lam = gram_eigs(p.a)
    eta_b = 1 / lam[:, -1]
    x_gd = numpy_gd(p.a, p.b, p.x0, eta_b, n_iters)
    np.testing.assert_allclose(report["kappa"]["median"], np.median(kappa), rtol=1e-12)
    np.testing.assert_allclose(report["step_size"]["p90"], np.percentile(eta_b, 90), rtol=1e-12)
    for solver in solvers:
        m = report["methods"][solver.name]
        times = m["t"]
        assert times[0] == 0 and times[-1] == n_iters == m["n_iters"] and times == sorted(set(times))
        assert len(times) < n_iters
        xs = run(solver, p, n_iters)
        fe = rel_err(xs, p.x_star, p.x_star)
        curves = {
            "forward_error": fe,
            "residual": rel_err(np.einsum("bld,tbd->tbl", p.a, xs), p.b, p.b),
            "distance_to_gd": rel_err(xs, x_gd, p.x_star),
        }
        for key, values in curves.items():
            q = np.percentile(values, [10, 50, 90], axis=1)[:, times]
            # numpy's GD reference and A x - b agree with the report's to round-off, not bitwise
            atol = 0 if key == "forward_error" else 1e-14
            for row, name in zip(q, ("p10", "median", "p90")):
                np.testing.assert_allclose(m[key][name], row, rtol=1e-9, atol=atol, err_msg=(solver.name, key))
        _, floors, settled, contraction, iters_to = numpy_statistics(fe)
        np.testing.assert_allclose(m["floor"], np.median(floors), rtol=1e-9)
        np.testing.assert_allclose(m["floor_over_kappa_eps"], np.median(floors / (kappa * EPS)), rtol=1e-9)
        np.testing.assert_allclose(m["final_forward_error"], np.median(fe[-1]), rtol=1e-9)
        assert m["settled_fraction"] == pytest.approx(np.mean(settled))
        assert m["iters_to"] == {f"{thr:.0e}": (it if it >= 0 else None) for thr, it in zip(THRESHOLDS, iters_to)}
        finite = contraction[~np.isnan(contraction)]
        assert (m["contraction"] is None) == (finite.size == 0)
        if finite.size:
            np.testing.assert_allclose(m["contraction"], np.median(finite), rtol=1e-9)
    gd, opt, cg = (report["methods"][k] for k in ("gd", "optimal_gd", "cg"))
    np.testing.assert_allclose(gd["contraction_theory"], np.median(1 - lam[:, 0] / lam[:, -1]), rtol=1e-9)
    np.testing.assert_allclose(opt["contraction_theory"],
                               np.median((lam[:, -1] - lam[:, 0]) / (lam[:, -1] + lam[:, 0])), rtol=1e-9)
    np.testing.assert_allclose(cg["contraction_theory"], np.median((kappa - 1) / (kappa + 1)), rtol=1e-9)
    # GD's measured rate is its theoretical one; every method here reaches round-off (kappa(A) eps units)
    assert gd["contraction"] == pytest.approx(gd["contraction_theory"], rel=0.02)
    assert report["methods"]["lstsq"]["contraction"] == pytest.approx(1.0)  # a constant iterate
    for name in ("cg", "lstsq"):  # at their floor after 120 iterations (GD needs ~500 at kappa(A) = 4)
        assert report["methods"][name]["floor_over_kappa_eps"] <= 10


def test_single_step_report_against_numpy():
    key = jax.random.key(3)
    n = 32
    for name, apply_fn, field, want in (
        ("explicit_gradient", exact_gradient_model(1.01), "relative_gradient_error", 0.01),
        ("multistep_gd", lambda p, tok: jnp.zeros(tok.shape[:2] + (5,)).at[:, -1].set(tok[:, -1, :5]),
         "relative_step_error", 1.0),  # predicts x0: ||x0 - x_k|| / ||x_k - x0|| = 1
    ):
        task = make_task(TaskConfig(name))
        report = single_step_report(task, apply_fn, None, key, n)
        for q in ("median", "p10", "p90"):
            assert report[field][q] == pytest.approx(want, rel=1e-10)
    # least_squares predicting 0: forward error 1, test MSE = mean(x*^2) of the same fresh problems
    task = make_task(TaskConfig("least_squares"))
    report = single_step_report(task, lambda p, tok: jnp.zeros(tok.shape[:2] + (5,)), None, key, n)
    x_star = np.asarray(task.sample(example_keys(key, 0, 0, n)).raw.x_star)
    assert report["test_mse"] == pytest.approx(np.mean(x_star ** 2), rel=1e-12)
    assert report["forward_error"] == {"median": 1.0, "p10": 1.0, "p90": 1.0}


# ----------------------------------------------------------------------------------------------------------
# Top-level reports


@pytest.mark.slow
def test_evaluate_experiment_with_an_exact_stand_in():
    sizes = report_sizes(16, 150, n_ood_problems=8, n_ood_iters=100, ood_kappas=(1.0, 5.0), ood_scales=(1.0, 10.0))
    report = evaluate_experiment(sized_plan(small_experiment("explicit_gradient"), sizes), None,
                                 apply_fn=exact_gradient_model())
    json.dumps(report, allow_nan=False)
    assert set(report) == {"kind", "config", "single_step", "iterated", "ood"}
    assert report["single_step"]["relative_gradient_error"]["p90"] <= 1e-14
    methods = report["iterated"]["methods"]
    assert list(methods) == ["learned", "baseconv_gd", "linear_attention_gd", "gd", "optimal_gd", "cg", "lstsq"]
    for q in ("median", "p10", "p90"):
        np.testing.assert_allclose(methods["learned"]["forward_error"][q], methods["gd"]["forward_error"][q],
                                   rtol=1e-9, atol=1e-14)
    assert max(methods["learned"]["distance_to_gd"]["p90"]) <= 1e-13
    cells = report["ood"]["cells"]
    # the reference, kappa 5, scale 10, rows 4 and 6 (the model reads no more than 8), dims 2
    assert [(c["axis"], c["kappa"], c["scale_target"], c["n_points"], c["n_dims"]) for c in cells] == [
        ("in_distribution", 1.0, 1.0, 8, 3), ("kappa", 5.0, 1.0, 8, 3), ("scale", 1.0, 10.0, 8, 3),
        ("rows", 1.0, 1.0, 4, 3), ("rows", 1.0, 1.0, 6, 3), ("dims", 1.0, 1.0, 8, 2)]
    assert [c["in_range"] for c in cells] == [True] + [False] * 5
    assert report["ood"]["trained"] == {"n_points": [8], "every_prefix": False, "kappa": [1.0, 1.0],
                                        "scale_target": [1.0, 1.0], "n_dims": 3}
    for cell in cells:
        assert list(cell["methods"]) == ["learned", "baseconv_gd", "linear_attention_gd", "gd"]
        for name, m in cell["methods"].items():
            assert m["step_error"]["p90"] <= 1e-14, name  # exact: the rounding of one GD step
            assert "final_error_gap" not in m and "step_error_gap" in m  # None here: 0 / 0
        assert cell["methods"]["learned"]["final_vs_gd"]["median"] == pytest.approx(1.0, rel=1e-6)
    table = format_table(report)
    for name in methods:
        assert name in table
    assert "generality" in table and " OUT " in table


def test_evaluate_experiment_single_step_only_for_other_tasks():
    exp = small_experiment("identity")
    params = init_params(exp.model, jax.random.key(1))
    report = evaluate_experiment(sized_plan(exp, report_sizes(16, 1000)), params)
    assert set(report) == {"kind", "config", "single_step"}
    assert {"test_mse", "test_rel", "test_rel_l2"} <= set(report["single_step"])
    json.dumps(report, allow_nan=False)
    assert "single step" in format_table(report)


@pytest.mark.slow
def test_evaluate_constructions():
    sizes = report_sizes(16, 300, n_ood_problems=8, n_ood_iters=40, ood_kappas=(1.0, 10.0), ood_scales=(1.0,))
    report = evaluate_constructions(sized_plan(small_experiment("least_squares"), sizes, constructions_only=True))
    json.dumps(report, allow_nan=False)
    methods = report["iterated"]["methods"]
    assert list(methods) == ["baseconv_gd", "linear_attention_gd", "gd", "optimal_gd", "cg", "lstsq"]
    for name in ("baseconv_gd", "linear_attention_gd"):
        assert report["single_step"][f"{name}_relative_step_error"]["p90"] <= 1e-14
        assert max(methods[name]["distance_to_gd"]["p90"]) <= 1e-13
        assert methods[name]["iters_to"] == methods["gd"]["iters_to"]
    for name, m in methods.items():
        assert m["final_forward_error"] <= 1e-13, name
    for cell in report["ood"]["cells"]:
        assert cell["methods"]["baseconv_gd"]["step_error"]["p90"] <= 1e-14
        assert cell["methods"]["baseconv_gd"]["final_vs_gd"]["median"] == pytest.approx(1.0, rel=1e-6) or \
            cell["methods"]["gd"]["final_forward_error"]["median"] <= 1e-13  # ratio of round-off at the floor
    table = format_table(report)
    assert all(name in table for name in methods) and "to 1e-14" in table
