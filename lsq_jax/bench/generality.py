"""Numerical generality in the benchmarks: a trained model's one-step error over the report's grid, read
as the targets read it: its largest gap inside the trained range, its gaps at L_max + 2 rows, kappa 1,000
and target scale 100, and whether its iterates converge there as GD's do."""
from __future__ import annotations

import math
import statistics

# The cells outside the trained range that the targets name, as (axis, field, value); the rows cell is the
# trained L_max + 2 (lsq_jax.eval.ood.MORE_ROWS).
OUTSIDE = (("kappa", "kappa", 1000.0), ("scale", "scale_target", 100.0))


def generality(plan, params) -> dict:
    """The learned gradient model's generality grid (lsq_jax.eval.report.learned_ood, the run's report
    sizes; `plan` is its lsq_jax.plan.report.ReportPlan), per cell the median one-step error, its gap and
    the iterated error over GD's, and the summary: in_distribution_step_error, max_gap_in_range and, for
    each named cell outside, gap_<field>_<value> and final_vs_gd_<field>_<value> ({} for a task whose
    model does not predict the gradient)."""
    from lsq_jax.eval.ood import MORE_ROWS
    from lsq_jax.eval.report import learned_ood
    from lsq_jax.eval.solvers import learned_gradient_solver

    if plan.task.predicts != "gradient":
        return {}
    learned = learned_gradient_solver(lambda p, x: plan.model.apply({"params": p}, x), params)
    ood = learned_ood(plan, lambda n: [learned])
    cells = []
    for cell in ood["cells"]:
        m = cell["methods"][learned.name]
        cells.append({**{k: cell[k] for k in ("axis", "kappa", "scale_target", "n_points", "n_dims", "in_range")},
                      "step_error": m["step_error"]["median"], "gap": m["step_error_gap"],
                      "final_vs_gd": m["final_vs_gd"]["median"]})
    out = {"in_distribution_step_error": cells[0]["step_error"],
           "max_gap_in_range": _largest(c["gap"] for c in cells if c["in_range"]), "cells": cells}
    more_rows = ("rows", "n_points", ood["trained"]["n_points"][-1] + MORE_ROWS)
    for axis, field, value in (*OUTSIDE, more_rows):
        match = [c for c in cells if c["axis"] == axis and c[field] == value and not c["in_range"]]
        if match:
            out[f"gap_{field}_{value:g}"] = match[0]["gap"]
            out[f"final_vs_gd_{field}_{value:g}"] = match[0]["final_vs_gd"]
    return out


def _largest(values) -> float | None:
    """The largest of some figures, None (a ratio that is not finite in JSON) counting as infinite."""
    values = [math.inf if v is None else float(v) for v in values]
    return max(values) if values else None


def summarize(runs: list[dict]) -> dict:
    """Per generality figure of `runs` (each with a 'generality' dict): the median over the runs and the
    range, as 'min..max'."""
    out = {}
    keys = [k for k in runs[0].get("generality", {}) if k != "cells"]
    for key in keys:
        values = sorted(_largest([r["generality"].get(key)]) for r in runs if key in r.get("generality", {}))
        if values:
            out[key] = statistics.median(values)
            out[f"{key}_range"] = f"{values[0]:.2g}..{values[-1]:.2g}"
    return out


def generality_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(title, key, format) of the generality figures that compare_optimizers' rows hold, each with its
    range over seeds: the one-step error in distribution, the largest gap inside the trained range, and each
    named cell outside it (its gap and the iterated error over GD's)."""
    keys = ["in_distribution_step_error", "max_gap_in_range"]
    keys += sorted({k for row in rows for k in row if k.startswith(("gap_", "final_vs_gd_")) and
                    not k.endswith("_range")})
    present = [k for k in keys if any(k in row for row in rows)]
    titles = {"in_distribution_step_error": "one-step error", "max_gap_in_range": "largest gap in range"}
    columns = [("method", "method", "")]
    for key in present:
        columns += [(titles.get(key, key), key, ".2e"), ("range", f"{key}_range", "")]
    return columns


AXES = (("kappa", "kappa", "kappa", True), ("rows", "n_points", "rows L", False),
        ("scale", "scale_target", "target scale", True))


def plot_generality(result: dict, path: str) -> str | None:
    """One-step error (median over problems) against kappa, rows L and target scale, one line per method and
    seed, the in-distribution cell in each panel, cells inside the trained range filled and outside hollow
    (None without matplotlib or without generality figures)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [(i, name, run) for i, (name, method_runs) in enumerate(result["runs"].items())
            for run in method_runs if run.get("generality")]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 4), sharey=True)
    for ax, (axis, field, label, log_x) in zip(axes, AXES):
        for i, name, run in runs:
            cells = sorted((c for c in run["generality"]["cells"] if c["axis"] in (axis, "in_distribution")),
                           key=lambda c: c[field])
            x, y = [c[field] for c in cells], [c["step_error"] for c in cells]
            ax.plot(x, y, color=f"C{i}", alpha=0.6, label=name if run is result["runs"][name][0] else None)
            for c in cells:
                ax.plot(c[field], c["step_error"], "o", color=f"C{i}", alpha=0.8,
                        markerfacecolor=f"C{i}" if c["in_range"] else "none")
        ax.set_xscale("log" if log_x else "linear")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("one-step error ||g_pred - g|| / ||g|| (median)")
    axes[0].legend()
    fig.suptitle(f"{runs[0][2]['config']}: filled = inside the trained range; exact GD: ~1e-16 everywhere")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
