"""Levenberg-Marquardt in the benchmarks: the damping variants that time to precision compares, one LM
iteration timed against LAPACK's own normal equations on the same Jacobian, and the learned model's
iterated use at the end of a run."""
from __future__ import annotations

import functools
import math
import re
import statistics
import time

# Damping variants as config overrides; "lm" is the config's own LM (configs/baseconv.py:lm: isotropic,
# Nielsen, geodesic acceleration).
LM_VARIANTS = {
    "lm": {"optim.optimizer": "lm"},
    "lm_marquardt": {"optim.optimizer": "lm", "optim.lm_scaling": "marquardt", "optim.lm_rule": "nielsen",
                     "optim.lm_geodesic": False},
    "lm_isotropic": {"optim.optimizer": "lm", "optim.lm_scaling": "isotropic", "optim.lm_rule": "nielsen",
                     "optim.lm_geodesic": False},
    "lm_geodesic": {"optim.optimizer": "lm", "optim.lm_scaling": "isotropic", "optim.lm_rule": "nielsen",
                    "optim.lm_geodesic": True},
    "lm_delayed": {"optim.optimizer": "lm", "optim.lm_scaling": "isotropic", "optim.lm_rule": "delayed",
                   "optim.lm_geodesic": True},
    # the config's own LM from the best of 3 (2) starts after 40 iterations each (on linear attention's :lm
    # a start that misses the fast phase shows by then, not at 30); the starts' iterations count as training
    "lm_restarts": {"optim.optimizer": "lm", "optim.lm_restarts": 3, "optim.lm_restart_steps": 40},
    "lm_restarts2": {"optim.optimizer": "lm", "optim.lm_restarts": 2, "optim.lm_restart_steps": 40},
    "lm_one_start": {"optim.optimizer": "lm", "optim.lm_restarts": 1},  # the config's own LM without restarts
    "lm_valley": {"optim.optimizer": "lm", "optim.lm_valley": True},  # the config's own LM with the valley step
    # the same with the valley predictor by CG through the held Jacobian instead of QR of J
    "lm_valley_cg": {"optim.optimizer": "lm", "optim.lm_valley": True, "optim.lm_valley_cg": True},
    # the config's own LM solved matrix-free, at most 100 CG iterations per solve: to 1e-10 of the right-hand
    # side, or stopped at the inexact-Newton forcing term (lsq_jax.optim.lm.forcing_term)
    "lm_cg": {"optim.optimizer": "lm", "optim.lm_solver": "cg", "optim.lm_cg_forcing": False},
    "lm_cg_forcing": {"optim.optimizer": "lm", "optim.lm_solver": "cg", "optim.lm_cg_forcing": True},
}


def chosen_start(steps, state):
    """(state, choice): with optim.lm_restarts > 1, the starts trained and the best chosen as a run of the
    config does (lsq_jax.train.loop.best_start), without a workdir; choice holds restart_losses and
    restart_chosen as metrics.jsonl would. Without restarts, (state, {})."""
    import types

    import jax

    from lsq_jax.train.loop import best_start

    choice = {}
    if steps.plan.exp.optim.lm_restarts > 1:
        record = types.SimpleNamespace(write=lambda step, r: choice.update(r))
        state = jax.block_until_ready(best_start(steps, state, record, lambda _: None, lambda _: False))
    return state, choice


