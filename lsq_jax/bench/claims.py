"""The papers' claims, checked at laptop scale: `python -m lsq_jax.bench --bench=claims [--quick]`.

Each claim of the two papers' abstracts becomes one or more rows: the paper's figure, the figure measured
here (median and range over --seeds), the ratio where the claim is a ratio, whether it holds by the row's
stated criterion, and the command that reruns each training it needs. Every model is trained here from
random initialisation for a fixed number of iterations (`TRAININGS`), so the figures do not depend on the
machine's load; the seconds each training took are reported beside them. A training that several claims use
(the learned GD step, the end-to-end Transformer) runs once per seed.

`--quick` trains one-layer versions of the models for `QUICK_STEPS` iterations (LM without geodesic
acceleration, which halves its compilation) and evaluates them on few problems: it checks the machinery (the
tests run it); its rows say `quick` and its figures are not the claims.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from typing import Any, Callable, NamedTuple

from lsq_jax.bench.precision import experiment

QUICK_STEPS = 2
QUICK_OVERRIDES = {"model.n_layer": 1, "train.batch_size": 64, "optim.lm_geodesic": False,  # (LM's runs only)
                   "train.eval_batch_size": 256, "train.eval_problems": 32, "train.eval_iters": 40}
OOD_KAPPA = 100.0  # the out-of-distribution cell of the generality claim: condition number 100, trained at 1
CONSTRUCTION_PROBLEMS = 256


@dataclasses.dataclass(frozen=True)
class Training:
    """One trained model of the claims: `config` (FILE.py:VARIANT, from the repository root) trained `steps`
    iterations with `overrides` (config fields)."""
    label: str
    config: str
    steps: int
    overrides: tuple[tuple[str, Any], ...] = ()

    def command(self) -> str:
        """The command line that trains it as the bench does (add --config.seed=S for another seed)."""
        flags = "".join(f" --config.{k}={v}" for k, v in (("train.num_steps", self.steps), *self.overrides))
        return f"python -m lsq_jax.main --config={self.config}{flags}"


TRAININGS = {
    "learned_gd": Training("learned GD step (linear attention, LM)", "configs/linear_attention.py:lm", 150),
    "transformer": Training("end-to-end Transformer (softmax, LM)", "configs/transformer_lsq.py:lm", 100),
    "multiply_baseconv": Training("BaseConv on multiply (LM)", "configs/primitives.py:multiply,lm", 100),
    "multiply_linear_attention": Training("linear attention on multiply (LM)",
                                          "configs/primitives.py:multiply,linear_attention,lm", 100),
    "multiply_softmax": Training("softmax attention on multiply (LM)", "configs/primitives.py:multiply,attention,lm",
                                 100),
    "recipe": Training("BaseConv, Adam with the high-precision recipe", "configs/baseconv.py:cpu", 4000),
    "plain_adam": Training("BaseConv, plain Adam (constant LR, no EMA)", "configs/baseconv.py:cpu", 4000,
                           (("optim.schedule", "constant"), ("optim.ema_lambda", 0.0))),
    "multistep": Training("k-step GD model (linear attention, LM)", "configs/multistep_gd.py:lm", 200),
}


CURVE_POINTS = 20  # test MSE measurements along each training (outside its seconds)


class Trained(NamedTuple):
    """A finished training: its run plan, final parameters, seconds of training (compilation included), test
    MSE on the plan's evaluation batch, and the curve of test MSE against iterations and seconds."""
    plan: Any
    params: Any
    seconds: float
    test_mse: float
    curve: tuple = ()


def _plan(training: Training, seed: int, quick: bool):
    """The run plan of `training` on seed `seed` (its steps, or QUICK_STEPS and QUICK_OVERRIDES)."""
    from lsq_jax.config.load import load_config_file
    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import make_plan

    path, _, variant = training.config.partition(":")
    overrides = {"seed": seed, "train.num_steps": QUICK_STEPS if quick else training.steps,
                 **dict(training.overrides), **(QUICK_OVERRIDES if quick else {})}
    return make_plan(experiment(load_config_file(path, variant or None), **overrides), make_mesh())


