"""The generality grid: problems re-drawn with other condition numbers, target scales, row counts and fewer
dimensions, inside and outside the range a model was trained on, and each solver's one-step error there
next to its in-distribution value (the gap). A learned model that is the algorithm has gap ~1 everywhere,
as exact GD and the constructions do.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax.data import samplers
from lsq_jax.data.samplers import LeastSquaresSample, example_keys
from lsq_jax.eval.solvers import Solver, canonical_eta, eta_param, gd_solver, resolve_eta, run_solver
from lsq_jax.eval.stats import cond_b, error_ratio, json_ratio, quantile_dict, relative_error_b
from lsq_jax.plan.report import OOD_KAPPAS, OOD_SCALES

__all__ = ["TrainedRange", "draw_cell", "ood_cells", "ood_report", "trained_range"]

MORE_ROWS = 2  # the grid's longer problems: L_max + this many rows, where the model's positions allow


class TrainedRange(NamedTuple):
    """The problems a model was trained on: the row counts its batches held (`rows`, increasing; with
    `prefixes` every L up to the last as well), kappa and target scale in their [min, max] (equal ends: one
    value), all n_dims dimensions."""

    rows: tuple[int, ...]
    kappa: tuple[float, float]
    scale_target: tuple[float, float]
    n_dims: int
    prefixes: bool = False


def trained_range(task_cfg, causal: bool = False) -> TrainedRange:
    """The TrainedRange of a TaskConfig: its rows [n_points_min, n_points] (and every prefix for
    explicit_gradient 'all' with a causal model: it sees rows 1..j at position j), kappa and target scale
    ranges, and dims."""
    return TrainedRange(task_cfg.rows(), tuple(map(float, task_cfg.kappa_range())),
                        tuple(map(float, task_cfg.scale_range())), task_cfg.n_dims,
                        task_cfg.setting == "all" and causal)


def in_range(cell: dict[str, Any], trained: TrainedRange) -> bool:
    """Whether a cell's problems are among those the model was trained on (floats to 1e-12 relative)."""
    def inside(v, lo_hi):
        return lo_hi[0] * (1 - 1e-12) <= v <= lo_hi[1] * (1 + 1e-12)

    rows = cell["n_points"] in trained.rows or (trained.prefixes and cell["n_points"] <= trained.rows[-1])
    return (rows and cell["n_dims"] == trained.n_dims and inside(cell["kappa"], trained.kappa)
            and inside(cell["scale_target"], trained.scale_target))


