r"""Benchmarks: throughput, time-to-precision and scaling of the training step.

    python -m lsq_jax.bench                                   # all three, explicit-gradient BaseConv config
    python -m lsq_jax.bench --bench=throughput --config=configs/multistep_gd.py
    python -m lsq_jax.bench --bench=precision --budget_s=600 --config=configs/baseconv.py:lm \
        --optimizers=lm_marquardt,lm_isotropic,lm,lm_delayed     # LM's damping variants (bench/lm.py)
    python -m lsq_jax.bench --bench=lm_iteration --config=configs/baseconv.py:lm
    python -m lsq_jax.bench --bench=curvature --workdir=W     # where a finished LM run stopped (bench/curvature.py)
    python -m lsq_jax.bench --bench=lm_scaling --config=configs/baseconv.py:lm --devices=1,2,4
    python -m lsq_jax.bench --bench=lm_scaling --config=configs/baseconv.py:lm --devices=2,4 \
        --lm_memory_budget_gib=0.3     # below Cholesky's 0.37 GiB: optim.lm_solver=auto picks 'sharded'
    python -m lsq_jax.bench --bench=lm_solve --config=configs/baseconv.py:lm --devices=1,2,4   # sharded solves
    python -m lsq_jax.bench --bench=claims [--quick]           # the papers' claims over --seeds (bench/claims.py)

Every figure is measured: steps/s is the median (with min and max) of timed windows after warm-up, compile
time is reported apart, FLOPs come from XLA's cost analysis, and the roofline ratio divides the achieved
FLOP/s by the model's dominant matmul measured in the same run (docs/performance.md says how). Results
are printed as tables and written as JSON (--out).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

from lsq_jax.bench.claims import claim_rows, plot_claims, print_claims
from lsq_jax.bench.curvature import workdir_curvature
from lsq_jax.bench.generality import generality_columns, plot_generality
from lsq_jax.bench.lm import lm_iteration, lm_scaling_row, lm_solve_row
from lsq_jax.bench.precision import PRECISION_METHODS, compare_optimizers, experiment, plot_comparison
from lsq_jax.config.check import ConfigError
from lsq_jax.config.load import config_spec, parse_config_flags
from lsq_jax.config.task import DTYPES

BENCHES = ("throughput", "precision", "scaling", "lm_iteration", "lm_scaling", "lm_solve", "curvature", "claims")
DEFAULT_CONFIG = "configs/baseconv.py"

# The bench's own flags, apart from absl's global FLAGS and from lsq_jax.main's (both define --config).
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, f"Config to benchmark (default {DEFAULT_CONFIG}).",
                                          flag_values=FLAGS)
_BENCH = flags.DEFINE_list("bench", ["throughput", "precision", "scaling"],
                          f"Sub-benchmarks to run: {', '.join(BENCHES)}.", flag_values=FLAGS)
_DTYPES = flags.DEFINE_list("dtypes", list(DTYPES), "dtypes for the throughput benchmark.", flag_values=FLAGS)
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows (throughput).", flag_values=FLAGS)
_WINDOW_S = flags.DEFINE_float("window_s", 4.0, "Approximate seconds per timed window (throughput).",
                               flag_values=FLAGS)
_BUDGET_S = flags.DEFINE_float("budget_s", 120.0, "Wall-clock budget of the time-to-precision run.",
                               flag_values=FLAGS)
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["adam", "lm", "hybrid"],
                                "Methods the time-to-precision benchmark compares (see PRECISION_METHODS).",
                                flag_values=FLAGS)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each time-to-precision method.", flag_values=FLAGS)
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4"], "Device counts for the scaling benchmarks.",
                             flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed LM iterations per device count (lm_scaling).",
                                flag_values=FLAGS)
_LM_MEMORY_BUDGET = flags.DEFINE_float("lm_memory_budget_gib", 0.0, "lm_scaling: the memory per device "
                                       "optim.lm_solver=auto picks the solver against, in GiB (0: the device's).",
                                       flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir whose checkpoint the curvature benchmark reads.",
                               flag_values=FLAGS)
_LANCZOS_STEPS = flags.DEFINE_integer("lanczos_steps", 4000, "Most Lanczos steps of the curvature benchmark "
                                      "(at most the parameter count, where the whole spectrum is spanned).",
                                      flag_values=FLAGS)
_QUICK = flags.DEFINE_bool("quick", False, "Claims: a few iterations per training and few test problems, to "
                           "check the machinery (its figures are not the claims).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "bench.json", "Where to write the JSON results.", flag_values=FLAGS)
_CHILD = flags.DEFINE_string("child", "", "Internal: BENCH:N, one row of scaling, lm_scaling or lm_solve on N "
                             "devices, in a subprocess.", flag_values=FLAGS)


def _choices(flag, allowed) -> None:
    if not flag.value or any(v not in allowed for v in flag.value):
        raise ConfigError(f"--{flag.name}: got {','.join(flag.value)!r}; allowed one or more of "
                          f"{', '.join(allowed)}, comma-separated")


def _integers(flag, least: int) -> None:
    if not flag.value or not all(v.strip().isdigit() and int(v) >= least for v in flag.value):
        raise ConfigError(f"--{flag.name}: got {','.join(flag.value)!r}; allowed integers >= {least}, "
                          "comma-separated")


def parse_flags(argv: list[str]) -> None:
    """The bench's flags, the config file loaded as lsq_jax.main loads it (DEFAULT_CONFIG without --config),
    all checked before any benchmark's minutes; every failure is ConfigError (one line)."""
    if config_spec(argv) is None:
        if not os.path.isfile(DEFAULT_CONFIG):
            raise ConfigError(f"--config: the default {DEFAULT_CONFIG} is not here: run from the repository root "
                              "or give --config=FILE.py[:VARIANT]")
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    parse_config_flags(FLAGS, argv)
    _choices(_BENCH, BENCHES)
    _choices(_DTYPES, DTYPES)
    _choices(_OPTIMIZERS, tuple(PRECISION_METHODS))
    _integers(_SEEDS, 0)
    _integers(_DEVICES, 1)
    for flag, least in ((_WINDOWS, 1), (_REPEATS, 1), (_LANCZOS_STEPS, 1)):
        if flag.value < least:
            raise ConfigError(f"--{flag.name}: got {flag.value}; allowed an integer >= {least}")
    for flag in (_WINDOW_S, _BUDGET_S):
        if not flag.value > 0:
            raise ConfigError(f"--{flag.name}: got {flag.value}; allowed a number of seconds > 0")
    if not _LM_MEMORY_BUDGET.value >= 0:
        raise ConfigError(f"--lm_memory_budget_gib: got {_LM_MEMORY_BUDGET.value}; allowed a number >= 0 (0: the "
                          "device's memory)")
    if "curvature" in _BENCH.value and not _WORKDIR.value:
        raise ConfigError(f"--workdir: got {_WORKDIR.value}; allowed a finished LM run's workdir with "
                          "--bench=curvature")


