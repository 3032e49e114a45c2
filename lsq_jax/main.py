"""Entrypoint: python -m lsq_jax.main --config=configs/baseconv.py[:variant] [--config.a.b=v] [--workdir=W].

Parses flags, turns on float64, converts the config once into validated dataclasses and calls the
library. Any bad input (unknown or ill-typed field, contradictory settings, missing config file, unknown
mode) is reported as ONE line on stderr with exit status 2.
"""
from __future__ import annotations

import datetime
import sys

from absl import app, flags
from ml_collections import config_flags

MODES = ("train", "eval", "construct")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/baseconv.py:cpu",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>-<timestamp>).")
_MODE = flags.DEFINE_enum(
    "mode", "train", MODES,
    "train: train (resuming from --workdir), then evaluate; eval: evaluate the checkpoint of --workdir "
    "(its saved config defines the model; --config is not needed); construct: the hand-built exact-GD "
    "models (BaseConv, linear attention) through the same evaluation, for the task sizes of --config.")
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: the newest good one).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ("off", "auto", "explicit"),
    "Multi-process JAX: off; auto (cloud TPU pods, SLURM); explicit (needs the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed=explicit).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed=explicit).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (--distributed=explicit).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config differs from --config.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(err: BaseException) -> str:
    """The gist of an exception on one line (ml_collections embeds whole tracebacks: keep their last line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if "Traceback" in str(err) else " ".join(lines)


def _check_config_path(argv: list[str]) -> None:
    """A missing config file is only noticed by ml_collections when the value is read; say it plainly."""
    import os

    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                _fail(f"--config: file {path!r} does not exist")


def _unknown_field(argv: list[str], key: str) -> str:
    for arg in argv:
        if arg.startswith("--config.") and key in arg.split("=", 1)[0].split("."):
            return f"{arg.split('=', 1)[0]}: the config has no field {key!r}"
    return f"the config has no field {key!r}"


def parse_flags(argv: list[str]):
    """absl's parser, then the config's conversion; every failure becomes one line and exit status 2."""
    from lsq_jax.experiment import experiment_from_config

    _check_config_path(argv)
    try:
        rest = flags.FLAGS(argv)
        if _MODE.value == "eval":
            if _WORKDIR.value is None:
                _fail("--mode=eval needs --workdir (a training workdir with checkpoints)")
            experiment = None
        elif _CONFIG.value is None:
            _fail("--config is required, e.g. --config=configs/baseconv.py:cpu")
        else:
            experiment = experiment_from_config(_CONFIG.value)
    except (AttributeError, KeyError) as err:
        _fail(_unknown_field(argv, str(err.args[0]).strip("'\"") if err.args else ""))
    except (flags.Error, OSError, TypeError, ValueError) as err:
        _fail(_one_line(err))
    if len(rest) > 1:
        _fail(f"unexpected positional arguments: {' '.join(rest[1:])}")
    return experiment


def default_workdir(name: str) -> str:
    return f"runs/{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def main(experiment) -> None:
    import jax
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax reports every save (INFO) and read-only opens (WARNING)
    from lsq_jax import parallel

    try:
        parallel.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
    except ValueError as err:
        _fail(_one_line(err))

    jax.config.update("jax_enable_x64", True)
    from etils import epath

    from lsq_jax import train
    from lsq_jax.checkpointing import CheckpointError
    from lsq_jax.experiment import UsageError

    def log(line):
        if jax.process_index() == 0:
            print(line, flush=True)

    mode = _MODE.value
    suffix = "-construct" if mode == "construct" else ""
    workdir = epath.Path(_WORKDIR.value or default_workdir(experiment.name + suffix))
    log(f"workdir: {workdir}")
    try:
        if mode == "train":
            train.train_and_evaluate(experiment, workdir, log=log, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
        elif mode == "eval":
            experiment, state = train.restore_for_eval(workdir, _STEP.value, log=log)
            log(f"evaluating step {int(state.step)} of {experiment.name}")
            train.write_evaluation(experiment, state.params, workdir, log=log)
        else:
            train.write_evaluation(experiment, None, workdir, log=log, constructions=True)
    except (CheckpointError, UsageError) as err:  # a workdir that cannot be used, a batch that cannot split
        _fail(_one_line(err))


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
