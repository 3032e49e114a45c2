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
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines.append("  ".join(cells))
    return lines


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
    """One line per OOD cell: each method's step and final errors with their gaps."""
    lines = []
    for cell in ood["cells"]:
        desc = (f"ood {cell['axis']:<11} kappa={cell['kappa']:<5g} scale={cell['scale_target']:<4g} "
                f"L={cell['n_points']:<3} D={cell['n_dims']:<3}")
        cols = []
        for name, m in cell["methods"].items():
            if "step_error" in m:
                cols.append(f"{name}: step {_fmt(m['step_error']['median'])}"
                            f" (gap {_fmt(m['step_error_gap'], '.3g')})"
                            f" final {_fmt(m['final_forward_error']['median'])}"
                            f" (gap {_fmt(m['final_error_gap'], '.3g')},"
                            f" vs gd {_fmt(m['final_vs_gd']['median'], '.3g')})")
        lines.append(desc + " | " + " | ".join(cols))
    return lines


def format_table(report: dict[str, Any]) -> str:
    """A short terminal table: one row per method of the iterated report (GD steps per iteration k, its
    iterations, final forward error, floor, floor / (kappa eps), iterations to 1e-6 / 1e-10 / 1e-14,
    contraction and its theory), then the single-step metrics and the OOD cells with their gaps."""
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