def ood_cells(trained: TrainedRange, *, max_rows: int | None = None, kappas: Sequence[float] = OOD_KAPPAS,
              scales: Sequence[float] = OOD_SCALES, rows: Sequence[int] | None = None,
              dims: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The cells of the grid, one axis at a time around the in-distribution reference cell.

    The reference (cells[0], axis 'in_distribution'): the trained range's smallest kappa, the target scale
    of the range nearest 1, its largest L, all D dims. Then, each at the reference's other values:
    * 'kappa': every kappa of `kappas` and the trained range's ends;
    * 'scale': every target scale of `scales` and the trained range's ends;
    * 'rows': L' (default every L of the trained rows, or with a single L ceil(L/2) and ceil(3L/4), plus
      fewer rows, ceil(L_min/2) and ceil(3 L_min/4), and more, L_max + MORE_ROWS), kept if
      D <= L' <= max_rows (overdetermined, and a length the model reads; max_rows default L_max);
    * 'dims': n_dims_truncated (default ceil(D/2) and D - 1, kept if 1 <= D' < D).

    Each cell: {'axis', 'kappa', 'scale_target', 'n_points', 'n_dims' (the dims kept), 'in_range'}.
    """
    l_min, l_max, d = trained.rows[0], trained.rows[-1], trained.n_dims
    max_rows = l_max if max_rows is None else max_rows
    if rows is None:
        inside = trained.rows if len(trained.rows) > 1 else (math.ceil(l_max / 2), math.ceil(3 * l_max / 4))
        rows = (*inside, math.ceil(l_min / 2), math.ceil(3 * l_min / 4), l_max + MORE_ROWS)
    if dims is None:
        dims = (math.ceil(d / 2), d - 1)
    ref = {"kappa": trained.kappa[0], "scale_target": min(max(1.0, trained.scale_target[0]), trained.scale_target[1]),
           "n_points": l_max, "n_dims": d}
    axes = [("kappa", "kappa", sorted({*map(float, kappas), *trained.kappa})),
            ("scale", "scale_target", sorted({*map(float, scales), *trained.scale_target})),
            ("rows", "n_points", sorted({int(r) for r in rows if d <= r <= max_rows})),
            ("dims", "n_dims", sorted({int(v) for v in dims if 1 <= v < d}))]
    cells = [{"axis": "in_distribution", **ref}]
    cells += [{"axis": axis, **ref, field: v} for axis, field, values in axes for v in values if v != ref[field]]
    return [{**c, "in_range": in_range(c, trained)} for c in cells]


def draw_cell(key, cell, n_problems, n_dims, *, normalize_a=False, normalize_x=False, dtype=jnp.float64):
    """The problems of a cell: n_problems least-squares problems from `key` (so the cells share their
    randomness), with the cell's kappa, scale_target and rows, and its dims kept (the rest zeroed)."""
    truncated = None if cell["n_dims"] == n_dims else cell["n_dims"]
    return samplers.least_squares(example_keys(key, 0, 0, n_problems), cell["n_points"], n_dims,
                                  normalize_a=normalize_a, scale_cond=cell["kappa"], normalize_x=normalize_x,
                                  scale_target=cell["scale_target"], n_dims_truncated=truncated, dtype=dtype)


@jax.jit
def _gd_rounding(a, b, x0, x1, eta):
    """||x1' - x1|| / ||x1 - x0|| per problem, x1' GD's first step formed through A^T A and A^T b instead of
    through the residual: the rounding of one exact GD step, the floor of any one-step error. `eta`: an
    eta_param (None: 'auto')."""
    eta_b = resolve_eta(eta, a)
    gram = jnp.einsum("bld,ble->bde", a, a)
    g = (jnp.einsum("bde,be->bd", gram, x0) - jnp.einsum("bld,bl->bd", a, b)) / a.shape[-2]
    return relative_error_b(x0 - eta_b[:, None] * g, x1, x1 - x0)


def ood_report(make_solvers: Callable[[int], Sequence[Solver]], draw: Callable[[dict], LeastSquaresSample],
               cells: Sequence[dict[str, Any]], n_iters: int, *, eta: Any = "auto",
               trained: TrainedRange | None = None) -> dict[str, Any]:
    """One-step and iterated errors of some solvers on every cell, and their gaps.

    For each cell and each solver: 'step_error' = ||x_1 - x^GD_k|| / ||x^GD_k - x_0|| (one application
    against k exact GD steps with `eta`; for a learned explicit-gradient model exactly ||g_pred - g|| /
    ||g||), its 'step_error_gap' = the cell's median over the in-distribution cell's (cells[0]),
    'final_forward_error' = ||x_T - x*|| / ||x*|| and 'final_vs_gd' = per problem its final error over
    GD's after the same k T steps (~1 for a method that is GD, whether or not GD converged). GD itself is
    listed as 'gd': its final error after T steps, and as 'step_error' the rounding of one exact step
    (`_gd_rounding`).

    Args:
        make_solvers: n_points -> the solvers for problems of that many rows (a construction's weights
            depend on L; a learned model does not change).
        draw: cell -> the problems of that cell (drawn from one key, so the cells share their randomness).
        cells: from `ood_cells`; cells[0] is the in-distribution reference.
        n_iters: T >= 1 iterations per solver.
        eta: the GD step (a number or 'auto').
        trained: the range the model was trained on, reported as 'trained'.
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
            final_b = relative_error_b(xs[-1], x_star, x_star)
            gd_final_b = relative_error_b(x_gd[k * n_iters], x_star, x_star)
            entry["methods"][solver.name] = {
                "step_error": quantile_dict(relative_error_b(xs[1], x_gd[k], x_gd[k] - x0)),
                "final_forward_error": quantile_dict(final_b),
                "final_vs_gd": quantile_dict(error_ratio(final_b, gd_final_b)),
            }
        entry["methods"]["gd"] = {"step_error": quantile_dict(_gd_rounding(a, b, x0, x_gd[1], eta_param(eta))),
                                  "final_forward_error": quantile_dict(relative_error_b(x_gd[n_iters], x_star,
                                                                                        x_star))}
        results.append(entry)
    base = results[0]["methods"]
    for entry in results:
        for name, m in entry["methods"].items():
            m["step_error_gap"] = json_ratio(m["step_error"]["median"], base[name]["step_error"]["median"])
    out = {"n_iters": int(n_iters), "eta": canonical_eta(eta), "in_distribution": dict(cells[0]), "cells": results}
    if trained is not None:
        out["trained"] = {"n_points": list(trained.rows), "every_prefix": trained.prefixes,
                          "kappa": list(trained.kappa), "scale_target": list(trained.scale_target),
                          "n_dims": trained.n_dims}
    return out
