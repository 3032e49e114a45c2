"""The run as a whole: the train section, the Experiment (every section, validated and consistent), and the
conversion from an ml_collections config (once, by the entry point) and from a saved dict (a workdir).

Every error is a ConfigError: `section.field: got X; allowed Y`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lsq_jax.config.check import ConfigError, check_choice, check_int, check_known, in_section, is_int, require
from lsq_jax.config.model import ModelConfig
from lsq_jax.config.optim import OptimConfig
from lsq_jax.config.task import DTYPES, CurriculumConfig, TaskConfig, task_sizes

# jax_default_matmul_precision of every run. "highest" keeps float32 matmuls in full float32 on GPUs
# (whose default is TF32) and TPUs (whose default is bfloat16 passes); float64 is unaffected.
MATMUL_PRECISIONS = ("highest", "high", "default")


def matmul_precision_of(config) -> str:
    """The config's matmul_precision (default "highest"), validated; None (no config) gives the default."""
    value = "highest" if config is None else config.get("matmul_precision", "highest")
    check_choice("matmul_precision", value, MATMUL_PRECISIONS)
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
            check_int(name, getattr(self, name), 1)
        check_int("microbatch_size", self.microbatch_size, 0)
        value = self.grad_stats_batches
        require("grad_stats_batches", value, is_int(value) and (value == 0 or value >= 3),
                "0 (none) or integers >= 3 (the statistics compare mini-batch gradients)")


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


def _curriculum(var: str, spec: Mapping[str, Any], end: int) -> CurriculumConfig:
    if spec.get("start") is None:
        return CurriculumConfig.constant(end)
    return _build(f"curriculum.{var}", CurriculumConfig, {**spec, "end": end})


def _model(fields: Mapping[str, Any], task: TaskConfig, dtype: str) -> ModelConfig:
    """The model section, sized by the task: in_dims from it; n_positions and out_dims default to what it
    needs and, when given, must be at least that."""
    fields = {k: v for k, v in fields.items() if v is not None}
    for name in ("in_dims", "dtype"):
        require(f"model.{name}", fields.get(name), name not in fields, "unset (it comes from the task / the top-level dtype)")
    sizes = task_sizes(task)
    n_positions = fields.setdefault("n_positions", sizes.seq_len)
    require("model.n_positions", n_positions, not is_int(n_positions) or n_positions >= sizes.seq_len,
            f"integers >= {sizes.seq_len} (the task's sequence length)")
    out_dims = fields.setdefault("out_dims", sizes.out_dims)
    require("model.out_dims", out_dims, not is_int(out_dims) or out_dims >= sizes.out_dims,
            f"integers >= {sizes.out_dims} (the channels task {task.name} reads)")
    return _build("model", ModelConfig, fields, in_dims=sizes.in_dims, dtype=dtype)


def experiment_from_config(config) -> Experiment:
    """Validate a ConfigDict (or plain nested dict) and convert it into an Experiment.

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
    task = _build("task", TaskConfig, c["task"], dtype=dtype)
    optim = _build("optim", OptimConfig, c["optim"])
    train = _build("train", TrainConfig, c["train"])
    if optim.schedule == "adaptive":
        require("train.grad_stats_batches", train.grad_stats_batches, train.grad_stats_batches > 0,
                "integers >= 3 with optim.schedule='adaptive' (the adaptive LR needs the gradient metric)")
    cur = c.get("curriculum", {})
    check_known("curriculum.", cur, {"points", "dims"})
    return Experiment(name=c.get("name", "run"), seed=seed, task=task, model=_model(c["model"], task, dtype),
                      optim=optim, train=train, points=_curriculum("points", cur.get("points", {}), task.n_points),
                      dims=_curriculum("dims", cur.get("dims", {}), task.n_dims),
                      matmul_precision=matmul_precision_of(c))


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """A JSON-serialisable dict of every field (what a workdir and a checkpoint store)."""
    return dataclasses.asdict(exp)


def _saved_optim(optim: Mapping[str, Any]) -> Mapping[str, Any]:
    """A saved optim section as it ran: LM saved before lm_scaling existed ran with Marquardt's scaling."""
    if optim.get("optimizer") == "lm" and "lm_scaling" not in optim:
        return {**optim, "lm_scaling": "marquardt"}
    return optim


def experiment_from_dict(d: Mapping[str, Any]) -> Experiment:
    """The inverse of experiment_to_dict (validating every section again); a field the saved dict lacks
    takes its default, except where that run ran otherwise (`_saved_optim`)."""
    return Experiment(name=d["name"], seed=d["seed"], task=_build("task", TaskConfig, d["task"]),
                      model=_build("model", ModelConfig, d["model"]),
                      optim=_build("optim", OptimConfig, _saved_optim(d["optim"])),
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