def iterated_use(plan, params) -> dict:
    """The learned gradient model as GD, applied train.eval_iters times to train.eval_problems problems
    (those of the run's report: `plan` is its lsq_jax.plan.report.ReportPlan), next to exact GD: median final
    forward error, floor and contraction of each ({} for a task whose model does not predict the gradient)."""
    import jax

    from lsq_jax.data.samplers import example_keys
    from lsq_jax.eval.report import iterated_report
    from lsq_jax.eval.solvers import gd_solver, learned_gradient_solver

    task, sizes = plan.task, plan.sizes
    if task.predicts != "gradient":
        return {}
    learned = learned_gradient_solver(lambda p, x: plan.model.apply({"params": p}, x), params)
    keys = example_keys(jax.random.fold_in(plan.key, 1), 0, 0, sizes.n_problems)
    report = iterated_report([learned, gd_solver()], task.sample(keys).raw, sizes.n_iters, n_report_points=4)
    out = {"iterated_steps": sizes.n_iters}
    for name, m in report["methods"].items():
        out.update({f"{name}_forward_error": m["final_forward_error"], f"{name}_floor": m["floor"],
                    f"{name}_contraction": m["contraction"]})
    return out


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def lm_iteration(exp, repeats: int = 5) -> dict:
    """Seconds of one LM iteration of `exp` (from its initialisation, `repeats` iterations, median; every
    damped solve it tries included) and of its normal equations alone, against scipy's dsyrk + cho_factor
    (LAPACK on every core) on the same batch's whole Jacobian: the cost of forming and factoring J^T J
    outside JAX."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.linalg
    from jax.flatten_util import ravel_pytree

    from lsq_jax.mesh import make_mesh
    from lsq_jax.optim import lm
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.state import init_state, place_state
    from lsq_jax.train.step import lm_keys, lm_residual_fn, make_step_fns

    plan = make_plan(exp, make_mesh())
    mesh, phase = plan.mesh, plan.full_size(lm=True)
    state = place_state(init_state(plan), mesh)
    fns = make_step_fns(plan, phase)
    residuals = lm_residual_fn(plan, phase)
    keys = lm_keys(plan, 0)
    normal = jax.jit(lambda p: lm.normal_equations(residuals, p, keys, plan.lm_chunks))
    jax.block_until_ready(normal(state.params))
    normal_s = _median_seconds(lambda: jax.block_until_ready(normal(state.params)), repeats)

    step = fns.train.lower(state, fns.no_metric).compile()
    times, tries = [], []
    for _ in range(repeats + 1):  # the first iteration warms up
        before = int(state.opt_state["lm"].iteration)
        t = time.perf_counter()
        state = jax.block_until_ready(step(state, fns.no_metric)[0])
        times.append(time.perf_counter() - t)
        tries.append(int(state.opt_state["lm"].iteration) - before)

    theta, unravel = ravel_pytree(state.params)

    def flat_residuals(t, batch):
        return residuals(unravel(t), batch).reshape(-1)

    Jt = jax.jit(lambda t: lm.chunk_jacobian(flat_residuals, t, keys, True)[1])(theta)
    J = np.asfortranarray(np.asarray(Jt).T)  # (M, P), the layout LAPACK reads without a copy
    del Jt
    syrk_s = _median_seconds(lambda: scipy.linalg.blas.dsyrk(1.0 / J.shape[0], J, trans=1, lower=1), repeats)
    JtJ = scipy.linalg.blas.dsyrk(1.0 / J.shape[0], J, trans=1, lower=1)
    JtJ[np.diag_indices_from(JtJ)] += 1e-3 * np.mean(np.diag(JtJ))
    chol_s = _median_seconds(lambda: scipy.linalg.cho_factor(JtJ, lower=True, check_finite=False), repeats)
    iteration_s = statistics.median(times[1:])
    return {"config": exp.name, "params": int(theta.size), "residuals": int(J.shape[0]),
            "geodesic": exp.optim.lm_geodesic, "iteration_s": iteration_s, "tries_mean": float(np.mean(tries[1:])),
            "normal_equations_s": normal_s, "scipy_syrk_s": syrk_s, "scipy_cho_factor_s": chol_s,
            "ratio_to_scipy": iteration_s / (syrk_s + chol_s), "device_count": int(mesh.devices.size),
            "jnp_dtype": str(jnp.dtype(exp.task.dtype))}


def lm_scaling_row(exp, n_devices: int = 0, repeats: int = 3, budget: int | None = None) -> dict:
    """The LM step of `exp` on the first `n_devices` devices (0: all), its solver picked against `budget`
    bytes per device when optim.lm_solver is 'auto' (None: the device's memory): seconds per iteration (median of
    `repeats` iterations from the initialisation, after one that warms up; every damped solve included; with
    CG, the mean CG iterations of their last solves, accelerations included) and
    the bytes one iteration reduces and all-gathers across devices, read from the compiled step
    (:func:`reduced_bytes`, :func:`gathered_bytes`: a CG solve's loop counts once); and
    the compiled step's temp bytes (XLA's memory_analysis) next to the memory check's figure for LM."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.state import init_state, place_state
    from lsq_jax.train.step import make_step_fns

    plan = make_plan(exp, make_mesh(n_devices), lm_memory_budget=budget)
    state = place_state(init_state(plan), plan.mesh)
    fns = make_step_fns(plan, plan.full_size(lm=True))
    step = fns.train.lower(state, fns.no_metric).compile()
    times, tries, cg = [], [], []
    for _ in range(repeats + 1):
        before = int(state.opt_state["lm"].iteration)
        t = time.perf_counter()
        state, metrics = jax.block_until_ready(step(state, fns.no_metric))
        times.append(time.perf_counter() - t)
        tries.append(int(state.opt_state["lm"].iteration) - before)
        cg.append(int(metrics["cg_iterations"]) if "cg_iterations" in metrics else None)
    p, itemsize = plan.n_params, jnp.dtype(exp.task.dtype).itemsize
    hlo = step.as_text()
    one = plan.n_devices == 1  # on one device a collective moves nothing
    reduced, gathered = (0, 0) if one else (reduced_bytes(hlo), gathered_bytes(hlo))
    return {"config": exp.name, "devices": plan.n_devices, "n_params": p, "batch_size": exp.train.batch_size,
            "chunks_per_device": plan.lm_chunks, "solver": plan.exp.optim.lm_solver,
            "allreduce_bytes_per_iteration": reduced, "allgather_bytes_per_iteration": gathered,
            "triangle_bytes": p * (p + 1) // 2 * itemsize,
            "bytes_over_triangle": reduced / (p * (p + 1) // 2 * itemsize),
            "seconds_per_iteration": statistics.median(times[1:]), "tries_mean": float(np.mean(tries[1:])),
            "cg_iterations_mean": None if cg[0] is None else float(np.mean(cg[1:])),
            "compiled_temp_bytes": step.memory_analysis().temp_size_in_bytes,
            "estimated_lm_bytes": plan.memory["lm_normal_equations"], "lm_memory_budget": budget,
            "lm_choice": plan.lm_choice}


def lm_solve_row(n_params: int, n_devices: int = 0, repeats: int = 3, cg_iterations: int = 100,
                 seed: int = 0) -> dict:
    """The row-sharded path's two ways to solve a damped system, on the first `n_devices` devices (0: all):
    the block Cholesky over the devices with its two solves (the step's and the geodesic acceleration's;
    lsq_jax.optim.lm.sharded_cholesky) against `cg_iterations` of unpreconditioned CG on the same rows
    (lsq_jax.optim.lm.row_sharded_matvec). The matrix is Q diag(s) Q^T, Q a random orthogonal matrix and s
    log-spaced from 1 down to 1e-6 (condition 1e6, as LM's damped systems at small damping), padded as the
    path pads it. Seconds are the median of `repeats` after a warm-up; each way's relative residual
    ||A x - b|| / ||b|| says how far CG is from the solution after its iterations."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lsq_jax.optim import lm

    devices = jax.devices()[:n_devices] if n_devices else jax.devices()
    n, size = len(devices), lm.padded_size(n_params, len(devices))
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(n_params, n_params)))[0]
    a = np.eye(size)
    a[:n_params, :n_params] = (q * np.logspace(0, -6, n_params)) @ q.T
    b = np.zeros(size)
    b[:n_params] = rng.normal(size=n_params)
    mesh = jax.make_mesh((n,), ("data",), devices=devices)

    def cholesky(rows, v):  # the second solve's first entry is returned so that it is not compiled away
        factor = lm.sharded_cholesky(rows, "data")
        return lm.sharded_cho_solve(factor, v, "data"), lm.sharded_cho_solve(factor, 2.0 * v, "data")[0]

    def cg(rows, v):
        return lm.conjugate_gradients(lm.row_sharded_matvec(rows, "data"), v, 0.0, cg_iterations)[0], jnp.zeros([])

    row = {"devices": n, "n_params": n_params, "cg_iterations": cg_iterations}
    rows, rhs = (jax.device_put(jnp.asarray(v), jax.NamedSharding(mesh, spec))
                 for v, spec in ((a, jax.P("data")), (b, jax.P())))
    for name, fn in (("cholesky", cholesky), ("cg", cg)):
        solve = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(jax.P("data"), jax.P()), out_specs=(jax.P(), jax.P()),
                                      check_vma=False))
        solution = np.asarray(jax.block_until_ready(solve(rows, rhs))[0])
        row[f"{name}_s"] = _median_seconds(lambda: jax.block_until_ready(solve(rows, rhs)), repeats)
        row[f"{name}_residual"] = float(np.linalg.norm(a @ solution - b) / np.linalg.norm(b))
    row["cholesky_in_cg_iterations"] = row["cholesky_s"] / row["cg_s"] * cg_iterations
    return row


# --------------------------------------------------------------------------------------------------
# Bytes reduced across devices, read from a compiled program's HLO text.

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_REDUCTIONS = ("all-reduce", "all-reduce-start", "reduce-scatter")
_GATHERS = ("all-gather", "all-gather-start")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.+?) ([\w-]+)\((.*)$")


def _shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape (an array, or a tuple of them): f64[3,4]{1,0} -> 96."""
    return sum(_ITEMSIZE.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape))


