"""Time to precision: training runs against the wall clock, compared over methods and seeds."""
from __future__ import annotations

import statistics
import time

from lsq_jax.bench.generality import generality, summarize
from lsq_jax.bench.lm import LM_VARIANTS, chosen_start, iterated_use

PRECISION_LEVELS = tuple(10.0 ** -k for k in range(1, 15))
HYBRID_ADAM_STEPS = 500
# Time-to-precision methods as config overrides: Adam, Adam then LM (the hybrid), and LM's damping variants
# (lsq_jax.bench.lm.LM_VARIANTS; "lm" is the config's own).
PRECISION_METHODS = {"adam": {"optim.optimizer": "adam"},
                     "hybrid": {"optim.optimizer": "lm", "optim.lm_after": HYBRID_ADAM_STEPS}, **LM_VARIANTS}


def experiment(config, **overrides):
    """The Experiment of an ml_collections config with flattened overrides ("optim.lr": ...). Overrides that
    leave Levenberg-Marquardt (an LM config compared with Adam) leave its settings too."""
    from lsq_jax.config.experiment import experiment_from_config
    from lsq_jax.config.optim import lm_defaults

    c = config.copy_and_resolve_references()
    c.update_from_flattened_dict(overrides)
    if c.optim.optimizer != "lm":
        c.optim.update(lm_defaults())
    return experiment_from_config(c)


def time_to_precision(config, budget_s: float, batch_size: int = 0, seed: int | None = None,
                      **overrides) -> dict:
    """Train for a wall-clock budget; the test MSE against training seconds, the time and step at which
    it first falls below 10^-k, and the final model's iterated use (lsq_jax.bench.lm.iterated_use) and
    generality grid (lsq_jax.bench.generality.generality).
    Each point of the curve also holds the parameters' 2-norm: a fit that only approaches its target as
    parameters grow without bound shows there.

    After every second of training (one step when a step takes longer: an LM iteration takes seconds, an
    Adam step milliseconds) the test MSE is measured on a fixed batch of fresh problems, outside the
    training time, so methods are compared at equal training wall-clock. With optim.lm_restarts the starts
    are trained first (lsq_jax.train.loop.best_start) and their iterations count as training; the curve goes
    on from the chosen start. `batch_size` 0 keeps
    the config's own (its learning rate is tuned for it); `overrides` are config fields ("optim.lr": ...).
    """
    import jax
    import optax

    from lsq_jax.config.check import ConfigError
    from lsq_jax.mesh import make_mesh
    from lsq_jax.train.loop import drive
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.state import init_state, place_state
    from lsq_jax.train.step import Steps, evaluate_loss

    overrides.setdefault("train.num_steps", 10**9)  # the budget ends the run, not the config's step count
    if batch_size:
        overrides["train.batch_size"] = batch_size
    if seed is not None:
        overrides["seed"] = seed
    exp = experiment(config, **overrides)
    try:
        plan = make_plan(exp, make_mesh())
    except ConfigError as err:
        return {"config": exp.name, "optimizer": exp.optim.optimizer, "seed": exp.seed, "skipped": str(err)}
    evaluate = jax.jit(lambda p: (evaluate_loss(p, plan)["mse"], optax.tree.norm(p)))

    def point(step, seconds, params):
        mse, norm = evaluate(params)
        return {"step": step, "seconds": seconds, "test_mse": float(mse), "param_norm": float(norm)}

    state = place_state(init_state(plan), plan.mesh)
    curve = [point(0, 0.0, state.params)]
    crossings = {}
    steps = Steps(plan, warm=True)  # each new step compiled and run once before its time counts
    trained_s, since, build_s = 0.0, time.perf_counter(), 0.0
    state, restarts = chosen_start(steps, state)
    if restarts:
        trained_s, build_s = time.perf_counter() - since - steps.build_s, steps.build_s
        curve.append(point(int(state.step), trained_s, state.params))
        since = time.perf_counter()

    def after_step(step, state, metrics):
        """Adds the step's seconds (its building excluded); measures the test MSE once a second of
        training has passed since the last measurement; stops at the budget."""
        nonlocal trained_s, since, build_s
        jax.block_until_ready(state)
        trained_s += time.perf_counter() - since - (steps.build_s - build_s)
        build_s = steps.build_s
        if trained_s - curve[-1]["seconds"] >= 1.0 or trained_s >= budget_s or step + 1 == exp.train.num_steps:
            curve.append(point(step + 1, trained_s, state.params))
            mse = curve[-1]["test_mse"]
            for level in PRECISION_LEVELS:
                if mse < level and f"{level:.0e}" not in crossings:
                    crossings[f"{level:.0e}"] = {"seconds": trained_s, "step": step + 1}
        since = time.perf_counter()
        return trained_s >= budget_s

    state, _ = drive(steps, state, exp.train.num_steps, after_step)
    return {"config": exp.name, "optimizer": exp.optim.optimizer, "seed": exp.seed, "batch_size": exp.train.batch_size,
            "budget_s": budget_s, "steps": int(state.step), "final_test_mse": curve[-1]["test_mse"],
            "crossings": crossings, "curve": curve, **restarts, **iterated_use(plan.report, state.params),
            "generality": generality(plan.report, state.params)}