def train(training: Training, seed: int, quick: bool) -> Trained:
    """`training` from random initialisation (seed `seed`) for its steps (QUICK_STEPS with `quick`), the test
    MSE measured CURVE_POINTS times along the way. With optim.lm_restarts the starts are trained first, as
    a run of the config trains them (lsq_jax.train.loop.best_start), and their seconds count."""
    import jax

    from lsq_jax.bench.lm import chosen_start
    from lsq_jax.train.loop import drive
    from lsq_jax.train.state import init_state, place_state
    from lsq_jax.train.step import Steps, evaluate_loss

    plan = _plan(training, seed, quick)
    num_steps = plan.exp.train.num_steps
    evaluate = jax.jit(lambda p: evaluate_loss(p, plan)["mse"])
    every = max(1, num_steps // CURVE_POINTS)
    seconds, since = 0.0, time.perf_counter()
    state = place_state(init_state(plan), plan.mesh)
    curve = [{"step": 0, "seconds": 0.0, "test_mse": _finite_or_inf(float(evaluate(state.params)))}]
    steps = Steps(plan)
    started = time.perf_counter()
    state, choice = chosen_start(steps, state)
    if choice:  # the config has restarts: they are trained, and their seconds count
        seconds = time.perf_counter() - started
        curve.append({"step": int(state.step), "seconds": seconds,
                      "test_mse": _finite_or_inf(float(evaluate(state.params)))})
        since = time.perf_counter()

    def after_step(step, state, metrics):
        nonlocal seconds, since
        if (step + 1) % every == 0 or step + 1 == num_steps:
            jax.block_until_ready(state)
            seconds += time.perf_counter() - since
            curve.append({"step": step + 1, "seconds": seconds,
                          "test_mse": _finite_or_inf(float(evaluate(state.params)))})
            since = time.perf_counter()
        return False

    state, _ = drive(steps, state, num_steps, after_step)
    return Trained(plan, state.params, seconds, curve[-1]["test_mse"], tuple(curve))


def _saved_as(directory: str, name: str, seed: int, quick: bool) -> str:
    return os.path.join(directory, f"{name}-seed{seed}{'-quick' if quick else ''}")


def _what(training: Training) -> dict:
    """The training as its JSON record holds it (what a saved training must match to be reused)."""
    return json.loads(json.dumps(dataclasses.asdict(training)))


def save_trained(directory: str, name: str, seed: int, quick: bool, trained: Trained, record: dict) -> None:
    """A finished training's parameters (NPZ, in tree order) and record (JSON) under `directory`, each
    written whole or not at all."""
    import jax
    import numpy as np

    os.makedirs(directory, exist_ok=True)
    stem = _saved_as(directory, name, seed, quick)
    with open(stem + ".npz.tmp", "wb") as f:
        np.savez(f, *jax.tree.leaves(jax.device_get(trained.params)))
    os.replace(stem + ".npz.tmp", stem + ".npz")
    with open(stem + ".json.tmp", "w") as f:
        json.dump({"training_spec": _what(TRAININGS[name]), **_json(record)}, f)
    os.replace(stem + ".json.tmp", stem + ".json")


def load_trained(directory: str, name: str, seed: int, quick: bool) -> tuple[Trained, dict] | None:
    """A training saved by `save_trained` with today's spec of `name` (config, steps, overrides), or None."""
    import jax
    import numpy as np

    from lsq_jax.train.state import init_state

    stem = _saved_as(directory, name, seed, quick)
    try:
        with open(stem + ".json") as f:
            record = json.load(f)
        if record.pop("training_spec") != _what(TRAININGS[name]):
            return None
        with np.load(stem + ".npz") as saved:
            leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    except (OSError, ValueError, KeyError):
        return None
    plan = _plan(TRAININGS[name], seed, quick)
    treedef = jax.tree.structure(jax.eval_shape(lambda: init_state(plan)).params)
    params = jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])
    curve = tuple(record["curve"])
    return Trained(plan, params, record["seconds"], record["test_mse"], curve), record