def _timed_windows(fn, state, n_windows: int, window_s: float):
    """Steps/s of `state = fn(state)` over timed windows, after sizing a window to ~window_s seconds."""
    import jax

    t = time.perf_counter()
    state = jax.block_until_ready(fn(state))  # warm-up (already compiled)
    per_step = max(time.perf_counter() - t, 1e-6)
    n = max(2, int(window_s / per_step))
    rates, dispatch = [], []
    for _ in range(n_windows):
        t0 = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            state = fn(state)
            dispatch.append(time.perf_counter() - t)
        state = jax.block_until_ready(state)
        rates.append(n / (time.perf_counter() - t0))
    # the median call: a call that waits for a full queue of in-flight steps is waiting, not host work
    return state, rates, statistics.median(dispatch)


PEAK_SIZE = 1024  # the square product that measures the machine's best matmul rate (the "of peak" ratio)


def matmul_rate(rows: int, width: int, dtype: str, n_windows: int = 5, window_s: float = 0.5,
                chunks: int = 1) -> float:
    """FLOP/s of the jitted (rows x width) @ (width x width) product, the best of its `n_windows` timed
    windows of about `window_s` seconds (at least 3 products each): the rate the machine can reach (a slow
    episode of a shared machine only lowers it, and would inflate a ratio over it); with `chunks` > 1 the
    rows are multiplied `chunks` at a time in one lax.map, as the microbatched step does."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((chunks, rows // chunks, width), dtype)
    w = jnp.full((width, width), 0.5, dtype)
    f = jax.jit(lambda x, w: jax.lax.map(lambda xc: xc @ w, x))
    jax.block_until_ready(f(x, w))
    t = time.perf_counter()
    jax.block_until_ready(f(x, w))
    reps = max(3, int(window_s / max(time.perf_counter() - t, 1e-6)))
    rates = []
    for _ in range(n_windows):
        t0 = time.perf_counter()
        for _ in range(reps):
            y = f(x, w)
        jax.block_until_ready(y)
        rates.append(2 * (rows // chunks) * chunks * width * width * reps / (time.perf_counter() - t0))
    return max(rates)


def step_flops(exp, state) -> float:
    """FLOPs of one training step by XLA's cost analysis, of the whole batch on ONE device without
    microbatches (the analysis counts a loop's body once, and one device's share of a partitioned program),
    so the figure is the step's useful work on any device count. The step is compiled, never run."""
    import jax

    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.step import make_step_fns

    whole = dataclasses.replace(exp, train=dataclasses.replace(exp.train, microbatch_size=exp.train.batch_size))
    plan = make_plan(whole, make_mesh(1))
    fns = make_step_fns(plan, plan.full_size())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (state, fns.no_metric))
    return float(fns.train.lower(*abstract).compile().cost_analysis().get("flops", float("nan")))