def mse_at(curve: list[dict], seconds: float) -> float | None:
    """The test MSE of the last measurement at or before `seconds` of training (None past the run)."""
    if curve[-1]["seconds"] < seconds * 0.98:
        return None
    return [p for p in curve if p["seconds"] <= seconds * 1.02][-1]["test_mse"]


def compare_optimizers(config, budget_s: float, methods: dict[str, dict], seeds: list[int],
                       marks: tuple[float, ...] = (60.0, 300.0, 600.0)) -> dict:
    """time_to_precision of each method (config overrides) and seed; per method the median and range over
    seeds of the test MSE at each mark of training seconds within the budget, and at the budget, of the
    final model's iterated forward error and contraction (with GD's), and of its generality figures
    (lsq_jax.bench.generality.summarize)."""
    marks = tuple(sorted({m for m in marks if m <= budget_s} | {budget_s}))  # and the budget's end
    runs = {name: [time_to_precision(config, budget_s, seed=seed, **dict(overrides)) for seed in seeds]
            for name, overrides in methods.items()}
    skipped = {name: r[0]["skipped"] for name, r in runs.items() if "skipped" in r[0]}
    runs = {name: r for name, r in runs.items() if name not in skipped}
    rows = []
    for name, method_runs in runs.items():
        row = {"method": name, "seeds": len(method_runs)}
        for mark in marks:
            values = sorted(v for v in (mse_at(r["curve"], mark) for r in method_runs) if v is not None)
            if values:
                row[f"{mark:.0f}s"] = statistics.median(values)
                row[f"{mark:.0f}s_range"] = f"{values[0]:.1e}..{values[-1]:.1e}"
        for key in ("learned_forward_error", "learned_contraction", "gd_contraction"):
            values = sorted(r[key] for r in method_runs if r.get(key) is not None)
            if values:
                row[key], row[f"{key}_range"] = statistics.median(values), f"{values[0]:.2g}..{values[-1]:.2g}"
        row.update(summarize(method_runs))
        rows.append(row)
    return {"budget_s": budget_s, "marks": list(marks), "rows": rows, "runs": runs,
            "skipped": skipped}


def plot_comparison(result: dict, path: str) -> str | None:
    """Test MSE against training seconds, one line per method and seed (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not result["runs"]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, runs) in enumerate(result["runs"].items()):
        for j, run in enumerate(runs):
            ax.semilogy([p["seconds"] for p in run["curve"]], [p["test_mse"] for p in run["curve"]],
                        color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("test MSE")
    ax.set_title(f"{runs[0]['config']}: {len(runs)} seeds per method")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
