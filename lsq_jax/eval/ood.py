"""The out-of-distribution grid: problems re-drawn with other condition numbers, target scales, fewer rows
and fewer dimensions, and each solver's error there next to its in-distribution value (the
generalisation gap). The BaseConv construction's gap is ~1 by construction.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from lsq_jax.data import samplers
from lsq_jax.data.samplers import LeastSquaresSample, example_keys
from lsq_jax.eval.solvers import Solver, canonical_eta, gd_solver, run_solver
from lsq_jax.eval.stats import cond_b, error_ratio, json_ratio, quantile_dict, relative_error_b

__all__ = ["OOD_KAPPAS", "OOD_SCALES", "draw_cell", "ood_cells", "ood_report"]

OOD_KAPPAS = (1.0, 2.0, 5.0, 10.0, 100.0)  # sampler scale_cond (1 = plain Gaussian A)
OOD_SCALES = (0.1, 1.0, 10.0)  # sampler scale_target


def ood_cells(n_dims: int, n_points: int, *, kappa: float = 1.0, scale_target: float = 1.0,
              kappas: Sequence[float] = OOD_KAPPAS, scales: Sequence[float] = OOD_SCALES,
              rows: Sequence[int] | None = None, dims: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The cells of the out-of-distribution grid around the in-distribution cell (kappa, scale_target, L, D).

    * axis 'kappa_scale': every (kappa', scale') in kappas x scales (plus the in-distribution pair), at L
      rows and D dims;
    * axis 'rows': L' rows (default ceil(L/2) and ceil(3L/4), kept if D <= L' < L: fewer rows than the model
      was trained on, still an overdetermined problem), at (kappa, scale_target);
    * axis 'dims': n_dims_truncated (default ceil(D/2) and D - 1, kept if 1 <= D' < D), at (kappa,
      scale_target).

    The first cell is the in-distribution one. Each cell: {'axis', 'kappa', 'scale_target', 'n_points',
    'n_dims'} ('n_dims' = the dims kept, D when none is zeroed).
    """
    if rows is None:
        rows = (math.ceil(n_points / 2), math.ceil(3 * n_points / 4))
    if dims is None:
        dims = (math.ceil(n_dims / 2), n_dims - 1)
    rows = sorted({int(r) for r in rows if n_dims <= r < n_points})
    dims = sorted({int(d) for d in dims if 1 <= d < n_dims})
    base = {"kappa": float(kappa), "scale_target": float(scale_target), "n_points": n_points, "n_dims": n_dims}
    cells = [{"axis": "kappa_scale", **base}]
    for kp in kappas:
        for sc in scales:
            if (float(kp), float(sc)) != (base["kappa"], base["scale_target"]):
                cells.append({"axis": "kappa_scale", **base, "kappa": float(kp), "scale_target": float(sc)})
    cells += [{"axis": "rows", **base, "n_points": r} for r in rows]
    cells += [{"axis": "dims", **base, "n_dims": d} for d in dims]
    return cells


def draw_cell(key, cell, n_problems, n_dims, *, normalize_a=False, normalize_x=False, dtype=jnp.float64):
    """The problems of an OOD cell: n_problems least-squares problems from `key` (so the cells share their
    randomness), with the cell's kappa, scale_target and rows, and its dims kept (the rest zeroed)."""
    truncated = None if cell["n_dims"] == n_dims else cell["n_dims"]
    return samplers.least_squares(example_keys(key, 0, 0, n_problems), cell["n_points"], n_dims,
                                  normalize_a=normalize_a, scale_cond=cell["kappa"], normalize_x=normalize_x,
                                  scale_target=cell["scale_target"], n_dims_truncated=truncated, dtype=dtype)


def ood_report(make_solvers: Callable[[int], Sequence[Solver]], draw: Callable[[dict], LeastSquaresSample],
               cells: Sequence[dict[str, Any]], n_iters: int, *, eta: Any = "auto") -> dict[str, Any]:
    """Single-step and iterated errors of some solvers on every cell, and their generalisation gaps.

    For each cell and each solver: 'step_error' = ||x_1 - x^GD_k|| / ||x^GD_k - x_0|| (one application
    against k exact GD steps with `eta`; for a learned explicit-gradient model this is exactly
    ||g_pred - g|| / ||g||), 'final_forward_error' = ||x_T - x*|| / ||x*||, and 'final_vs_gd' = the
    median over problems of its final error / GD's final error after the same k T steps (~1 for a
    method that is GD). The gaps are the cell's median over the in-distribution cell's median (cells[0]):
    'step_error_gap', 'final_error_gap'. GD itself is listed as 'gd' (final error after T steps).

    Args:
        make_solvers: n_points -> the solvers for problems of that many rows (a construction's weights
            depend on L; a learned model does not change).
        draw: cell -> the problems of that cell (drawn from one key, so the cells share their randomness).
        cells: from `ood_cells`; cells[0] is the in-distribution reference.
        n_iters: T >= 1 iterations per solver.
        eta: the GD step (a number or 'auto').
    """
    results = []
    for cell in cells:
        a, b, x_star, x0 = draw(cell)
        solvers = list(make_solvers(cell["n_points"]))
        k_max = max([1] + [s.steps_per_iter for s in solvers])
        x_gd = run_solver(gd_solver(eta), a, b, x0, n_iters * k_max)
        entry = {**cell, "cond": quantile_dict(cond_b(a)), "methods": {}}
        for solver in solvers:
            k = solver.steps_per_iter
            xs = run_solver(solver, a, b, x0, n_iters)
            step_b = relative_error_b(xs[1], x_gd[k], x_gd[k] - x0)
            final_b = relative_error_b(xs[-1], x_star, x_star)
            gd_final_b = relative_error_b(x_gd[k * n_iters], x_star, x_star)
            entry["methods"][solver.name] = {
                "step_error": quantile_dict(step_b),
                "final_forward_error": quantile_dict(final_b),
                "final_vs_gd": quantile_dict(error_ratio(final_b, gd_final_b)),
            }
        gd_b = relative_error_b(x_gd[n_iters], x_star, x_star)
        entry["methods"]["gd"] = {"final_forward_error": quantile_dict(gd_b)}
        results.append(entry)
    base = results[0]["methods"]
    for entry in results:
        for name, m in entry["methods"].items():
            for key, gap in (("step_error", "step_error_gap"), ("final_forward_error", "final_error_gap")):
                if key in m:
                    m[gap] = json_ratio(m[key]["median"], base[name][key]["median"])
    return {"n_iters": int(n_iters), "eta": canonical_eta(eta),
            "in_distribution": dict(cells[0]), "cells": results}