# ---------------------------------------------------------------------------------------------------
# What the claims measure on trained models


def _apply(trained: Trained) -> Callable:
    def apply_fn(params, inputs):
        return trained.plan.model.apply({"params": params}, inputs)
    return apply_fn


def _solution_problems(transformer: Trained):
    """The end-to-end Transformer's test problems (its report's single-step key and count): the batch and
    the Transformer's estimate of x* for each."""
    import jax

    from lsq_jax.data.samplers import example_keys

    plan, report = transformer.plan, transformer.plan.report
    batch = plan.task.sample(example_keys(jax.random.fold_in(report.key, 0), 0, 0, report.sizes.n_problems))
    estimate = plan.task.read(jax.jit(_apply(transformer))(transformer.params, batch.inputs))[:, -1]
    return batch.raw, estimate


def _mse(x, x_star) -> float:
    import jax.numpy as jnp

    return _finite_or_inf(float(jnp.mean((x - x_star) ** 2)))


def iterated_against_transformer(learned: Trained, transformer: Trained) -> dict:
    """On the Transformer's test problems: the MSE of x* estimated by the Transformer in one pass, and of
    the learned GD step and of exact GD, each applied the learned run's report iterations from x0."""
    import jax.numpy as jnp

    from lsq_jax.eval.solvers import gd_solver, learned_gradient_solver, run_solver
    from lsq_jax.eval.stats import report_times

    raw, estimate = _solution_problems(transformer)
    l_exp, t_exp = learned.plan.exp.task, transformer.plan.exp.task
    if (l_exp.n_dims, l_exp.n_points) != (t_exp.n_dims, t_exp.n_points):
        raise ValueError(f"the learned step ({l_exp.n_dims} dims, {l_exp.n_points} rows) and the Transformer "
                         f"({t_exp.n_dims}, {t_exp.n_points}) must be trained on problems of one size")
    n_iters = learned.plan.report.sizes.n_iters
    solver = learned_gradient_solver(_apply(learned), learned.params)
    xs_learned = run_solver(solver, raw.a, raw.b, raw.x0, n_iters)
    xs_gd = run_solver(gd_solver(), raw.a, raw.b, raw.x0, n_iters)
    points = report_times(n_iters)
    learned_mse, gd_mse = (jnp.mean((xs - raw.x_star) ** 2, axis=(1, 2))[jnp.asarray(points)]
                           for xs in (xs_learned, xs_gd))
    return {"transformer_mse": _mse(estimate, raw.x_star), "learned_iterated_mse": _mse(xs_learned[-1], raw.x_star),
            "gd_iterated_mse": _mse(xs_gd[-1], raw.x_star), "iterations": n_iters,
            "curve": {"iteration": points, "learned_mse": [_finite_or_inf(float(v)) for v in learned_mse],
                      "gd_mse": [_finite_or_inf(float(v)) for v in gd_mse]},
            "transformer_params": transformer.plan.n_params, "learned_params": learned.plan.n_params}


def own_error(trained: Trained, kappa: float) -> float:
    """Median relative error of the model's own output at its task's size, on problems drawn as the report's
    generality grid draws them (lsq_jax.eval.ood.draw_cell) with condition number `kappa`: the gradient
    ||g_pred - g|| / ||g|| of a learned step, the forward error ||x_pred - x*|| / ||x*|| of an end-to-end
    model."""
    import jax
    import jax.numpy as jnp

    from lsq_jax.eval.ood import draw_cell
    from lsq_jax.eval.stats import relative_error_b

    plan, cfg = trained.plan, trained.plan.exp.task
    cell = {"kappa": kappa, "scale_target": cfg.scale_target, "n_points": cfg.n_points, "n_dims": cfg.n_dims}
    raw = draw_cell(jax.random.fold_in(plan.report.key, 2), cell, plan.report.sizes.n_problems, cfg.n_dims,
                    normalize_a=cfg.normalize_a, normalize_x=cfg.normalize_x, dtype=plan.task.dtype)
    inputs, targets = plan.task.build(raw)
    estimate = plan.task.read(jax.jit(_apply(trained))(trained.params, inputs))[:, -1]
    return _finite_or_inf(float(jnp.median(relative_error_b(estimate, targets[:, -1], targets[:, -1]))))


