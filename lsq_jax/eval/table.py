"""The short terminal table of an evaluation report (lsq_jax.eval.report)."""
from __future__ import annotations

from typing import Any

from lsq_jax.eval.stats import THRESHOLDS, threshold_key

__all__ = ["format_table"]


def _fmt(x, spec: str = ".1e") -> str:
    """A table cell: '-' for None, ints as they are, floats in `spec`."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return format(x, spec)


def _aligned(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines, the first column left-aligned and the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def _iterated_lines(it: dict[str, Any]) -> list[str]:
    """The iterated report's header line and its method table, columns aligned."""
    lines = [f"iterated use: {it['n_problems']} problems, {it['n_gd_steps']} GD steps' worth per method "
             f"(k per iteration), eta = {it['eta']}, "
             f"median kappa(A) = {_fmt(it['kappa']['median'], '.3g')}, eps = {it['eps']:.2e}"]
    thr = [threshold_key(t) for t in THRESHOLDS]
    header = ["method", "k", "iters", "final err", "floor", "floor/(kappa eps)", *(f"to {t}" for t in thr),
              "contraction", "theory"]
    rows = [header]
    for name, m in it["methods"].items():
        rows.append([name, str(m["steps_per_iter"]), str(m["n_iters"]), _fmt(m["final_forward_error"]),
                     _fmt(m["floor"]), _fmt(m["floor_over_kappa_eps"], ".3g"),
                     *(_fmt(m["iters_to"][t]) for t in thr),
                     _fmt(m["contraction"], ".4g"), _fmt(m["contraction_theory"], ".4g")])
    return lines + _aligned(rows)


def _single_step_lines(single: dict[str, Any]) -> list[str]:
    """One line of the single-step metrics (quantiles as 'median [p10, p90]'), or none."""
    parts = []
    for k, v in single.items():
        if isinstance(v, dict):
            parts.append(f"{k} {_fmt(v['median'])} [{_fmt(v['p10'])}, {_fmt(v['p90'])}]")
        elif k != "n_problems":
            parts.append(f"{k} {_fmt(v)}")
    return ["single step: " + " | ".join(parts)] if parts else []


def _ood_lines(ood: dict[str, Any]) -> list[str]:
    """The generality grid: one row per cell (axis, inside or outside the trained range, kappa, scale, L,
    D), then per method its median one-step error and gap, and its final error over GD's (GD: its final
    error)."""
    cells = ood["cells"]
    names = list(dict.fromkeys(name for c in cells for name in c["methods"]))
    header = ["generality", "range", "kappa", "scale", "L", "D"]
    for name in names:
        header += [f"{name} step", "gap", "final err" if name == "gd" else "final/gd"]
    rows = [header]
    for c in cells:
        row = [c["axis"], {True: "in", False: "OUT"}.get(c.get("in_range"), "-"), f"{c['kappa']:g}",
               f"{c['scale_target']:g}", str(c["n_points"]), str(c["n_dims"])]
        for name in names:
            m = c["methods"].get(name, {})
            final = m.get("final_forward_error") if name == "gd" else m.get("final_vs_gd")
            row += [_fmt((m.get("step_error") or {}).get("median")), _fmt(m.get("step_error_gap"), ".3g"),
                    _fmt((final or {}).get("median"), ".3g")]
        rows.append(row)
    return [f"generality: one-step error against exact GD (median over problems), gap = over the in-distribution "
            f"cell's; final after T = {ood['n_iters']} iterations, over GD's"] + _aligned(rows)


def format_table(report: dict[str, Any]) -> str:
    """A short terminal table: one row per method of the iterated report (GD steps per iteration k, its
    iterations, final forward error, floor, floor / (kappa eps), iterations to 1e-6 / 1e-10 / 1e-14,
    contraction and its theory), then the single-step metrics and the generality grid (one row per cell,
    inside or outside the trained range, each method's one-step error and gap)."""
    lines = []
    cfg = report.get("config", {})
    if cfg:
        lines.append("  ".join(f"{k}={v}" for k, v in cfg.items()))
    if report.get("iterated"):
        lines += _iterated_lines(report["iterated"])
    lines += _single_step_lines(report.get("single_step", {}))
    if report.get("ood"):
        lines += _ood_lines(report["ood"])
    return "\n".join(lines)
