"""PNG plots of an evaluation report (lsq_jax.eval.report) and of a training run's metrics.jsonl, the
reader of metrics.jsonl, and the command that redraws a run's plots: python -m lsq_jax.eval.plots <workdir>.

matplotlib is an optional extra (`pip install 'lsq-jax[plot]'`): without it `write_plots` prints one
line on stderr and writes nothing. Figures are drawn with matplotlib's object-oriented API on the Agg
canvas (no pyplot, so no global backend switch in the caller's process) and written through
`etils.epath`, so `out_dir` may be a local folder or a cloud bucket.

    forward_error.png    ||x_t - x*|| / ||x*|| against GD-step equivalents, every method of the report
                         (median, 10-90% band), with the median kappa(A) eps for scale
    convergence.png      relative residual ||A x_t - b|| / ||b|| and distance to exact GD's iterate
    one_step_error.png   from the generality grid: the one-step error against kappa, against L and against
                         the target scale (the others at their in-distribution values), learned next to
                         the constructions and GD's rounding, the trained range shaded
    training_curve.png   training loss against step (log), learning rate on a second axis

The command reads <workdir>/eval/report.json (written by --mode=eval or --mode=construct) and, when
present, <workdir>/metrics.jsonl, and writes the PNGs into <workdir>/eval/. A missing workdir or report,
or an unreadable one, is one line on stderr and exit status 2; without matplotlib the plots are skipped
with a one-line notice (exit status 0).
"""
from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from etils import epath

__all__ = ["main", "read_metrics", "write_plots"]

USAGE = "usage: python -m lsq_jax.eval.plots <workdir>"

# A fixed look per method, so the same method reads the same in every figure: the learned model on top
# and solid, the constructions dashed (they sit on GD's curve, and dashes let GD show through).
_STYLE = {
    "learned": dict(color="black", linewidth=2.0, linestyle="-", zorder=6),
    "baseconv_gd": dict(color="tab:orange", linewidth=1.6, linestyle="--", zorder=5),
    "linear_attention_gd": dict(color="tab:purple", linewidth=1.6, linestyle=":", zorder=5),
    "gd": dict(color="tab:blue", linewidth=1.4, linestyle="-", zorder=4),
    "optimal_gd": dict(color="tab:green", linewidth=1.4, linestyle="-", zorder=3),
    "cg": dict(color="tab:red", linewidth=1.4, linestyle="-", zorder=3),
    "lstsq": dict(color="tab:gray", linewidth=1.4, linestyle="-.", zorder=2),
}
_LABEL = {
    "learned": "learned",
    "baseconv_gd": "BaseConv construction",
    "linear_attention_gd": "linear-attention construction",
    "gd": "exact GD",
    "optimal_gd": "GD, optimal step",
    "cg": "CG (normal equations)",
    "lstsq": "lstsq",
}
_EXTRA_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _style(name: str, index: int) -> dict[str, Any]:
    return dict(_STYLE.get(name, dict(color=_EXTRA_COLORS[index % len(_EXTRA_COLORS)], linewidth=1.4)))


def _values(seq) -> list[float]:
    """JSON values -> floats for a log axis: None, non-finite and non-positive values become NaN (gaps)."""
    out = []
    for v in seq:
        v = math.nan if v is None else float(v)
        out.append(v if math.isfinite(v) and v > 0 else math.nan)
    return out


def _statistic(stats, q: str) -> list[float]:
    """Statistic `q` ("median", "p10", ...) of each cell's stats (None: a gap), for a log axis."""
    return _values([None if st is None else st[q] for st in stats])