def generality_gap(trained: Trained) -> dict:
    """The model's own relative error in distribution and at condition number OOD_KAPPA: their difference
    (the gap) and their ratio."""
    inside, outside = own_error(trained, trained.plan.exp.task.scale_cond), own_error(trained, OOD_KAPPA)
    return {"in_distribution": inside, "out_of_distribution": outside, "gap": _finite_or_inf(outside - inside),
            "gap_ratio": _ratio(outside, inside)}


def construction_error(kind: str, seed: int, n_dims: int, n_points: int) -> float:
    """Largest relative difference between one step of the hand-built `kind` model ('baseconv' or
    'linear_attention') and one exact GD step, over CONSTRUCTION_PROBLEMS problems of seed `seed`."""
    import jax
    import jax.numpy as jnp

    from lsq_jax.data import samplers
    from lsq_jax.eval.constructions import construction_solver
    from lsq_jax.eval.solvers import gd_solver, run_solver
    from lsq_jax.eval.stats import relative_error_b

    keys = samplers.example_keys(jax.random.key(seed), 0, 0, CONSTRUCTION_PROBLEMS)
    s = samplers.least_squares(keys, n_points, n_dims)
    x_gd = run_solver(gd_solver(), s.a, s.b, s.x0, 1)[1]
    x_built = run_solver(construction_solver(kind, n_dims, n_points), s.a, s.b, s.x0, 1)[1]
    return float(jnp.max(relative_error_b(x_built, x_gd, x_gd - s.x0)))


# ---------------------------------------------------------------------------------------------------
# The rows


def _finite_or_inf(x: float) -> float:
    """An error figure: a diverged one (NaN or inf) is +inf."""
    return x if math.isfinite(x) else math.inf


def _ratio(num: float, den: float) -> float:
    """num / den of two error figures (+inf: diverged): a diverged denominator gives 0, a diverged numerator
    +inf, both diverged NaN (not comparable)."""
    if math.isinf(num) and math.isinf(den):
        return math.nan
    return math.inf if den == 0 else num / den


def _median(values: list[float]) -> float:
    """The median, a NaN (not comparable) counted as -inf: a criterion 'at least' never passes on it."""
    return statistics.median(-math.inf if math.isnan(v) else v for v in values)


def _summary(values: list[float]) -> tuple[float | None, list[float | None]]:
    """Median and range for JSON: None where not finite."""
    from lsq_jax.eval.stats import json_float

    ordered = sorted(-math.inf if math.isnan(v) else v for v in values)
    return json_float(_median(values)), [json_float(ordered[0]), json_float(ordered[-1])]


def row(claim: str, paper: str, measured: str, values: list[float], *, criterion: str, holds: bool | None,
        trainings: tuple[str, ...], ratio: list[float] | None = None, ratio_of: str = "", **details) -> dict:
    """One row of the table: `values` (one per seed) summarised by median and range, likewise `ratio`."""
    out = {"claim": claim, "paper": paper, "what": measured}
    out["measured"], out["measured_range"] = _summary(values)
    out["per_seed"] = [_summary([v])[0] for v in values]
    if ratio is not None:
        out["ratio"], out["ratio_range"] = _summary(ratio)
        out["ratio_of"] = ratio_of
    out.update(holds=holds, criterion=criterion,
               commands=[TRAININGS[t].command() for t in trainings], **details)
    return out


def _log(line: str) -> None:
    print(line, flush=True)