def throughput(config, dtype: str, n_windows: int, window_s: float, n_devices: int = 0) -> dict:
    """Full training step (data, forward, backward, recipe, update) at the config's batch size, on the
    first `n_devices` devices (0: all).

    Measured without the gradient statistics, which are a separate jitted call every log_every steps
    (the adaptive LR is swapped for the step-threshold one, which costs the same): they add about
    grad_stats_batches / log_every of a step on average (64 / 1000 in the published runs).
    """
    import jax

    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.state import init_state, place_state
    from lsq_jax.train.step import make_step_fns

    exp = experiment(config, dtype=dtype, **{"train.grad_stats_batches": 0, "optim.schedule": "step"})
    plan = make_plan(exp, make_mesh(n_devices))
    mesh = plan.mesh
    state = place_state(init_state(plan), mesh)
    fns = make_step_fns(plan, plan.full_size())  # the recipe's step at full size
    t0 = time.perf_counter()
    compiled = fns.train.lower(state, fns.no_metric).compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(exp, state)

    def step(s):
        return compiled(s, fns.no_metric)[0]

    state, rates, dispatch = _timed_windows(step, state, n_windows, window_s)
    median = statistics.median(rates)
    rows = exp.train.batch_size * plan.task.seq_len(exp.task.n_points)
    n_micro = plan.microbatches[exp.task.n_points]
    # the machine's matmul rate on this width: the better of the whole batch's rows at once and in the
    # step's (per-device) microbatches (a wide model's whole-batch product is bound by memory), measured
    # on one device; real accelerators each multiply at that rate, emulated CPU devices share the cores
    # that one product already uses
    machines = 1 if jax.default_backend() == "cpu" else mesh.devices.size
    timing = {"n_windows": n_windows, "window_s": min(window_s, 0.5)}  # as many windows as the step's
    mm_rates = {"whole": matmul_rate(rows, exp.model.n_embd, dtype, **timing) * machines}
    if n_micro > 1:
        mm_rates["microbatched"] = machines * matmul_rate(rows, exp.model.n_embd, dtype, **timing,
                                                          chunks=n_micro * mesh.devices.size)
    mm = max(mm_rates.values())
    peak = matmul_rate(PEAK_SIZE, PEAK_SIZE, dtype, **timing) * machines
    return {"config": exp.name, "dtype": dtype, "batch_size": exp.train.batch_size, "devices": int(mesh.devices.size),
            "microbatches": n_micro, "compile_s": compile_s, "steps_per_s": median, "steps_per_s_min": min(rates),
            "steps_per_s_max": max(rates), "examples_per_s": median * exp.train.batch_size,
            "step_gflop": flops / 1e9, "achieved_gflops": flops * median / 1e9,
            "matmul_gflops": mm / 1e9, "matmul_gflops_by_form": {k: v / 1e9 for k, v in mm_rates.items()},
            "roofline_ratio": flops * median / mm, "peak_matmul_gflops": peak / 1e9,
            "peak_ratio": flops * median / peak,
            "host_dispatch_fraction": dispatch * median}


