"""The boundary between an ml_collections config and the library: frozen, validated dataclasses.

`experiment_from_config` is called once, by the entrypoint; everything below it sees only dataclasses.
Every error is a ValueError whose message names the field (as `section.field`) and what is allowed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lsq_jax.data.tasks import CurriculumConfig, TaskConfig, make_task
from lsq_jax.models.config import ModelConfig
from lsq_jax.optim.config import OptimConfig


class UsageError(ValueError):
    """Input that can only be judged once the run starts (device count, workdir contents): one line, exit 2."""


# jax_default_matmul_precision of every run. "highest" keeps float32 matmuls in full float32 on GPUs
# (whose default is TF32) and TPUs (whose default is bfloat16 passes); float64 is unaffected.
MATMUL_PRECISIONS = ("highest", "high", "default")


def matmul_precision_of(config) -> str:
    """The config's matmul_precision (default "highest"), validated; None (no config) gives the default."""
    value = "highest" if config is None else config.get("matmul_precision", "highest")
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision={value!r} is not allowed: must be one of {', '.join(MATMUL_PRECISIONS)}")
    return value


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Sizes of the training loop.

    Attributes:
      batch_size: global batch, split over every device of every process.
      num_steps: training iterations (skipped ones included).
      log_every: progress line, metrics and gradient statistics every this many iterations.
      grad_stats_batches: fresh mini-batches for the gradient statistics (0 = none).
      eval_batch_size: fresh problems for the test MSE at the end of training.
      eval_problems: problems in the iterated-use / out-of-distribution report.
      eval_iters: iterations of iterated use in that report.
      checkpoint_every: iterations between checkpoints.
      microbatch_size: examples per device differentiated at once; the step accumulates the gradient over
        the microbatches of its per-device batch in a scan (same mean, summed in another order; on CPU two
        microbatches at a time, to use two cores). 0 (auto): on CPU, microbatches whose (examples, T, E)
        activations hold at most 2^17 elements, so the step works in cache rather than main memory; on
        GPU/TPU, the whole per-device batch at once.
    """

    batch_size: int = 1024
    num_steps: int = 1_000_000
    log_every: int = 1000
    grad_stats_batches: int = 64
    eval_batch_size: int = 4096
    eval_problems: int = 256
    eval_iters: int = 1000
    checkpoint_every: int = 10_000
    microbatch_size: int = 0

    def __post_init__(self):
        for name in ("batch_size", "num_steps", "log_every", "eval_batch_size", "eval_problems", "eval_iters",
                     "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is not allowed: must be a positive integer")
        value = self.microbatch_size
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"microbatch_size={value!r} is not allowed: must be 0 (auto) or a positive integer")
        value = self.grad_stats_batches
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value == 1:
            raise ValueError(f"grad_stats_batches={value!r} is not allowed: must be 0 or an integer >= 2")


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

    def make_task(self):
        return make_task(self.task)


def _build(section: str, cls, fields: Mapping[str, Any], **extra):
    """cls(**fields, **extra), with unknown fields and bad values reported as `section.field`."""
    allowed = {f.name for f in dataclasses.fields(cls)}
    for name in fields:
        if name not in allowed:
            raise ValueError(f"{section}.{name} is not a known field: allowed are {', '.join(sorted(allowed))}")
    try:
        return cls(**fields, **extra)
    except ValueError as err:
        raise ValueError(f"{section}.{err}") from None


def _curriculum(var: str, spec: Mapping[str, Any], end: int) -> CurriculumConfig:
    if spec.get("start") is None:
        return CurriculumConfig.constant(end)
    fields = {k: v for k, v in spec.items()}
    fields["end"] = end
    return _build(f"curriculum.{var}", CurriculumConfig, fields)


def experiment_from_config(config) -> Experiment:
    """Validate a ConfigDict (or plain nested dict) and convert it into an Experiment.

    The model's in_dims come from the task; its out_dims and n_positions default to what the task needs
    and, when given, must be at least that. The curriculum ends at task.n_points / task.n_dims.
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    known = {"name", "seed", "dtype", "matmul_precision", "task", "model", "optim", "train", "curriculum"}
    for name in c:
        if name not in known:
            raise ValueError(f"{name} is not a known field: allowed are {', '.join(sorted(known))}")
    dtype = c.get("dtype", "float64")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype={dtype!r} is not allowed: must be one of float64, float32")
    matmul_precision = matmul_precision_of(c)
    seed = c.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: must be a non-negative integer")

    task_cfg = _build("task", TaskConfig, c["task"], dtype=dtype)
    task = make_task(task_cfg)

    model_fields = {k: v for k, v in c["model"].items() if v is not None}
    for name in ("in_dims", "dtype"):
        if name in model_fields:
            raise ValueError(f"model.{name} is not a settable field: it comes from the task / the top-level dtype")
    seq_len = task.seq_len(task_cfg.n_points)
    n_positions = model_fields.setdefault("n_positions", seq_len)
    if n_positions < seq_len:
        raise ValueError(f"model.n_positions={n_positions} is not allowed: the task's sequence has {seq_len} "
                         f"tokens, so it must be >= {seq_len}")
    out_dims = model_fields.setdefault("out_dims", task.out_dims)
    if out_dims < task.out_dims:
        raise ValueError(f"model.out_dims={out_dims} is not allowed: task {task_cfg.name} reads {task.out_dims} "
                         f"channels, so it must be >= {task.out_dims}")
    model = _build("model", ModelConfig, model_fields, in_dims=task.in_dims, dtype=dtype)

    optim = _build("optim", OptimConfig, {k: v for k, v in c["optim"].items()})
    train = _build("train", TrainConfig, c["train"])
    if optim.schedule == "adaptive" and train.grad_stats_batches < 2:
        raise ValueError(f"train.grad_stats_batches={train.grad_stats_batches} is not allowed with "
                         "optim.schedule='adaptive': the adaptive LR needs the gradient metric (>= 2 batches)")
    cur = c.get("curriculum", {})
    for name in cur:
        if name not in ("points", "dims"):
            raise ValueError(f"curriculum.{name} is not a known field: allowed are dims, points")
    points = _curriculum("points", cur.get("points", {}), task_cfg.n_points)
    dims = _curriculum("dims", cur.get("dims", {}), task_cfg.n_dims)
    name = c.get("name", "run")
    return Experiment(name=name, seed=seed, task=task_cfg, model=model, optim=optim, train=train,
                      points=points, dims=dims, matmul_precision=matmul_precision)


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """A JSON-serialisable dict of every field (what a workdir and a checkpoint store)."""
    return dataclasses.asdict(exp)


def experiment_from_dict(d: Mapping[str, Any]) -> Experiment:
    """The inverse of experiment_to_dict (validating every section again)."""
    return Experiment(name=d["name"], seed=d["seed"], task=_build("task", TaskConfig, d["task"]),
                      model=_build("model", ModelConfig, d["model"]), optim=_build("optim", OptimConfig, d["optim"]),
                      train=_build("train", TrainConfig, d["train"]),
                      points=_build("points", CurriculumConfig, d["points"]),
                      dims=_build("dims", CurriculumConfig, d["dims"]),
                      matmul_precision=matmul_precision_of(d))


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