def claim_rows(seeds: list[int], quick: bool, log=_log, directory: str | None = None
               ) -> tuple[list[dict], list[dict]]:
    """The claims' rows over `seeds`, and one record per training (label, seed, steps, seconds, test MSE,
    parameters, command, curve). With `directory`, each finished training is saved there and one saved by
    an earlier run of the same spec is reused: a stopped bench goes on where it stopped."""
    cache: dict[tuple[str, int], Trained] = {}
    runs: list[dict] = []
    started, trained_here = time.perf_counter(), 0

    def trained(name: str, seed: int) -> Trained:
        nonlocal trained_here
        if (name, seed) in cache:
            return cache[name, seed]
        t = TRAININGS[name]
        saved = load_trained(directory, name, seed, quick) if directory else None
        if saved is not None:
            cache[name, seed], record = saved
            runs.append(record)
            log(f"claims: {t.label}, seed {seed}: reused from {directory}")
            return cache[name, seed]
        cache[name, seed] = result = train(t, seed, quick)
        runs.append({"training": name, "label": t.label, "config": t.config, "seed": seed,
                     "steps": QUICK_STEPS if quick else t.steps, "seconds": result.seconds,
                     "test_mse": result.test_mse, "params": result.plan.n_params, "command": t.command(),
                     "curve": list(result.curve)})
        if directory:
            save_trained(directory, name, seed, quick, result, runs[-1])
        trained_here += 1
        done, total, elapsed = len(runs), len(TRAININGS) * len(seeds), time.perf_counter() - started
        log(f"claims: [{done}/{total}] {t.label}, seed {seed}: {runs[-1]['steps']} iterations in "
            f"{result.seconds:.0f} s, test MSE {result.test_mse:.2e}; elapsed {elapsed / 60:.1f} min, "
            f"ETA {elapsed / trained_here * (total - done) / 60:.1f} min")
        return cache[name, seed]

    def per_seed(fn: Callable[[int], Any]) -> list[Any]:
        return [fn(s) for s in seeds]

    rows = []
    solution = per_seed(lambda s: iterated_against_transformer(trained("learned_gd", s), trained("transformer", s)))
    rows.append(row(
        "1. Transformers trained on least squares plateau near MSE 1e-5, 9 orders of magnitude above GD",
        "MSE ~1e-5; 1e9 x GD's", "end-to-end Transformer's test MSE of x*",
        [r["transformer_mse"] for r in solution],
        ratio=[_ratio(r["transformer_mse"], r["gd_iterated_mse"]) for r in solution],
        ratio_of="Transformer's MSE / GD's after the same problems' iterations",
        criterion="the Transformer stays at or above 1e-6 on every seed (it does not pass the plateau) and 1e6x "
                  "above GD",
        holds=all(r["transformer_mse"] >= max(1e-6, 1e6 * r["gd_iterated_mse"]) for r in solution),
        trainings=("transformer",), transformer_params=solution[0]["transformer_params"]))

    multiply = {m: per_seed(lambda s, m=m: trained(f"multiply_{m}", s).test_mse)
                for m in ("softmax", "baseconv", "linear_attention")}
    for mixer, name in (("baseconv", "BaseConv"), ("linear_attention", "linear attention")):
        ratios = [_ratio(soft, own) for soft, own in zip(multiply["softmax"], multiply[mixer])]
        rows.append(row(
            f"2. Softmax attention struggles to learn element-wise multiplication precisely; {name} represents it",
            "softmax imprecise; polynomial mixers exact", f"{name}'s test MSE on multiply", multiply[mixer],
            ratio=ratios, ratio_of="softmax attention's test MSE / this mixer's",
            criterion="softmax attention's test MSE at least 100x this mixer's on every seed",
            holds=all(r >= 100 for r in ratios), trainings=(f"multiply_{mixer}", "multiply_softmax"),
            softmax_mse=multiply["softmax"],
            params={m: trained(f"multiply_{m}", seeds[0]).plan.n_params for m in multiply}))

    task = trained("learned_gd", seeds[0]).plan.exp.task
    for kind, name in (("baseconv", "BaseConv"), ("linear_attention", "linear attention")):
        errors = per_seed(lambda s, kind=kind: construction_error(kind, s, task.n_dims, task.n_points))
        rows.append(row(
            f"3. {name} implements a GD iterate exactly (weight construction)", "exact",
            f"largest relative difference from one exact GD step ({CONSTRUCTION_PROBLEMS} problems, D = "
            f"{task.n_dims}, L = {task.n_points})", errors,
            criterion="at most 1e-13 (float64 round-off) on every seed", holds=all(e <= 1e-13 for e in errors),
            trainings=()))

    recipe = per_seed(lambda s: trained("recipe", s).test_mse)
    plain = per_seed(lambda s: trained("plain_adam", s).test_mse)
    learned = per_seed(lambda s: trained("learned_gd", s).test_mse)
    multistep = per_seed(lambda s: trained("multistep", s).test_mse)
    for claim, paper, what, values, limit, names in (
            ("4. The high-precision recipe learns one GD iterate to MSE ~1e-13 (Adam, millions of steps)",
             "~1e-13", f"recipe's test MSE after {TRAININGS['recipe'].steps} steps", recipe, 1e-12, ("recipe",)),
            ("4. One GD iterate to MSE ~1e-13, here by Levenberg-Marquardt", "~1e-13",
             f"learned GD step's test MSE after {TRAININGS['learned_gd'].steps} LM iterations", learned, 1e-12,
             ("learned_gd",)),
            ("4. Several GD iterates learned to MSE ~1e-10", "~1e-10",
             f"k-step GD model's test MSE after {TRAININGS['multistep'].steps} LM iterations", multistep, 1e-9,
             ("multistep",))):
        rows.append(row(claim, paper, what, values, criterion=f"median at most {limit:.0e} (10x the paper's)",
                        holds=_median(values) <= limit, trainings=names))
    ratios = [_ratio(p, r) for p, r in zip(plain, recipe)]
    rows.append(row(
        "4. The recipe's adaptive LR and EMA cut the gradient noise that stalls plain Adam",
        "recipe below plain Adam", "recipe's test MSE", recipe, ratio=ratios,
        ratio_of="plain Adam's test MSE / the recipe's, same steps and batches",
        criterion="the recipe below plain Adam on every seed", holds=all(r > 1 for r in ratios),
        trainings=("recipe", "plain_adam"), plain_adam_mse=plain))

    ratios = [_ratio(r["transformer_mse"], r["learned_iterated_mse"]) for r in solution]
    rows.append(row(
        "5. Applied iteratively, the learned GD step reaches 100,000x (workshop paper: 100x) lower MSE than a "
        "Transformer of matched size trained end to end", "1e5 (1e2)",
        f"learned GD step's MSE of x* after {solution[0]['iterations']} applications",
        [r["learned_iterated_mse"] for r in solution], ratio=ratios,
        ratio_of="the Transformer's MSE / the iterated learned step's, same problems",
        criterion="median ratio at least 1e5", holds=_median(ratios) >= 1e5,
        trainings=("learned_gd", "transformer"), gd_iterated_mse=[r["gd_iterated_mse"] for r in solution],
        transformer_mse=[r["transformer_mse"] for r in solution], curves=[r["curve"] for r in solution],
        params={"learned": solution[0]["learned_params"], "transformer": solution[0]["transformer_params"]}))

    gaps = per_seed(lambda s: (generality_gap(trained("learned_gd", s)), generality_gap(trained("transformer", s))))
    ratios = [_ratio(t["gap"], g["gap"]) for g, t in gaps]
    rows.append(row(
        "6. Out of distribution, the learned GD step's generalisation gap is 10,000x smaller than a Transformer's",
        "1e4", f"learned GD step's gap: its relative error at kappa {OOD_KAPPA:g} minus in distribution",
        [g["gap"] for g, _ in gaps], ratio=ratios, ratio_of="the Transformer's gap / the learned step's",
        criterion="median ratio at least 1e4", holds=_median(ratios) >= 1e4,
        trainings=("learned_gd", "transformer"), learned=[g for g, _ in gaps], transformer=[t for _, t in gaps]))
    if quick:
        for r in rows:
            r["quick"] = True
    return _json(rows), _json(runs)


