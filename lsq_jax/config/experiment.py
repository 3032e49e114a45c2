"""The run as a whole: the Experiment (every section, validated and consistent), and one decoder for an
ml_collections config (once, by the entry point) and for a saved dict (a workdir).

Every error is a ConfigError: `section.field: got X; allowed Y`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lsq_jax.config.check import ConfigError, check_choice, check_int, check_known, in_section, is_int, require
from lsq_jax.config.model import ModelConfig
from lsq_jax.config.optim import SOLVER_SETTINGS, OptimConfig, lm_defaults, solver_settings
from lsq_jax.config.task import DTYPES, CurriculumConfig, TaskConfig, task_sizes
from lsq_jax.config.train import TrainConfig

# jax_default_matmul_precision of every run. "highest" keeps float32 matmuls in full float32 on GPUs
# (whose default is TF32) and TPUs (whose default is bfloat16 passes); float64 is unaffected.
MATMUL_PRECISIONS = ("highest", "high", "default")


def matmul_precision_of(config) -> str:
    """The config's matmul_precision (default "highest"), validated; None (no config) gives the default."""
    value = "highest" if config is None else config.get("matmul_precision", "highest")
    check_choice("matmul_precision", value, MATMUL_PRECISIONS)
    return value


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything one run needs, validated and consistent."""

    name: str
    seed: int
    task: TaskConfig
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    points: CurriculumConfig
    dims: CurriculumConfig
    matmul_precision: str = "highest"


def _build(section: str, cls, fields: Mapping[str, Any], **extra):
    """cls(**fields, **extra), with unknown fields and bad values reported as `section.field`."""
    check_known(f"{section}.", fields, {f.name for f in dataclasses.fields(cls)})
    try:
        return cls(**fields, **extra)
    except ConfigError as err:
        raise in_section(section, err) from None


def _unset_or(field: str, fields: Mapping[str, Any], value: Any, source: str) -> dict[str, Any]:
    """`fields` less the key that ends the dotted name `field`: a value given there must be `value`, which
    `source` makes it."""
    key = field.rsplit(".", 1)[-1]
    given = fields.get(key, value)
    require(field, given, given == value, f"unset or {value!r} ({source})")
    return {k: v for k, v in fields.items() if k != key}


def _curriculum(var: str, spec: Mapping[str, Any], end: int) -> CurriculumConfig:
    spec = _unset_or(f"curriculum.{var}.end", spec, end, f"task.n_{var}")
    if spec.get("start") is None:
        return CurriculumConfig.constant(end)
    return _build(f"curriculum.{var}", CurriculumConfig, {**spec, "end": end})


def _model(fields: Mapping[str, Any], task: TaskConfig, dtype: str) -> ModelConfig:
    """The model section, sized by the task: in_dims from it; n_positions and out_dims default to what it
    needs and, when given, must be at least that."""
    sizes = task_sizes(task)
    fields = {k: v for k, v in fields.items() if v is not None}
    fields = _unset_or("model.in_dims", fields, sizes.in_dims, f"the width of task {task.name}'s tokens")
    fields = _unset_or("model.dtype", fields, dtype, "the top-level dtype")
    n_positions = fields.setdefault("n_positions", sizes.seq_len)
    require("model.n_positions", n_positions, not is_int(n_positions) or n_positions >= sizes.seq_len,
            f"integers >= {sizes.seq_len} (the task's sequence length)")
    out_dims = fields.setdefault("out_dims", sizes.out_dims)
    require("model.out_dims", out_dims, not is_int(out_dims) or out_dims >= sizes.out_dims,
            f"integers >= {sizes.out_dims} (the channels task {task.name} reads)")
    return _build("model", ModelConfig, fields, in_dims=sizes.in_dims, dtype=dtype)


def experiment_from_config(config) -> Experiment:
    """Validate a ConfigDict (or plain nested dict) and convert it into an Experiment: the one decoder, for
    the flags and (through experiment_from_dict) for a saved config.

    The curriculum ends at task.n_points / task.n_dims.
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    check_known("", c, {"name", "seed", "dtype", "matmul_precision", "task", "model", "optim", "train", "curriculum"})
    dtype = c.get("dtype", "float64")
    check_choice("dtype", dtype, DTYPES)
    seed = c.get("seed", 0)
    check_int("seed", seed, 0)
    name = c.get("name", "run")
    require("name", name, isinstance(name, str) and name not in ("", ".", "..") and not {"/", "\\"} & set(name),
            "non-empty strings without a path separator (the workdir is runs/<name>-<timestamp>)")
    task = _build("task", TaskConfig, _unset_or("task.dtype", c["task"], dtype, "the top-level dtype"), dtype=dtype)
    cur = c.get("curriculum", {})
    check_known("curriculum.", cur, {"points", "dims"})
    return _checked(Experiment(name=name, seed=seed, task=task, model=_model(c["model"], task, dtype),
                               optim=_build("optim", OptimConfig, c["optim"]),
                               train=_build("train", TrainConfig, c["train"]),
                               points=_curriculum("points", cur.get("points", {}), task.n_points),
                               dims=_curriculum("dims", cur.get("dims", {}), task.n_dims),
                               matmul_precision=matmul_precision_of(c)))


