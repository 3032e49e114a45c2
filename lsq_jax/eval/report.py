"""The evaluation reports: iterated use of every solver, single-step metrics, and the report of a trained
model or of the hand-built GD models, with `write_evaluation` writing one into a workdir.

Iterated use runs every solver (lsq_jax.eval.solvers) on the same problems and reports the statistics of
lsq_jax.eval.stats: per-iteration curves (median and 10th / 90th percentiles over problems), floor,
contraction next to its theory, iterations to 1e-6 / 1e-10 / 1e-14. Single-step metrics (any task) are
the test MSE on fresh data and, for the least-squares tasks, the relative error of the one quantity the
model predicts (gradient, k-step iterate, solution). The out-of-distribution grid is lsq_jax.eval.ood.

Reports are plain dicts of floats, ints, strings, lists and None (None: never reached, undefined or not
finite), so `json.dumps(report, allow_nan=False)` works. Only `write_evaluation` does file I/O.
"""
from __future__ import annotations

import functools
import json
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lsq_jax.data import samplers
from lsq_jax.data.base import Task
from lsq_jax.data.samplers import LeastSquaresSample, example_keys
from lsq_jax.eval import plots
from lsq_jax.eval.constructions import construction_solvers
from lsq_jax.eval.ood import MORE_ROWS, TrainedRange, draw_cell, ood_cells, ood_report, trained_range
from lsq_jax.eval.solvers import (
    Solver,
    canonical_eta,
    cg_solver,
    eta_param,
    gd_solver,
    learned_gradient_solver,
    learned_multistep_solver,
    lstsq_solver,
    optimal_gd_solver,
    resolve_eta,
    run_solver,
)
from lsq_jax.eval.stats import (
    THRESHOLDS,
    cond_b,
    curves,
    gram_extremes,
    json_float,
    nanmedian,
    quantile_dict,
    relative_error_b,
    report_times,
    theory_b,
    threshold_key,
    trajectory_errors,
    trajectory_statistics,
)
from lsq_jax.eval.table import format_table
from lsq_jax.models.exact_weights import explicit_gradient_params
from lsq_jax.plan.report import ReportPlan, ReportSizes
from lsq_jax.workdir import Workdir, writing

__all__ = [
    "evaluate_constructions",
    "evaluate_experiment",
    "iterated_report",
    "single_step_report",
    "write_evaluation",
]


# ---------------------------------------------------------------------------------------------------
# Iterated use