def _json(x):
    """`x` with every float that is not finite as None (JSON has no inf or NaN)."""
    from lsq_jax.eval.stats import json_float

    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    return json_float(x) if isinstance(x, float) else x


def print_claims(rows: list[dict], runs: list[dict], seeds: list[int], quick: bool) -> None:
    """The table: claim, paper, measured (median, range), ratio, holds; then each training's command."""
    title = "claims (QUICK: machinery check, not the claims' figures)" if quick else "claims"
    print(f"{title}, seeds {','.join(map(str, seeds))}: median [range]")
    def g(x):
        return "n/a" if x is None else f"{x:.3g}"

    for r in rows:
        lo, hi = r["measured_range"]
        ratio = f"; ratio {g(r['ratio'])} [{g(r['ratio_range'][0])}, {g(r['ratio_range'][1])}]" if "ratio" in r else ""
        verdict = {True: "HOLDS", False: "does not hold", None: "-"}[r["holds"]]
        print(f"- {r['claim']}\n    paper {r['paper']} | {r['what']}: {g(r['measured'])} [{g(lo)}, {g(hi)}]"
              f"{ratio} | {verdict} ({r['criterion']})")
    print("trainings (rerun one with --config.seed=S):")
    seen = {}
    for run in runs:
        seen.setdefault(run["training"], []).append(run)
    for name, rs in seen.items():
        secs = ", ".join(f"{x['seconds']:.0f}" for x in rs)
        print(f"  {rs[0]['label']} (P = {rs[0]['params']}): {rs[0]['steps']} iterations, {secs} s; {rs[0]['command']}")


