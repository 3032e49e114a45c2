"""The evaluation's part of a run, decided once from the experiment: the task, the model, the evaluation
key, the report's sizes and its memory estimate. A report plan is only made for a report that fits:
`make_report_plan` refuses the others in one ConfigError before anything is written."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from lsq_jax.config.experiment import Experiment
from lsq_jax.data.base import Task
from lsq_jax.data.keys import run_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.models.backbone import SequenceModel, parameter_count
from lsq_jax.plan.memory import check_report_memory, report_estimate, report_models

OOD_KAPPAS = (1.0, 10.0, 100.0, 1000.0)  # sampler scale_cond (1 = plain Gaussian A)
OOD_SCALES = (0.01, 0.1, 1.0, 10.0, 100.0)  # sampler scale_target


class ReportSizes(NamedTuple):
    """How much the report computes.

    Attributes:
        n_problems: problems for single-step metrics and iterated use.
        n_iters: iterations T of iterated use (multistep_gd: T applications of the model, and the other
            methods get the same k T GD-step equivalents).
        n_ood_problems, n_ood_iters: sizes per cell of the generality grid (it has ~12 cells, more with a
            range of rows).
        ood_kappas, ood_scales: the grid's kappa and scale_target axes (lsq_jax.eval.ood.ood_cells), to which
            the trained range's ends are added.
    """

    n_problems: int
    n_iters: int
    n_ood_problems: int
    n_ood_iters: int
    ood_kappas: tuple[float, ...] = OOD_KAPPAS
    ood_scales: tuple[float, ...] = OOD_SCALES


def report_sizes(n_problems: int, n_iters: int, **ood) -> ReportSizes:
    """The sizes with the grid's defaults: min(n_problems, 64) problems and min(n_iters, 250) iterations per
    cell, the OOD_KAPPAS and OOD_SCALES axes; `ood` overrides any of them (ReportSizes' fields)."""
    return ReportSizes(n_problems, n_iters, min(n_problems, 64), min(n_iters, 250))._replace(**ood)


@dataclasses.dataclass(frozen=True, eq=False)
class ReportPlan:
    """The evaluation's part of a run (see the module docstring); built by `make_report_plan`.

    Attributes:
        exp: the experiment.
        task, model: its task and sequence model.
        n_params: P, the model's parameter count (None for a report of the constructions alone).
        key: the run's evaluation key.
        sizes: the report's sizes (train.eval_problems, train.eval_iters and the grid's defaults).
        constructions_only: a report of the hand-built GD models (--mode=construct), not of the model.
        memory: the lower-bound bytes the report holds, by part (lsq_jax.plan.memory.report_estimate).
    """

    exp: Experiment
    task: Task
    model: SequenceModel
    n_params: int | None
    key: Any
    sizes: ReportSizes
    constructions_only: bool
    memory: Mapping[str, int]


class ReportParts(NamedTuple):
    """What a report plan is built from before anything traces a model: the task and the models the report
    evaluates (lsq_jax.plan.memory.report_models), their memory checked without the parameter count."""

    task: Task
    models: Mapping[str, Any]


def report_parts(exp: Experiment, *, constructions_only: bool = False) -> ReportParts:
    """The task and models of `exp`'s report. Raises ConfigError, naming the field to reduce, when the report
    cannot fit on the device it runs on even without its parameters (counting them traces the models)."""
    task = make_task(exp.task)
    models = report_models(exp, task, constructions_only)
    check_report_memory(report_estimate(exp, task, models))
    return ReportParts(task, models)


def make_report_plan(exp: Experiment, *, constructions_only: bool = False,
                     parts: ReportParts | None = None) -> ReportPlan:
    """The report plan of `exp` (from `parts`, `report_parts`' for the same arguments, when the caller has
    checked more before the models are traced). Raises ConfigError, naming the field to reduce, when the
    report cannot fit on the device it runs on."""
    task, models = parts or report_parts(exp, constructions_only=constructions_only)
    n_params = {part: parameter_count(cfg) for part, cfg in models.items()}
    memory = report_estimate(exp, task, models, n_params)
    check_report_memory(memory)
    model = SequenceModel(exp.model, task.normalize if exp.model.scale_equivariant else None)
    return ReportPlan(exp, task, model, n_params.get("model"), run_keys(exp.seed)["eval"], report_sizes(
        exp.train.eval_problems, exp.train.eval_iters), constructions_only, memory)
