"""The memory a run needs: lower-bound estimates per device, by part, of training and of the evaluation
report, and the checks that refuse a run whose estimate exceeds a device, before anything is allocated or
written. The sizes they count come from the plan (lsq_jax.plan.run, lsq_jax.plan.report)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lsq_jax.config.experiment import Experiment
from lsq_jax.config.model import ModelConfig
from lsq_jax.data.base import Task
from lsq_jax.mesh import check_fits, device_memory
from lsq_jax.models import gd_weights
from lsq_jax.models.backbone import mixing_bytes
from lsq_jax.optim.lm import gram_depth, padded_size

# The Cholesky solve's peak, in P x P matrices: J^T J whole, its damped copy and Cholesky factor, the
# lower triangle it is unpacked from and the unpacking's indices (XLA's memory_analysis on CPU: 4.1 to
# 4.7 for P = 469 to 4,020; docs/performance.md).
SOLVE_MATRICES = 4.3

# The valley step's peak (lsq_jax.optim.lm, optim.lm_valley): the device's whole Jacobian with its residuals,
# VALLEY_J_COPIES times (the chunks' transposed Jacobians and the rows QR factors in place), next to
# VALLEY_MATRICES P x P matrices (J^T J, the corrections' damped copy and factor, the predictor's stacked
# [R; D]). XLA's memory_analysis on CPU at configs/linear_attention.py:precise (P = 3,571, 12,000 residuals):
# 1.196e9 temp bytes, these constants' figure to 0.1% (one size; docs/performance.md). The predictor by CG
# (optim.lm_valley_cg) makes no QR copy of [J r]: the same figure bounds it.
VALLEY_J_COPIES = 2
VALLEY_MATRICES = 5

# The row-sharded path's peak, in P'/n x P' row blocks per device: while J^T J is built, the accumulated
# block and the chunk's product, less what XLA reuses; while a damped system is factorised, the rows, their
# damped copy, the factor and the block column's update (XLA's memory_analysis on CPU, 2 and 4 devices,
# P = 540 to 6,960: 1.9 and 4.3 to 4.6; docs/performance.md).
SHARDED_BUILD_BLOCKS = 1.9
SHARDED_SOLVE_BLOCKS = 4.4

# The matrix-free path's memory per token and layer, in activations of width n_embd (XLA's memory_analysis
# on CPU, BaseConv of 2 and 3 layers, widths 8 to 32): what the linearisation saves for each problem, and a
# chunk's tangents for each of the CG_PROBES Hutchinson probes (lsq_jax.optim.lm.lm_iteration_cg's n_probes).
CG_SAVED = 6.3
CG_TANGENTS = 5.4
CG_PROBES = 4


def lm_cholesky_bytes(n_params: int, rows: int, itemsize: int) -> int:
    """The bytes a Cholesky LM iteration holds at its peak, per device: the larger of its two phases.

    Building J^T J, a chunk's transposed Jacobian (P x `rows`) is held 2 + d times: the per-problem VJPs'
    output, its transpose, and one copy of its rows per level of lower_gram's halving (d =
    lsq_jax.optim.lm.gram_depth(P)), next to the accumulated and the chunk's lower triangles (P^2 entries
    together). Solving, SOLVE_MATRICES P x P matrices. Within 10% of XLA's memory_analysis temp bytes of
    the compiled iteration on CPU (tests/test_lm_memory.py).
    """
    build = ((2 + gram_depth(n_params)) * n_params * rows + n_params**2) * itemsize
    return int(max(build, SOLVE_MATRICES * n_params**2 * itemsize))


def lm_valley_bytes(n_params: int, device_rows: int, itemsize: int) -> int:
    """The bytes the valley step holds at its peak, per device, with `device_rows` residuals on the device:
    VALLEY_J_COPIES copies of its [J r] and VALLEY_MATRICES P x P matrices."""
    return int((VALLEY_J_COPIES * device_rows * (n_params + 1) + VALLEY_MATRICES * n_params**2) * itemsize)


def lm_sharded_bytes(n_params: int, rows: int, itemsize: int, n_devices: int) -> int:
    """The bytes a row-sharded LM iteration (lsq_jax.optim.lm.lm_iteration_sharded) holds at its peak, per
    device, with `rows` Jacobian rows per chunk on each of `n_devices`: the larger of its two phases.
    Building J^T J, the chunk's Jacobians of every device, gathered (P' x n rows, twice: gathered and
    padded), and SHARDED_BUILD_BLOCKS of the device's P'/n x P' rows of J^T J (P' =
    lsq_jax.optim.lm.padded_size); factorising, SHARDED_SOLVE_BLOCKS of them. Within 10% of XLA's
    memory_analysis temp bytes on CPU (tests/test_lm_memory.py).
    """
    size = padded_size(n_params, n_devices)
    block = size * size / n_devices
    build = 2 * size * n_devices * rows + SHARDED_BUILD_BLOCKS * block
    return int(max(build, SHARDED_SOLVE_BLOCKS * block) * itemsize)


def lm_cg_bytes(model: ModelConfig, seq_len: int, problems: int, chunk_problems: int, itemsize: int) -> int:
    """The bytes a matrix-free LM iteration (lsq_jax.optim.lm.lm_iteration_cg) holds at its peak, per
    device: the linearisation's saved values of the device's `problems` (CG_SAVED activations of width
    n_embd per token and layer each) and the tangents of one chunk of `chunk_problems` for every
    Hutchinson probe (CG_TANGENTS per token, layer and probe). Within 10% of XLA's memory_analysis on CPU
    (tests/test_lm_memory.py).
    """
    activation = model.n_layer * seq_len * model.n_embd * itemsize
    return int((CG_SAVED * problems + CG_TANGENTS * CG_PROBES * chunk_problems) * activation)


def lm_bytes(exp: Experiment, task: Task, n_params: int, rows: int, problems: int, chunk_problems: int,
             itemsize: int, n_devices: int) -> int:
    """What an LM iteration of exp's solver holds at its peak per device, beyond the state, with `rows`
    Jacobian rows and `chunk_problems` problems per chunk of the device's `problems` on each of `n_devices`:
    lm_cholesky_bytes, lm_sharded_bytes or lm_cg_bytes."""
    solver = exp.optim.lm_solver
    if solver == "cholesky":
        valley = lm_valley_bytes(n_params, rows * (problems // chunk_problems), itemsize) if exp.optim.lm_valley else 0
        return max(lm_cholesky_bytes(n_params, rows, itemsize), valley)
    if solver == "sharded":
        return lm_sharded_bytes(n_params, rows, itemsize, n_devices)
    return lm_cg_bytes(exp.model, task.seq_len(), problems, chunk_problems, itemsize)


def memory_estimate(exp: Experiment, task: Task, *, n_devices: int, n_params: int, live: int, mixing: int,
                    lm_rows: int = 0, lm_chunk_problems: int = 0) -> dict[str, int]:
    """A lower bound, in bytes per device, of what training `exp` holds at once, by part.

    state: parameters, their gradient and accumulator, and the optimizer's moments and EMA (6 copies);
    activations: the input and output of every block for the `live` examples whose activations are held
    at once (a microbatch, two on CPU where the scan is unrolled), kept for the backward pass; data: the
    per-device batch's matrices A, its input tokens and per-example keys; statistics: the matrix of
    mini-batch gradients; lm_normal_equations (with optimizer 'lm', `lm_rows` Jacobian rows and
    `lm_chunk_problems` problems per chunk): what an iteration of its solver holds at its peak (lm_bytes);
    sequence_mixing: `mixing`, what one block's mixer materialises (lsq_jax.models.backbone.mixing_bytes);
    evaluation: the test batch of the final metrics (its matrices, tokens and one activation), held with the
    state after training.
    """
    itemsize = jnp.dtype(exp.task.dtype).itemsize
    token = task.seq_len() * exp.model.n_embd * itemsize
    problem = task.example_bytes()
    return {"state": 6 * n_params * itemsize,
            "lm_normal_equations": (lm_bytes(exp, task, n_params, lm_rows, exp.train.batch_size // n_devices,
                                             lm_chunk_problems, itemsize, n_devices)
                                    if exp.optim.optimizer == "lm" else 0),
            "sequence_mixing": mixing,
            "activations": 2 * (exp.model.n_layer + 1) * live * token,
            "data": exp.train.batch_size // n_devices * (problem + 8),
            "statistics": exp.train.grad_stats_batches * n_params * itemsize,
            "evaluation": exp.train.eval_batch_size // n_devices * (problem + token)}


_MEMORY_FIELDS = {"sequence_mixing": "task.n_points (the mixer grows as its square or cube)",
                  "lm_normal_equations": "model.n_embd, or use optim.lm_solver=auto or cg (matrix-free)",
                  "state": "model.n_embd / model.n_layer", "activations": "train.microbatch_size / model.n_embd",
                  "data": "train.batch_size / task.n_dims / task.n_points",
                  "statistics": "train.grad_stats_batches / model.n_embd",
                  "evaluation": "train.eval_batch_size / task.n_dims / task.n_points"}


def training_bytes(parts: dict[str, int]) -> int:
    """The bytes per device of a memory_estimate while training (every part but the final test batch)."""
    return sum(v for k, v in parts.items() if k != "evaluation")


def _check(parts: dict[str, int], mesh, what: str) -> None:
    device = mesh.devices.flat[0]
    check_fits(parts, device_memory(device), device.platform, what, _MEMORY_FIELDS)


def check_mixing(mixing: int, mesh) -> None:
    """ConfigError when the sequence mixer alone exceeds a device (checked before anything traces the
    model, which builds the mixer's host-side tensors)."""
    _check({"sequence_mixing": mixing}, mesh, "the run")


def check_memory(parts: dict[str, int], mesh) -> None:
    """ConfigError when the estimate `parts` (memory_estimate) exceeds a device: during training
    (everything but the test batch), or while the final metrics are measured (the state and the test
    batch)."""
    _check({k: v for k, v in parts.items() if k != "evaluation"}, mesh, "the run")
    _check({k: parts[k] for k in ("state", "evaluation")}, mesh, "the final test")


REPORT_FIELDS = {"report_problems": "train.eval_problems",
                 "report_activations": "train.eval_problems / model.n_embd",
                 "report_trajectories": "train.eval_iters / train.eval_problems",
                 "constructions": "task.n_dims (the hand-built GD models are 4 n_dims + 1 wide)",
                 "model": "model.n_embd / model.n_layer / task.n_points"}


def report_models(exp: Experiment, task: Task, constructions_only: bool) -> dict[str, ModelConfig]:
    """The models the report holds, by part of `report_estimate`: 'model', the learned one (unless
    `constructions_only`), and 'constructions', the hand-built BaseConv GD model (iterated tasks, or
    `constructions_only`)."""
    models = {} if constructions_only else {"model": exp.model}
    if constructions_only or task.is_one_step_solver:
        cfg = exp.task
        models["constructions"] = gd_weights.baseconv_gd_config(cfg.n_dims, cfg.n_points, dtype=cfg.dtype)
    return models


def report_estimate(exp: Experiment, task: Task, models: dict[str, ModelConfig],
                    n_params: dict[str, int] | None = None) -> dict[str, int]:
    """A lower bound of the bytes the report (lsq_jax.eval.report.write_evaluation) holds at once, by part.

    model: the learned model's parameters and what its sequence mixer materialises on the problems
    (lsq_jax.models.backbone.mixing_bytes); report_activations: one activation of it on the problems;
    report_problems: the problems of the single-step and iterated parts, their matrices and tokens;
    report_trajectories: exact GD's iterates (the reference) and one method's, eval_iters GD-step
    equivalents each on eval_problems problems; constructions: the hand-built GD models' parameters, mixer
    and one activation. `models` are `report_models`; `n_params` their parameter counts by part (None: left
    out, since counting them traces the models, whose mixer may allocate on the host).
    """
    cfg, train = exp.task, exp.train
    itemsize = jnp.dtype(cfg.dtype).itemsize
    seq_len = task.seq_len(cfg.n_points)

    def parameter_bytes(part: str) -> int:
        return n_params[part] * models[part].jnp_dtype.itemsize if n_params else 0

    parts = {"report_problems": train.eval_problems * task.example_bytes()}
    if "model" in models:
        parts["report_activations"] = train.eval_problems * seq_len * exp.model.n_embd * itemsize
        parts["model"] = mixing_bytes(exp.model, seq_len, train.eval_problems) + parameter_bytes("model")
    if "constructions" not in models:
        return parts
    parts["report_trajectories"] = (2 * (train.eval_iters * task.steps_per_iter + 1) * train.eval_problems
                                    * cfg.n_dims * itemsize)
    built = models["constructions"]
    parts["constructions"] = (mixing_bytes(built, cfg.n_points, train.eval_problems)
                              + train.eval_problems * cfg.n_points * built.n_embd * itemsize
                              + parameter_bytes("constructions"))
    return parts


def check_report_memory(parts: dict[str, int]) -> None:
    """ConfigError, naming the field to reduce, when the report's estimate `parts` cannot fit on the device
    it runs on (the first; on CPU, the machine's memory)."""
    device = jax.devices()[0]
    check_fits(parts, device_memory(device, whole_host=True), device.platform, "the evaluation report",
               REPORT_FIELDS)