def iterated_report(solvers: Sequence[Solver], sample: LeastSquaresSample, n_iters: int, *,
                    eta: Any = "auto", n_report_points: int | None = 64) -> dict[str, Any]:
    """Iterate every solver on the same problems and report the numerical-analysis statistics.

    Every solver gets the same budget of G = k_max T GD-step equivalents, k_max the largest
    `steps_per_iter` (1 unless a k-step model is among the solvers): a solver standing for k steps runs
    G // k of its own iterations (so T is the number of applications of the k-step model, and every other
    method covers the same range of GD steps). Exact GD with `eta`, run G steps, is the reference of
    'distance_to_gd' (a k-step solver's iterate t against GD's iterate k t) and of the theoretical
    contractions. Iteration counts in a method's entry ('t', 'iters_to') are its own iterations.

    Args:
        solvers: Solvers with distinct names.
        sample: the problems (a (B, L, D), b (B, L), x_star (B, D), x0 (B, D)).
        n_iters: T >= 1.
        eta: the reference GD's step: a number or 'auto'.
        n_report_points: each curve is kept at `report_times(its iterations, n_report_points)` (None:
            every t).

    Returns:
        {'n_problems', 'n_iters' (T), 'n_gd_steps' (G), 'eta', 'eps', 'kappa' {median, p10, p90},
         'step_size' {...}, 'methods': {name: {'steps_per_iter', 'follows', 'n_iters', 't' [...],
         'forward_error' {median, p10, p90: lists over t}, 'residual' {...}, 'distance_to_gd' {...},
         'final_forward_error', 'floor',
         'floor_over_kappa_eps', 'settled_fraction', 'contraction', 'contraction_theory',
         'iters_to' {'1e-06', '1e-10', '1e-14': int or None}}}}; scalar statistics are medians over
        problems (see `trajectory_statistics`).
    """
    names = [s.name for s in solvers]
    if len(set(names)) != len(names):
        raise ValueError(f"solver names {names} are invalid: allowed are distinct names")
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 1:
        raise ValueError(f"n_iters={n_iters!r} is invalid: allowed values are ints >= 1")
    a, b, x_star, x0 = (jnp.asarray(v) for v in sample)
    n_gd_steps = n_iters * max(s.steps_per_iter for s in solvers)
    ref = _Reference(a, b, x_star, x0, run_solver(gd_solver(eta), a, b, x0, n_gd_steps), cond_b(a),
                     *gram_extremes(a), resolve_eta(eta_param(eta), a), float(jnp.finfo(a.dtype).eps))
    methods = {s.name: _method_report(s, ref, n_gd_steps // s.steps_per_iter, n_report_points) for s in solvers}
    return {
        "n_problems": int(a.shape[0]),
        "n_iters": int(n_iters),
        "n_gd_steps": int(n_gd_steps),
        "eta": canonical_eta(eta),
        "eps": ref.eps,
        "kappa": quantile_dict(ref.kappa_b),
        "step_size": quantile_dict(ref.eta_b),
        "methods": methods,
    }


class _Reference(NamedTuple):
    """The problems of an iterated report, exact GD's iterates on them (G + 1, B, D), their spectra and
    step sizes (B,), and the dtype's eps."""

    a: jax.Array
    b: jax.Array
    x_star: jax.Array
    x0: jax.Array
    x_gd: jax.Array
    kappa_b: jax.Array
    lam_min: jax.Array
    lam_max: jax.Array
    eta_b: jax.Array
    eps: float


def _method_report(solver: Solver, ref: _Reference, own_iters: int, n_report_points: int | None
                   ) -> dict[str, Any]:
    """One method's entry of `iterated_report`: its curves and statistics over `own_iters` iterations."""
    k = solver.steps_per_iter
    times = report_times(own_iters, n_report_points)
    xs = run_solver(solver, ref.a, ref.b, ref.x0, own_iters)
    errors = trajectory_errors(xs, ref.a, ref.b, ref.x_star, ref.x_gd, k=k)
    stats = trajectory_statistics(errors["forward_error"])
    theory = theory_b(solver.follows, k, ref.eta_b, ref.lam_min, ref.lam_max, ref.kappa_b)
    iters_to = np.asarray(stats["iters_to"])
    return {
        "steps_per_iter": k,
        "follows": solver.follows,
        "n_iters": own_iters,
        "t": times,
        **{key: curves(stats["quantiles"] if key == "forward_error"
                       else jnp.quantile(val, jnp.asarray([0.1, 0.5, 0.9], val.dtype), axis=1), times)
           for key, val in errors.items()},
        "final_forward_error": json_float(np.asarray(stats["quantiles"])[1, -1]),
        "floor": json_float(np.median(np.asarray(stats["floor_b"]))),
        "floor_over_kappa_eps": json_float(np.median(np.asarray(stats["floor_b"] / (ref.kappa_b * ref.eps)))),
        "settled_fraction": float(np.mean(np.asarray(stats["settled_b"]))),
        "contraction": nanmedian(stats["contraction_b"]),
        "contraction_theory": None if theory is None else nanmedian(theory),
        "iters_to": {threshold_key(thr): (int(it) if it >= 0 else None) for thr, it in zip(THRESHOLDS, iters_to)},
    }


# ---------------------------------------------------------------------------------------------------
# Single-step metrics

# Task.predicts -> (the report's field, (target, x0) -> the vector its error is relative to)
_SINGLE_STEP_ERRORS: dict[str, tuple[str, Callable]] = {
    "gradient": ("relative_gradient_error", lambda g, x0: g),
    "iterate": ("relative_step_error", lambda x_k, x0: x_k - x0),
    "solution": ("forward_error", lambda x_star, x0: x_star),
}


def single_step_report(task: Task, apply_fn: Callable, params: Any, key: jax.Array,
                       n_problems: int = 256) -> dict[str, Any]:
    """Test metrics of one model application on fresh problems drawn with the task's sampler.

    Always 'test_mse' (and the task's other eval metrics, e.g. the primitives' 'test_rel', 'test_rel_l2').
    A task whose last target is a least-squares vector (`Task.predicts`) adds, per problem, quantiles of
    the relative error of the model's estimate of it (`_SINGLE_STEP_ERRORS`): a gradient
    'relative_gradient_error' ||g_pred - g|| / ||g|| (full gradient, last position); an iterate
    'relative_step_error' ||x_pred - x_k|| / ||x_k - x0||; the solution 'forward_error'
    ||x_pred - x*|| / ||x*||.

    Args:
        task: a Task (make_task). apply_fn: apply_fn(params, inputs) -> outputs (B, T, width).
        params: the model's parameters. key: data key; problem i uses fold_in(fold_in(key, 0), i).
        n_problems: number of fresh problems.
    """
    batch = task.sample(example_keys(key, 0, 0, n_problems))
    pred = jax.jit(apply_fn)(params, batch.inputs)
    report: dict[str, Any] = {"n_problems": int(n_problems)}
    report.update({f"test_{k}": json_float(v) for k, v in task.eval_metrics(pred, batch.targets).items()})
    if task.predicts in _SINGLE_STEP_ERRORS:
        field, scale_of = _SINGLE_STEP_ERRORS[task.predicts]
        estimate, target = task.read(pred)[:, -1], batch.targets[:, -1]
        report[field] = quantile_dict(relative_error_b(estimate, target, scale_of(target, batch.raw.x0)))
    return report


# ---------------------------------------------------------------------------------------------------
# Top-level reports


def _classical_solvers(eta: Any) -> list[Solver]:
    """GD with `eta`, GD with the optimal step, CG on the normal equations, lstsq."""
    return [gd_solver(eta), optimal_gd_solver(), cg_solver(), lstsq_solver()]


def evaluate_experiment(plan: ReportPlan, params: Any, *, apply_fn: Callable | None = None) -> dict[str, Any]:
    """The evaluation report of a trained model (the CLI's --mode=eval).

    Single-step metrics on fresh problems for every task; for a task whose model is a one-step solver
    (`Task.is_one_step_solver`: explicit_gradient, multistep_gd) also iterated use of the learned model
    next to both constructions, GD, optimal GD, CG and lstsq (`iterated_report`, curves at its default
    report points), and the generality grid (`ood_report`: inside and outside the trained range,
    lsq_jax.eval.ood) for the learned model, both constructions and GD. The step size is the one the model
    learned (`Task.learned_eta`: multistep_gd's eta, its iterate t standing for k t GD steps), else 'auto'.

    Args:
        plan: the report's plan (lsq_jax.plan.report): the experiment, its task and model, the key (single-step,
            iterated and OOD problems come from fold_in(key, 0), fold_in(key, 1), fold_in(key, 2)) and the
            sizes.
        params: the model's parameters (the 'params' collection).
        apply_fn: apply_fn(params, inputs) -> outputs; default the plan's model's apply.

    Returns:
        {'kind': 'experiment', 'config': {...}, 'single_step': {...}[, 'iterated': {...}, 'ood': {...}]}.
    """
    exp, task, key, sizes = plan.exp, plan.task, plan.key, plan.sizes
    if apply_fn is None:
        def apply_fn(p, inputs):
            return plan.model.apply({"params": p}, inputs)

    cfg = exp.task
    report: dict[str, Any] = {
        "kind": "experiment",
        "config": {"name": getattr(exp, "name", None), "task": cfg.name, "n_dims": cfg.n_dims,
                   "n_points": cfg.n_points, "dtype": cfg.dtype, "mixer": exp.model.mixer,
                   "n_layer": exp.model.n_layer, "n_embd": exp.model.n_embd},
        "single_step": single_step_report(task, apply_fn, params, jax.random.fold_in(key, 0), sizes.n_problems),
    }
    if not task.is_one_step_solver:
        return report

    eta = "auto" if task.learned_eta is None else task.learned_eta
    if task.predicts == "gradient":
        learned = learned_gradient_solver(apply_fn, params, eta)
    else:
        learned = learned_multistep_solver(apply_fn, params, task.steps_per_iter)
    report["config"]["eta"] = canonical_eta(eta)
    constructions = construction_solvers(cfg.n_dims, eta)
    sample = task.sample(example_keys(jax.random.fold_in(key, 1), 0, 0, sizes.n_problems)).raw
    solvers = [learned, *_exact_weights_solver(exp, task, apply_fn, eta), *constructions(cfg.n_points),
               *_classical_solvers(eta)]
    report["iterated"] = iterated_report(solvers, sample, sizes.n_iters, eta=eta)
    report["ood"] = learned_ood(plan, lambda n: [learned, *constructions(n)], eta)
    return report


def learned_ood(plan: ReportPlan, solvers_at: Callable, eta: Any = "auto") -> dict[str, Any]:
    """The generality grid of a trained model (lsq_jax.eval.ood) at the plan's sizes: its trained range,
    L up to L_max + MORE_ROWS where the model's positions allow, problems from fold_in(plan.key, 2);
    `solvers_at(n_points)` gives the solvers of a cell (the learned one first)."""
    exp, task, cfg = plan.exp, plan.task, plan.exp.task
    trained = trained_range(cfg, exp.model.causal)
    max_rows = max(n for n in range(cfg.n_points, cfg.n_points + MORE_ROWS + 1)
                   if task.seq_len(n) <= exp.model.n_positions)
    draw = functools.partial(draw_cell, jax.random.fold_in(plan.key, 2), n_problems=plan.sizes.n_ood_problems,
                             n_dims=cfg.n_dims, normalize_a=cfg.normalize_a, normalize_x=cfg.normalize_x,
                             dtype=task.dtype)
    return _ood(solvers_at, draw, trained, max_rows, plan.sizes, eta)


def _ood(solvers_at: Callable, draw: Callable, trained: TrainedRange, max_rows: int, sizes: ReportSizes,
         eta: Any) -> dict[str, Any]:
    """The generality grid of the report (lsq_jax.eval.ood) at `sizes`."""
    cells = ood_cells(trained, max_rows=max_rows, kappas=sizes.ood_kappas, scales=sizes.ood_scales)
    return ood_report(solvers_at, draw, cells, sizes.n_ood_iters, eta=eta, trained=trained)


def _exact_weights_solver(exp, task: Task, apply_fn: Callable, eta: Any) -> list[Solver]:
    """[the trained architecture with its exact explicit-gradient weights (lsq_jax.models.gd_weights)]
    when the experiment's model admits them (a task predicting the gradient, BaseConv of width >= D(D+5)/2
    ...); [] otherwise. It shows what the learned model's own form reaches."""
    if task.predicts != "gradient":
        return []
    try:
        exact = explicit_gradient_params(exp.model, task.n_dims, task.config.n_points)
    except ValueError:
        return []
    return [learned_gradient_solver(apply_fn, exact, eta, name="exact_weights")]


def evaluate_constructions(plan: ReportPlan) -> dict[str, Any]:
    """The report of the hand-built GD models (the CLI's --mode=construct), with eta 'auto', built for the
    plan's task.n_dims and task.n_points, in its task.dtype.

    Both constructions (BaseConv, linear attention) next to GD, optimal GD, CG and lstsq in one
    `iterated_report` on least-squares problems (A Gaussian, scale_cond 1; x*, x0 unscaled, scale_target
    1); the single-step part is each construction's relative step error against one exact GD step; the
    generality grid (kappa, scale, rows, fewer dims; 'in_range' relative to the size the weights are built
    for) holds both constructions and GD. Problems: iterated from fold_in(key, 1), OOD from fold_in(key, 2).
    Sizes as in `evaluate_experiment`.

    Returns:
        {'kind': 'constructions', 'config': {...}, 'single_step': {...}, 'iterated': {...}, 'ood': {...}}.
    """
    n_dims, n_points, dtype = plan.exp.task.n_dims, plan.exp.task.n_points, jnp.dtype(plan.exp.task.dtype)
    key, sizes = plan.key, plan.sizes
    eta = "auto"
    constructions = construction_solvers(n_dims, eta)
    sample = samplers.least_squares(example_keys(jax.random.fold_in(key, 1), 0, 0, sizes.n_problems), n_points,
                                    n_dims, dtype=dtype)
    solvers = [*constructions(n_points), *_classical_solvers(eta)]
    iterated = iterated_report(solvers, sample, sizes.n_iters, eta=eta)
    x_gd1 = run_solver(gd_solver(eta), sample.a, sample.b, sample.x0, 1)[1]
    single = {"n_problems": int(sizes.n_problems)}
    for solver in constructions(n_points):
        x1 = run_solver(solver, sample.a, sample.b, sample.x0, 1)[1]
        single[f"{solver.name}_relative_step_error"] = quantile_dict(
            relative_error_b(x1, x_gd1, x_gd1 - sample.x0))
    report = {
        "kind": "constructions",
        "config": {"n_dims": n_dims, "n_points": n_points, "eta": canonical_eta(eta), "scale_cond": 1.0,
                   "scale_target": 1.0, "dtype": dtype.name},
        "single_step": single,
        "iterated": iterated,
    }
    nominal = TrainedRange((n_points,), (1.0, 1.0), (1.0, 1.0), n_dims)  # what the weights are built for
    draw = functools.partial(draw_cell, jax.random.fold_in(key, 2), n_problems=sizes.n_ood_problems, n_dims=n_dims,
                             dtype=dtype)
    report["ood"] = _ood(constructions, draw, nominal, n_points + MORE_ROWS, sizes, eta)
    return report


def write_evaluation(plan: ReportPlan, params, workdir: Workdir, *, log=print, out=None) -> dict[str, Any]:
    """The numerical-analysis report of a learned model, or with plan.constructions_only of the hand-built
    GD models, written to <out>/report.json (default <workdir>/eval) with a table on the terminal and PNG
    plots (by the workdir's writing process).

    Args:
        plan: the report's plan (lsq_jax.plan.report.make_report_plan).
        params: the model's parameters (ignored with plan.constructions_only).
        workdir: the run's folder (local or cloud); <workdir>/metrics.jsonl, when present, is plotted too.
        log: where the table and the written paths go.
        out: the report's folder, when not <workdir>/eval (a released checkpoint's folder is never written).
    """
    report = evaluate_constructions(plan) if plan.constructions_only else evaluate_experiment(plan, params)
    workdir.writes(_write_report, report, workdir, epath.Path(out) if out is not None else workdir / "eval", log)
    return report


def _write_report(report: dict[str, Any], workdir: Workdir, out: epath.Path, log) -> None:
    """<out>/report.json, the table on `log`, the plots (with <workdir>/metrics.jsonl's records)."""
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    workdir.write(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    log(format_table(report))
    metrics = workdir / "metrics.jsonl"
    records = plots.read_metrics(metrics) if metrics.exists() else []
    with writing(out):
        for path in plots.write_plots(report, records, out):
            log(f"wrote {path}")
    log(f"wrote {out / 'report.json'}")