def reduced_bytes(hlo: str) -> int:
    """Bytes one run of the program reduces across devices: the operand bytes of every all-reduce and
    reduce-scatter (:func:`collective_bytes`)."""
    return collective_bytes(hlo, _REDUCTIONS)


def gathered_bytes(hlo: str) -> int:
    """Bytes one run of the program all-gathers: the operand bytes of every all-gather, what each device
    contributes (each receives n - 1 times that from the others) (:func:`collective_bytes`)."""
    return collective_bytes(hlo, _GATHERS)


def collective_bytes(hlo: str, ops: tuple[str, ...]) -> int:
    """The operand bytes of every instruction of `ops` in one run of the program, times the trip count of
    the loops around it (a loop without a known trip count, such as LM's retries or a CG solve, counts
    once), the larger branch of a conditional.

    Args:
        hlo: the text of a compiled program (``jax.jit(f).lower(...).compile().as_text()``).
        ops: HLO op names, e.g. ``("all-reduce", "reduce-scatter")``.
    """
    computations, shapes, name, entry = {}, {}, None, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            entry = header.group(2) if header.group(1) else entry
            name = header.group(2)
            computations[name], shapes[name] = [], {}
        elif name is not None and (instruction := _INSTRUCTION.match(line)):
            target, shape, op, rest = instruction.groups()
            shapes[name][target] = shape
            computations[name].append((op, rest))

    @functools.cache
    def total(name: str) -> int:
        out = 0
        for op, rest in computations[name]:
            if op in ops:
                operands = re.findall(r"%([\w.-]+)", rest.split(")", 1)[0])
                out += sum(_shape_bytes(shapes[name][o]) for o in operands)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
            for callee in re.findall(r"(?:body|calls)=%([\w.-]+)", rest):
                out += (int(trips.group(1)) if op == "while" and trips else 1) * total(callee)
            branches = re.findall(r"(?:true_computation|false_computation)=%([\w.-]+)", rest)
            for listed in re.findall(r"branch_computations=\{([^}]*)\}", rest):
                branches += re.findall(r"%([\w.-]+)", listed)
            out += max((total(b) for b in branches), default=0)
        return out

    return total(entry)