def plot_claims(rows: list[dict], runs: list[dict], prefix: str) -> list[str]:
    """Where a curve says more than the table: test MSE against training seconds on multiplication (each
    mixer) and for the recipe against plain Adam; the MSE of x* against iterations of the learned step
    applied iteratively, of GD, and the end-to-end Transformer's one pass. PNGs named prefix_*.png ([]
    without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for name, groups, title in (
            ("multiply", ("multiply_softmax", "multiply_baseconv", "multiply_linear_attention"),
             "element-wise multiplication, LM: softmax against polynomial mixers"),
            ("recipe", ("recipe", "plain_adam"), "BaseConv, Adam: the high-precision recipe against plain Adam")):
        fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        for i, group in enumerate(groups):
            for j, run in enumerate(r for r in runs if r["training"] == group):
                curve = [p for p in run["curve"] if p["test_mse"] is not None]
                ax.semilogy([p["seconds"] for p in curve], [p["test_mse"] for p in curve], color=f"C{i}",
                            alpha=0.8, label=run["label"] if j == 0 else None)
        ax.set(xlabel="training wall-clock (s)", ylabel="test MSE", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        paths.append(f"{prefix}_{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    iterated = next(r for r in rows if r["claim"].startswith("5."))
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for j, (curve, transformer) in enumerate(zip(iterated["curves"], iterated["transformer_mse"])):
        t = curve["iteration"][1:]  # from the first iteration, on a log axis
        ax.loglog(t, curve["learned_mse"][1:], color="C0", label="learned GD step" if j == 0 else None)
        ax.loglog(t, curve["gd_mse"][1:], color="k", ls="--", label="exact GD" if j == 0 else None)
        if transformer is not None:
            ax.axhline(transformer, color="C3", alpha=0.8, label="end-to-end Transformer" if j == 0 else None)
    ax.set(xlabel="iterations", ylabel="MSE of x*", title="learned GD step applied iteratively, per seed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(f"{prefix}_iterated.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
