"""The memory the evaluation report of an experiment needs: a lower bound, in bytes on the one device the
report runs on, by part, from shapes alone (nothing is allocated), checked before a run starts."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lsq_jax.data.tasks import make_task
from lsq_jax.mesh import check_fits, device_memory
from lsq_jax.models import gd_weights
from lsq_jax.models.backbone import mixing_bytes, parameter_count

REPORT_FIELDS = {"report_problems": "train.eval_problems",
                 "report_activations": "train.eval_problems / model.n_embd",
                 "report_trajectories": "train.eval_iters / train.eval_problems",
                 "constructions": "task.n_dims (the hand-built GD models are 4 n_dims + 1 wide)",
                 "model": "model.n_embd / model.n_layer / task.n_points"}


def parameter_bytes(cfg) -> int:
    """The bytes of a model's parameters (lsq_jax.models.backbone), from their shapes: every leaf is in the
    model's dtype."""
    return parameter_count(cfg) * cfg.jnp_dtype.itemsize


def report_estimate(exp, *, constructions_only: bool = False, parameters: bool = True) -> dict[str, int]:
    """A lower bound of the bytes the report (lsq_jax.eval.report.write_evaluation) holds at once, by part.

    model: the learned model's parameters and what its sequence mixer materialises on the problems
    (lsq_jax.models.backbone.mixing_bytes); report_activations: one activation of it on the problems;
    report_problems: the problems of the single-step and iterated parts, their matrices and tokens;
    report_trajectories: exact GD's iterates (the reference) and one method's, eval_iters GD-step
    equivalents each on eval_problems problems; constructions: the hand-built GD models' parameters, mixer
    and one activation (iterated tasks, or `constructions_only` for --mode=construct). Without
    `parameters` the parameter counts are left out: counting them traces the models, whose mixer may
    allocate on the host.
    """
    task, cfg, train = make_task(exp.task), exp.task, exp.train
    itemsize = jnp.dtype(cfg.dtype).itemsize
    seq_len = task.seq_len(cfg.n_points)
    parts = {"report_problems": train.eval_problems * task.example_bytes()}
    if not constructions_only:
        parts["report_activations"] = train.eval_problems * seq_len * exp.model.n_embd * itemsize
        parts["model"] = mixing_bytes(exp.model, seq_len, train.eval_problems) + (
            parameter_bytes(exp.model) if parameters else 0)
    if not task.is_one_step_solver and not constructions_only:
        return parts
    parts["report_trajectories"] = (2 * (train.eval_iters * task.steps_per_iter + 1) * train.eval_problems
                                    * cfg.n_dims * itemsize)
    built = gd_weights.baseconv_gd_config(cfg.n_dims, cfg.n_points, dtype=cfg.dtype)
    parts["constructions"] = (mixing_bytes(built, cfg.n_points, train.eval_problems)
                              + train.eval_problems * cfg.n_points * built.n_embd * itemsize
                              + (parameter_bytes(built) if parameters else 0))
    return parts


def check_report_memory(exp, *, constructions_only: bool = False) -> None:
    """ConfigError, naming the field to reduce, when the report cannot fit on the device it runs on (the
    first; on CPU, the machine's memory): first without the parameters, whose count traces the models."""
    device = jax.devices()[0]
    limit = device_memory(device, whole_host=True)
    for parameters in (False, True):
        check_fits(report_estimate(exp, constructions_only=constructions_only, parameters=parameters), limit,
                   device.platform, "the evaluation report", REPORT_FIELDS)
