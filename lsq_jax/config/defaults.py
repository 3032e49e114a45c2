"""The ml_collections config every config file starts from, built from the dataclasses' defaults (the one
place defaults live), and the variants that size a published run for a laptop."""
from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from lsq_jax.config.experiment import Experiment
from lsq_jax.config.model import ModelConfig
from lsq_jax.config.train import TrainConfig
from lsq_jax.config.optim import OptimConfig
from lsq_jax.config.task import CurriculumConfig, TaskConfig

_PLACEHOLDER_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _section(cls, skip: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """One ConfigDict entry per field of `cls` with its default; a field without one (or defaulting to None)
    becomes a typed placeholder, so `--config.section.field=value` still parses to the right type."""
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        c[f.name] = (default if default is not None
                     else config_dict.placeholder(_PLACEHOLDER_TYPES[str(f.type).split("|")[0].strip()]))
    return c


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run, with its default. The sections mirror the dataclasses they are converted into
    (`lsq_jax.config.experiment_from_config`), whose docstrings say what each field means. The model's
    in_dims and the sections' dtype come from the task and the top-level dtype; a curriculum with no start
    is off and ends at the task's size."""
    c = ml_collections.ConfigDict()
    c.name = "run"  # the default workdir is runs/<name>-<timestamp>
    c.seed = 0
    c.dtype = "float64"  # float64 | float32: data, parameters and activations alike
    c.matmul_precision = Experiment.matmul_precision
    c.task = _section(TaskConfig, skip=("dtype",))
    c.model = _section(ModelConfig, skip=("in_dims", "dtype"))
    c.optim = _section(OptimConfig)
    c.train = _section(TrainConfig)
    c.curriculum = ml_collections.ConfigDict({var: _section(CurriculumConfig, skip=("end",))
                                              for var in ("points", "dims")})  # points: task.n_points, dims: task.n_dims
    return c


def apply_variant(c: ml_collections.ConfigDict, variant: str | None, *, cpu: dict, smoke: dict, **more: dict):
    """Size the config for a variant: '' (published), 'cpu' (<= 10 min on 2 cores), 'smoke' (<= 60 s), or
    one of `more` (e.g. 'lm')."""
    sizes = {None: {}, "": {}, "cpu": cpu, "smoke": smoke, **more}
    if variant not in sizes:
        names = ", ".join(["cpu", "smoke", *more])
        raise ValueError(f"config variant {variant!r} is not allowed: must be one of {names} (or none)")
    c.update_from_flattened_dict(sizes[variant])
    if variant:
        c.name = f"{c.name}-{variant}"
    return c


# The `:lm_general` variants' training range, over the `:lm` variant (D = 3): L in [D + 1, 12] (444
# problems of each in a batch of 3,996), kappa in [1, 100], target scale in [0.1, 10], on the relative loss,
# with the problem's scales built into the model; positions for L = 14, the generality grid's L_max + 2.
GENERAL_RANGES = {"task.n_points": 12, "task.n_points_min": 4, "model.n_positions": 15, "task.scale_cond_max": 100.0,
                  "task.scale_target": 0.1, "task.scale_target_max": 10.0, "task.train_loss": "relative",
                  "model.scale_equivariant": True, "train.batch_size": 3996}


def split_arg(arg: str | None) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c']; None -> []."""
    return [part for part in (arg or "").split(",") if part]