def _checked(exp: Experiment) -> Experiment:
    """The checks that span sections."""
    if exp.optim.schedule == "adaptive":
        require("train.grad_stats_batches", exp.train.grad_stats_batches, exp.train.grad_stats_batches > 0,
                "integers >= 3 with optim.schedule='adaptive' (the adaptive LR needs the gradient metric)")
    require("model.scale_equivariant", exp.model.scale_equivariant,
            not exp.model.scale_equivariant or (exp.task.name, exp.task.setting) == ("explicit_gradient", "last"),
            "False unless task.name='explicit_gradient' with setting='last' (the one target normalised here)")
    n_rows = len(exp.task.rows())
    if n_rows > 1:
        require("task.n_points_min", exp.task.n_points_min, exp.points.inc == 0 and exp.points.start == exp.points.end,
                "None with a points curriculum (the range of rows replaces it)")
        require("train.batch_size", exp.train.batch_size, exp.train.batch_size % n_rows == 0,
                f"multiples of {n_rows} with task.n_points_min={exp.task.n_points_min} (an equal share of the "
                f"batch for each row count in [{exp.task.n_points_min}, {exp.task.n_points}])")
    return exp


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """A JSON-serialisable dict of every field (what a workdir and a checkpoint store)."""
    return dataclasses.asdict(exp)


def _saved_optim(optim: Mapping[str, Any]) -> dict[str, Any]:
    """A saved optim section as it ran, in today's fields. A run with another optimizer read no LM setting;
    LM saved before lm_scaling existed ran with Marquardt's scaling, and before lm_solver existed with
    Cholesky; settings a run did not read (another solver's, the restarts' length without restarts) were
    saved at their old placeholders (0, or 10 tries) and are unset (None) now, as is the automatic chunk
    (0). CG read no lm_tries while placeholders were saved (an automatic chunk or restarts' length of 0
    marks those configs): its 10 then was a placeholder for the one try it made."""
    if optim.get("optimizer", "adam") != "lm":
        return {k: v for k, v in optim.items() if k not in lm_defaults()}
    solver = optim.get("lm_solver", "cholesky")
    unread = {name for name in solver_settings() if name not in SOLVER_SETTINGS.get(solver, solver_settings())}
    placeholders = optim.get("lm_chunk") == 0 or optim.get("lm_restart_steps") == 0
    if solver == "cg" and placeholders:
        unread.add("lm_tries")
    if optim.get("lm_restarts", 1) == 1:
        unread.add("lm_restart_steps")
    if optim.get("lm_chunk") == 0:
        unread.add("lm_chunk")
    return {"lm_scaling": "marquardt", "lm_solver": "cholesky", **{k: v for k, v in optim.items() if k not in unread}}


def experiment_from_dict(d: Mapping[str, Any]) -> Experiment:
    """The inverse of experiment_to_dict, through the config's decoder (every check again); a field the
    saved dict lacks takes its default, except where that run ran otherwise (`_saved_optim`)."""
    check_known("", d, {f.name for f in dataclasses.fields(Experiment)})
    config = {key: d[key] for key in ("name", "seed", "task", "model", "train")}
    return experiment_from_config({**config, "dtype": d["task"].get("dtype", "float64"),
                                   "optim": _saved_optim(d["optim"]), "matmul_precision": matmul_precision_of(d),
                                   "curriculum": {"points": d["points"], "dims": d["dims"]}})


# Fields that may change when a run is resumed: they do not change what is computed (the microbatch size
# changes only the order in which the batch's gradient is summed).
RESUMABLE_CHANGES = ("name", "train.num_steps", "train.checkpoint_every", "train.eval_batch_size",
                     "train.eval_problems", "train.eval_iters", "train.microbatch_size")


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two experiment dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, prefix=name + ".")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(name)
    return out