def _save(fig, out_dir: epath.Path, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    path = out_dir / name
    path.write_bytes(buf.getvalue())
    return str(path)


def _new_figure(n_panels: int, width: float = 6.4, height: float = 4.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, axes


def _curve_panel(ax, iterated: dict[str, Any], key: str, ylabel: str) -> None:
    for i, (name, m) in enumerate(iterated["methods"].items()):
        k = m.get("steps_per_iter", 1)
        x = [k * ti for ti in m["t"]]
        curve = m[key]
        style = _style(name, i)
        label = _LABEL.get(name, name) + (f" ({k} GD steps / iteration)" if k != 1 else "")
        ax.plot(x, _values(curve["median"]), label=label, **style)
        ax.fill_between(x, _values(curve["p10"]), _values(curve["p90"]), color=style["color"], alpha=0.12,
                        linewidth=0, zorder=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration (GD steps for a k-step method)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def _kappa_eps_line(ax, iterated: dict[str, Any]) -> None:
    kappa = (iterated.get("kappa") or {}).get("median")
    if kappa:
        level = kappa * iterated["eps"]
        ax.axhline(level, color="0.4", linewidth=0.8, linestyle=(0, (1, 3)), zorder=0)
        ax.annotate(r"median $\kappa(A)\,\varepsilon$", xy=(1.0, level), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", va="bottom", fontsize=8,
                    color="0.3")


def _subtitle(report: dict[str, Any]) -> str:
    it = report["iterated"]
    kappa = (it.get("kappa") or {}).get("median")
    eta = it["eta"] if isinstance(it["eta"], str) else f"{it['eta']:g}"
    parts = [f"{it['n_problems']} problems", f"eta = {eta}"]
    if kappa:
        parts.append(f"median kappa(A) = {kappa:.3g}")
    cfg = report.get("config") or {}
    if "n_dims" in cfg and "n_points" in cfg:
        parts.insert(0, f"D = {cfg['n_dims']}, L = {cfg['n_points']}")
    if cfg.get("task"):
        parts.insert(0, f"task {cfg['task']}")
    return ", ".join(parts)


def _forward_error_figure(report: dict[str, Any], out_dir: epath.Path) -> str:
    it = report["iterated"]
    fig, (ax,) = _new_figure(1, width=8.0, height=5.2)
    _curve_panel(ax, it, "forward_error", r"forward error $\|x_t - x^*\| / \|x^*\|$")
    _kappa_eps_line(ax, it)
    ax.set_title("Forward error (median, 10-90% band)\n" + _subtitle(report), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, out_dir, "forward_error.png")


def _convergence_figure(report: dict[str, Any], out_dir: epath.Path) -> str:
    it = report["iterated"]
    fig, (ax_r, ax_d) = _new_figure(2)
    _curve_panel(ax_r, it, "residual", r"relative residual $\|A x_t - b\| / \|b\|$")
    _curve_panel(ax_d, it, "distance_to_gd", r"distance to exact GD $\|x_t - x^{GD}_{kt}\| / \|x^*\|$")
    ax_r.set_title("Relative residual", fontsize=10)
    ax_d.set_title("Distance to exact GD's iterate", fontsize=10)
    ax_d.legend(fontsize=8, loc="best")
    fig.suptitle(_subtitle(report), fontsize=10)
    return _save(fig, out_dir, "convergence.png")


# The generality figure's panels: the cell field on the x axis, its label, whether the axis is logarithmic.
_GENERALITY_AXES = (("kappa", r"$\kappa$ (sampler scale_cond; 1 = Gaussian A)", True),
                    ("n_points", "L (rows of A)", False),
                    ("scale_target", "target scale (||x*|| ~ scale sqrt(D))", True))


def _line_cells(ood: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """The cells that differ from the in-distribution cell in `field` alone (and that cell), sorted by it."""
    base = ood["in_distribution"]
    others = [k for k in ("kappa", "scale_target", "n_points", "n_dims") if k != field]
    cells = [c for c in ood["cells"] if all(c[k] == base[k] for k in others)]
    return sorted(cells, key=lambda c: c[field])


def _trained_span(ax, trained: dict[str, Any] | None, field: str) -> None:
    """Shade the trained range of `field` (a line where it is one value)."""
    if not trained:
        return
    values = trained[field]
    lo, hi = (1, values[-1]) if field == "n_points" and trained.get("every_prefix") else (values[0], values[-1])
    if lo == hi:
        ax.axvline(lo, color="0.5", linewidth=0.8, linestyle="--", zorder=0)
    else:
        ax.axvspan(lo, hi, color="tab:green", alpha=0.08, linewidth=0, zorder=0)


def _generality_figure(report: dict[str, Any], out_dir: epath.Path) -> str | None:
    ood = report["ood"]
    panels = [(field, label, log, _line_cells(ood, field)) for field, label, log in _GENERALITY_AXES]
    panels = [p for p in panels if len(p[3]) >= 2]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), width=5.2)
    for ax, (field, label, log, cells) in zip(axes, panels):
        xs = [c[field] for c in cells]
        names = list(dict.fromkeys(name for c in cells for name in c["methods"]))
        for i, name in enumerate(names):
            stats = [c["methods"].get(name, {}).get("step_error") for c in cells]
            if all(st is None for st in stats):
                continue
            style = _style(name, i)
            legend = "exact GD (the rounding of its step)" if name == "gd" else _LABEL.get(name, name)
            ax.plot(xs, _statistic(stats, "median"), marker="o", markersize=4, label=legend, **style)
            ax.fill_between(xs, _statistic(stats, "p10"), _statistic(stats, "p90"), color=style["color"],
                            alpha=0.12, linewidth=0)
        out = [c[field] for c in cells if c.get("in_range") is False]
        if out:
            ax.plot(out, [0.02] * len(out), linestyle="none", marker="x", color="tab:red",
                    transform=ax.get_xaxis_transform(), label="outside the trained range")
        _trained_span(ax, ood.get("trained"), field)
        if log:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(f"against {label.split(' (')[0]}", fontsize=10)
    axes[0].set_ylabel(r"one-step error $\|x_1 - x^{GD}_k\| / \|x^{GD}_k - x_0\|$")
    axes[-1].legend(fontsize=8, loc="best")
    base = ood["in_distribution"]
    fig.suptitle(f"Generality: one step against exact GD, median and 10-90% band over problems; elsewhere "
                 f"kappa = {base['kappa']:g}, scale = {base['scale_target']:g}, L = {base['n_points']}, "
                 f"D = {base['n_dims']}; shaded (dashed): trained range", fontsize=10)
    return _save(fig, out_dir, "one_step_error.png")


def _training_figure(records: Sequence[dict[str, Any]], out_dir: epath.Path) -> str | None:
    train = [r for r in records if r.get("loss") is not None and "step" in r]
    if not train:
        return None
    fig, (ax,) = _new_figure(1, width=8.0, height=4.8)
    steps = [r["step"] for r in train]
    ax.plot(steps, _values(r["loss"] for r in train), color="black", linewidth=1.4, label="training loss (MSE)")
    evals = [r for r in records if r.get("eval_mse") is not None]
    if evals:
        ax.plot([r["step"] for r in evals], _values(r["eval_mse"] for r in evals), linestyle="none",
                marker="*", markersize=10, color="tab:red", label="test MSE")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE)")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    lr = [(r["step"], r["learning_rate"]) for r in train if r.get("learning_rate") is not None]
    if lr:
        ax_lr = ax.twinx()
        ax_lr.plot([s for s, _ in lr], _values(v for _, v in lr), color="tab:blue", linewidth=1.0, alpha=0.8,
                   label="learning rate")
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate", color="tab:blue")
        ax_lr.tick_params(axis="y", colors="tab:blue")
        h, lab = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    ax.set_title("Training curve", fontsize=10)
    return _save(fig, out_dir, "training_curve.png")


def write_plots(report: dict[str, Any] | None, metrics_records: Sequence[dict[str, Any]] | None, out_dir
                ) -> list[str]:
    """Draw every plot the inputs allow into `out_dir` (created if needed); return the written paths.

    Args:
        report: an evaluation report (evaluate_experiment / evaluate_constructions, or its JSON), or None.
            Its 'iterated' part gives forward_error.png and convergence.png, its 'ood' part
            one_step_error.png.
        metrics_records: the records of metrics.jsonl (dicts with 'step', 'loss', 'learning_rate', and
            'eval_mse' for the final evaluation), or None: training_curve.png.
        out_dir: a local or cloud (etils.epath) folder.

    Returns:
        The paths written, as strings; [] when matplotlib is not installed (one notice on stderr).
    """
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'lsq-jax[plot]')", file=sys.stderr)
        return []
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str | None] = []
    if report and report.get("iterated"):
        written.append(_forward_error_figure(report, out))
        written.append(_convergence_figure(report, out))
    if report and report.get("ood"):
        written.append(_generality_figure(report, out))
    if metrics_records:
        written.append(_training_figure(metrics_records, out))
    return [p for p in written if p is not None]


def read_metrics(path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (local or a URL such as gs://)."""
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """The command: redraw the plots of the workdir named in `argv` (default sys.argv[1:]); the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or args[0].startswith("-"):
        return _fail(USAGE)
    workdir = epath.Path(args[0])
    if not workdir.is_dir():
        return _fail(f"workdir {args[0]!r} does not exist")
    report_path = workdir / "eval" / "report.json"
    if not report_path.exists():
        return _fail(f"{report_path} does not exist: run the evaluation (--mode=eval or --mode=construct) first")
    try:
        report = json.loads(report_path.read_text())
        metrics_path = workdir / "metrics.jsonl"
        records = read_metrics(metrics_path) if metrics_path.exists() else []
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        return _fail(f"cannot read the report or metrics of {args[0]!r}: {' '.join(str(err).split())}")
    if not isinstance(report, dict):
        return _fail(f"{report_path} is not a report (expected a JSON object)")
    for path in write_plots(report, records, workdir / "eval"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