def config_argv(argv: list[str]) -> list[str]:
    """The --config flag and its --config.field overrides from a command line, in either absl form
    (`--config=x` or `--config x`), to start a subprocess on the same config."""
    out, rest = [], iter(argv)
    for arg in rest:
        if arg == "--config" or arg.startswith("--config."):
            out += [arg] if "=" in arg else [arg, next(rest, "")]
        elif arg.startswith("--config="):
            out.append(arg)
    return out


def on_device_counts(name: str, row, argv: list[str], devices: list[int], child_flags: list[str]) -> list[dict]:
    """`row(n)` for each device count n of `devices`, each on the first n devices.

    On CPU the devices are emulated (--xla_force_host_platform_device_count, fixed when JAX starts and
    added to any XLA_FLAGS already set), so each count runs in a subprocess (`--child=name:n`) given the
    config flags of `argv` (see `config_argv`) and `child_flags`. The emulated devices are threads on the
    same cores, so with n > 1 each one's LAPACK calls (the Cholesky and QR factorisations, in OpenBLAS) get
    its share of the cores, max(1, cores // n) threads, unless OPENBLAS_NUM_THREADS is set; each row says
    how many in "lapack_threads" (OPENBLAS_NUM_THREADS as given, or None: OpenBLAS's default, all the
    cores). On accelerators the devices are
    real and each count runs here (a subprocess would find the accelerator's memory already taken by this
    one); counts above what the machine has are skipped.
    """
    import jax

    emulated, available = jax.default_backend() == "cpu", jax.device_count()
    rows = []
    for n in devices:
        if not emulated:
            if n > available:
                print(f"{name}: {n} devices skipped ({available} available)", flush=True)
            else:
                rows.append(row(n))
            continue
        env = dict(os.environ)
        # emulated devices share the cores: one may reach a collective long after another (XLA aborts after 40 s)
        env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n} "
                            "--xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
        if n > 1 and "OPENBLAS_NUM_THREADS" not in env:  # each device's LAPACK gets its share of the cores
            env["OPENBLAS_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // n))
        cmd = [sys.executable, "-m", "lsq_jax.bench", f"--child={name}:{n}", *config_argv(argv), *child_flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} run on {n} devices failed (exit status {proc.returncode}; a negative one "
                               f"is the signal that killed it): {proc.stderr.strip().splitlines()[-1:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({**row, "lapack_threads": env.get("OPENBLAS_NUM_THREADS")})
    return rows


def scaling(config, argv: list[str], devices: list[int], n_windows: int, window_s: float) -> list[dict]:
    """Steps/s of the training step on 1, 2, 4 ... devices at a fixed global batch (`on_device_counts`)."""
    rows = on_device_counts("scaling", lambda n: throughput(config, "float64", n_windows, window_s, n), argv,
                            devices, [f"--windows={n_windows}", f"--window_s={window_s}"])
    for row in rows:
        row["speedup"] = row["steps_per_s"] / rows[0]["steps_per_s"]
        row["efficiency"] = row["speedup"] / (row["devices"] / rows[0]["devices"])
    return rows


def lm_scaling(config, argv: list[str], devices: list[int], repeats: int, budget: int | None = None) -> list[dict]:
    """The LM step (optimizer 'lm') on 1, 2, 4 ... devices at a fixed global batch (`on_device_counts`):
    seconds per iteration, bytes reduced across devices per iteration and the solve path
    (lsq_jax.bench.lm.lm_scaling_row); `budget`, bytes per device optim.lm_solver=auto picks against."""
    exp = experiment(config, **{"optim.optimizer": "lm"})
    budget_flag = [f"--lm_memory_budget_gib={budget / 2**30!r}"] if budget else []
    return on_device_counts("lm_scaling", lambda n: lm_scaling_row(exp, n, repeats, budget), argv, devices,
                            [f"--repeats={repeats}", *budget_flag])


def lm_params(config) -> int:
    """P, the parameter count of the config's model (as its plan counts it)."""
    from lsq_jax.plan.report import make_report_plan

    return make_report_plan(experiment(config)).n_params


def lm_solve(config, argv: list[str], devices: list[int], repeats: int) -> list[dict]:
    """The row-sharded solves at the config's parameter count on 1, 2, 4 ... devices (`on_device_counts`,
    lsq_jax.bench.lm.lm_solve_row)."""
    return on_device_counts("lm_solve", lambda n: lm_solve_row(lm_params(config), n, repeats), argv, devices,
                            [f"--repeats={repeats}"])


def _lm_memory_budget() -> int | None:
    return int(_LM_MEMORY_BUDGET.value * 2**30) if _LM_MEMORY_BUDGET.value else None


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = " | ".join(title for title, _, _ in columns)
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(" | ".join(format(row[key], fmt) if row.get(key) is not None else "-"
                                for _, key, fmt in columns))
    return "\n".join(lines)


THROUGHPUT_COLUMNS = [("dtype", "dtype", ""), ("microbatches", "microbatches", "d"),
                      ("steps/s", "steps_per_s", ".2f"), ("min", "steps_per_s_min", ".2f"),
                      ("max", "steps_per_s_max", ".2f"), ("examples/s", "examples_per_s", ".0f"),
                      ("compile s", "compile_s", ".1f"), ("GFLOP/step", "step_gflop", ".2f"),
                      ("GFLOP/s", "achieved_gflops", ".1f"), ("matmul GFLOP/s", "matmul_gflops", ".1f"),
                      ("roofline", "roofline_ratio", ".2f"), ("peak GFLOP/s", "peak_matmul_gflops", ".1f"),
                      ("of peak", "peak_ratio", ".2f"), ("host frac", "host_dispatch_fraction", ".3f")]
SCALING_COLUMNS = [("devices", "devices", "d"), ("steps/s", "steps_per_s", ".2f"), ("min", "steps_per_s_min", ".2f"),
                   ("max", "steps_per_s_max", ".2f"), ("speedup", "speedup", ".2f"), ("efficiency", "efficiency", ".2f")]

LM_SCALING_COLUMNS = [("devices", "devices", "d"), ("solver", "solver", ""),
                      ("chunks/device", "chunks_per_device", "d"), ("LAPACK threads", "lapack_threads", ""),
                      ("s/iteration", "seconds_per_iteration", ".2f"), ("solves", "tries_mean", ".1f"),
                      ("CG iterations", "cg_iterations_mean", ".1f"),
                      ("bytes reduced", "allreduce_bytes_per_iteration", ".4g"),
                      ("/ triangle", "bytes_over_triangle", ".4f"),
                      ("bytes gathered", "allgather_bytes_per_iteration", ".4g"),
                      ("compiled temp", "compiled_temp_bytes", ".4g"), ("LM estimate", "estimated_lm_bytes", ".4g")]


LM_SOLVE_COLUMNS = [("devices", "devices", "d"), ("block Cholesky + 2 solves s", "cholesky_s", ".3f"),
                    ("residual", "cholesky_residual", ".1e"), ("CG s", "cg_s", ".3f"),
                    ("CG iterations", "cg_iterations", "d"), ("CG residual", "cg_residual", ".1e"),
                    ("Cholesky = CG iterations", "cholesky_in_cg_iterations", ".0f")]


def print_curvature(c: dict) -> None:
    """The curvature benchmark's figures (lsq_jax.bench.curvature), a few lines."""
    bands = ", ".join(f"{n} above {b} of it" for b, n in c["jtj"]["above"].items())
    outside = ", ".join(f"{v:.4f} with the {b} band" for b, v in c["residual_outside_band"].items())
    lz = c["lanczos"]
    print(f"curvature ({c['config']}, seed {c['seed']}, step {c['step']}: P = {c['params']}, {c['residuals']} "
          f"residuals, loss {c['loss']:.3e})\n"
          f"  J^T J: largest eigenvalue {c['jtj']['largest']:.3e}; {bands}; numerical rank {c['rank']}\n"
          f"  residual outside range(J) (GN's best loss ratio): {c['residual_outside_range']:.4f} at rank "
          f"{c['rank']}; {outside}\n"
          f"  Hessian of 0.5 |r|^2 by {lz['steps']} Lanczos steps: largest {lz['largest']:.3e}, "
          f"{lz['negative_ritz_values']} negative Ritz values, most negative "
          + ", ".join(f"{v:.4g} (residual {e:.1e})" for v, e in zip(lz["most_negative"], lz["residual_norms"]))
          + "\n  loss(theta +- a y) / loss(theta) along the most negative direction y: "
          + "; ".join(f"a={p['step']:.0e}: {p['loss_ratio_plus']:.6g}, {p['loss_ratio_minus']:.6g}"
                      for p in c["along_most_negative"])
          + "\n  the exact LM step at damping lam (|step|, loss ratio predicted by the linear model -> actual): "
          + "; ".join(f"lam={p['damping']:.0e}: {p['step_norm']:.2e}, {p['predicted_loss_ratio']:.4g} -> "
                      f"{p['loss_ratio']:.4g}" for p in c["damped_steps"]) + "\n", flush=True)


def main() -> None:
    """Runs the benchmarks parse_flags has read."""
    import jax
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # JAX reports at INFO each backend it fails to find (tpu, cuda)
    from lsq_jax.checkpoint import quiet_orbax_failures
    from lsq_jax.config.experiment import matmul_precision_of
    from lsq_jax.mesh import setup_jax

    quiet_orbax_failures()
    config = _CONFIG.value
    setup_jax(matmul_precision_of(config))  # the same JAX settings as main
    if _CHILD.value:
        name, n = _CHILD.value.split(":")
        rows = {"scaling": lambda: throughput(config, "float64", _WINDOWS.value, _WINDOW_S.value, int(n)),
                "lm_scaling": lambda: lm_scaling_row(experiment(config, **{"optim.optimizer": "lm"}), int(n),
                                                     _REPEATS.value, _lm_memory_budget()),
                "lm_solve": lambda: lm_solve_row(lm_params(config), int(n), _REPEATS.value)}
        row = rows[name]()
        print(json.dumps(row))
        return
    results = {"machine": {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                           "cpu_count": os.cpu_count()}}
    if "throughput" in _BENCH.value:
        results["throughput"] = [throughput(config, d, _WINDOWS.value, _WINDOW_S.value) for d in _DTYPES.value]
        print(f"throughput ({results['throughput'][0]['config']}, batch {results['throughput'][0]['batch_size']})")
        print(_table(results["throughput"], THROUGHPUT_COLUMNS) + "\n", flush=True)
    if "precision" in _BENCH.value:
        methods = {name: PRECISION_METHODS[name] for name in _OPTIMIZERS.value}
        r = results["precision"] = compare_optimizers(config, _BUDGET_S.value, methods,
                                                      [int(s) for s in _SEEDS.value])
        for name, reason in r["skipped"].items():
            print(f"time to precision: {name} skipped: {reason}")
        first = next(iter(r["runs"].values()), [{"config": "-", "batch_size": "-"}])[0]
        print(f"time to precision ({first['config']}, batch {first['batch_size']}, {r['budget_s']:.0f} s of "
              f"training per run; test MSE, median and range over seeds {','.join(_SEEDS.value)})")
        columns = [("method", "method", "")]
        for mark in r["marks"]:
            columns += [(f"at {mark:.0f} s", f"{mark:.0f}s", ".2e"), ("range", f"{mark:.0f}s_range", "")]
        columns += [("iterated forward error", "learned_forward_error", ".2e"),
                    ("contraction", "learned_contraction", ".3f"), ("GD's", "gd_contraction", ".3f")]
        print(_table(r["rows"], columns), flush=True)
        if generality_columns(r["rows"])[1:]:
            print("generality (median over seeds; gaps are one-step errors over the in-distribution cell's)")
            print(_table(r["rows"], generality_columns(r["rows"])), flush=True)
            plot = plot_generality(r, os.path.splitext(_OUT.value)[0] + "_generality.png")
            print(f"wrote {plot}" if plot else "", flush=True)
        for name, runs in r["runs"].items():
            print(f"  {name}: " + "; ".join(
                f"seed {x['seed']}: {x['steps']} steps, final {x['final_test_mse']:.2e}, "
                + (f"1e-12 at {x['crossings']['1e-12']['seconds']:.0f} s" if "1e-12" in x["crossings"]
                   else "1e-12 not reached") for x in runs))
        plot = plot_comparison(r, os.path.splitext(_OUT.value)[0] + "_precision.png")
        print(f"wrote {plot}\n" if plot else "", flush=True)
    if "lm_iteration" in _BENCH.value:
        row = results["lm_iteration"] = lm_iteration(experiment(config, **{"optim.optimizer": "lm"}))
        print(f"LM iteration ({row['config']}, P = {row['params']}, {row['residuals']} residuals, geodesic "
              f"{row['geodesic']}): {row['iteration_s']:.2f} s ({row['tries_mean']:.1f} solves), of which normal "
              f"equations {row['normal_equations_s']:.2f} s; scipy dsyrk + cho_factor on the same J: "
              f"{row['scipy_syrk_s']:.2f} + {row['scipy_cho_factor_s']:.2f} s; ratio {row['ratio_to_scipy']:.2f}\n",
              flush=True)
    if "curvature" in _BENCH.value:
        from lsq_jax.checkpoint import CheckpointError
        from lsq_jax.config.check import one_line
        from lsq_jax.workdir import WorkdirError

        try:
            results["curvature"] = workdir_curvature(_WORKDIR.value, lanczos_steps=_LANCZOS_STEPS.value)
        except (CheckpointError, WorkdirError) as err:
            print(f"error: --workdir: {one_line(err).removeprefix('--workdir: ')}", file=sys.stderr)
            sys.exit(2)
        print_curvature(results["curvature"])
    if "scaling" in _BENCH.value:
        results["scaling"] = scaling(config, sys.argv[1:], [int(d) for d in _DEVICES.value], _WINDOWS.value,
                                     _WINDOW_S.value)
        print("scaling (float64, fixed global batch)")
        print(_table(results["scaling"], SCALING_COLUMNS) + "\n", flush=True)
    if "lm_scaling" in _BENCH.value:
        results["lm_scaling"] = lm_scaling(config, sys.argv[1:], [int(d) for d in _DEVICES.value], _REPEATS.value,
                                           _lm_memory_budget())
        first = results["lm_scaling"][0]
        print(f"LM scaling ({first['config']}, P = {first['n_params']}, fixed global batch {first['batch_size']})")
        print(_table(results["lm_scaling"], LM_SCALING_COLUMNS) + "\n", flush=True)
    if "lm_solve" in _BENCH.value:
        results["lm_solve"] = lm_solve(config, sys.argv[1:], [int(d) for d in _DEVICES.value], _REPEATS.value)
        print(f"LM sharded solves (P = {results['lm_solve'][0]['n_params']}, condition 1e6)")
        print(_table(results["lm_solve"], LM_SOLVE_COLUMNS) + "\n", flush=True)
    if "claims" in _BENCH.value:
        seeds = [int(s) for s in _SEEDS.value]
        rows, runs = claim_rows(seeds, _QUICK.value, directory=os.path.splitext(_OUT.value)[0] + "_trainings")
        results["claims"], results["claim_trainings"] = rows, runs
        print_claims(rows, runs, seeds, _QUICK.value)
        for path in plot_claims(rows, runs, os.path.splitext(_OUT.value)[0] + "_claims"):
            print(f"wrote {path}")
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {_OUT.value}")

