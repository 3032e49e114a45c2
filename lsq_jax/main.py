"""Entrypoint: python -m lsq_jax.main --config=configs/baseconv.py[:variant] [--config.a.b=v] [--workdir=W].

Parses flags, turns on float64 and the matmul precision, starts multi-process JAX, then converts the config
once into validated dataclasses and calls the library (the first JAX computation comes after all three).
Bad input (an unknown or ill-typed field, contradictory settings, a broken config file, an unusable workdir,
sizes that cannot fit in memory) is ONE line on stderr with exit status 2, before anything is written.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys

from absl import flags
from ml_collections import config_flags

MODES = ("train", "eval", "construct")

# The command's own flags, apart from absl's global FLAGS: other entry points (the benchmark) define a
# --config flag too, and both may be imported in one process.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/baseconv.py:cpu",
                                          lock_config=True, flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>-<timestamp>).",
                               flag_values=FLAGS)
_MODE = flags.DEFINE_enum(
    "mode", "train", MODES,
    "train: train (resuming from --workdir), then evaluate; eval: evaluate the checkpoint of --workdir "
    "(its saved config defines the model; --config is not needed); construct: the hand-built exact-GD "
    "models (BaseConv, linear attention) through the same evaluation, for the task sizes of --config.",
    flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: the newest good one).",
                             flag_values=FLAGS)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ("off", "auto", "explicit"),
    "Multi-process JAX: off; auto (cloud TPU pods, SLURM); explicit (needs the three flags below).",
    flag_values=FLAGS)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed=explicit).",
                                   flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed=explicit).",
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (--distributed=explicit).",
                                   flag_values=FLAGS)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config differs from --config.", flag_values=FLAGS)


class BadInput(Exception):
    """Input that stops the run before any work: one line on stderr, exit status 2."""


def one_line(err: BaseException) -> str:
    """The gist of an exception on one line (ml_collections embeds whole tracebacks: keep their last line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if "Traceback" in str(err) else " ".join(lines)


def _config_spec(argv: list[str]) -> tuple[str, str | None] | None:
    """(path, variant or None) of the last --config=PATH[:VARIANT], or None."""
    specs = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    if not specs:
        return None
    path, colon, variant = specs[-1].partition(":")
    return path, (variant if colon else None)


def check_config_file(path: str, variant: str | None) -> None:
    """Load the config file and call its get_config as ml_collections will, so that a missing file, a
    syntax error, a missing get_config or one that raises is reported as such (not as a bad override)."""
    import importlib.util

    if not os.path.isfile(path):
        raise BadInput(f"--config: file {path!r} does not exist")
    try:
        spec = importlib.util.spec_from_file_location("lsq_jax_config_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise BadInput(f"--config: {path} line {err.lineno}: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 -- a config file runs arbitrary code
        raise BadInput(f"--config: {path} failed to load: {type(err).__name__}: {one_line(err)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise BadInput(f"--config: {path} has no get_config() function")
    try:
        module.get_config(*([] if variant is None else [variant]))
    except ValueError as err:  # the file's own validation, e.g. an unknown variant
        raise BadInput(f"--config: {path}: {one_line(err)}") from None
    except Exception as err:  # noqa: BLE001
        raise BadInput(f"--config: {path}: get_config raised {type(err).__name__}: {one_line(err)}") from None


def _unknown_field(argv: list[str], key: str) -> str:
    for arg in argv:
        if arg.startswith("--config.") and key in arg.split("=", 1)[0].split("."):
            return f"{arg.split('=', 1)[0]}: the config has no field {key!r}"
    return f"the config has no field {key!r}"


def parse_flags(argv: list[str]) -> None:
    """absl's parser (which loads the config file and applies the overrides); every failure is BadInput."""
    spec = _config_spec(argv)
    if spec is not None:
        check_config_file(*spec)
    FLAGS.unparse_flags()  # a second parse in one process (tests): forget the last one's overrides
    for name in [name for name in FLAGS if name.startswith("config.")]:
        delattr(FLAGS, name)
    saved_argv, sys.argv = sys.argv, list(argv)  # ml_collections reads the overrides from sys.argv
    try:
        rest = FLAGS(argv)
    except (AttributeError, KeyError) as err:
        raise BadInput(_unknown_field(argv, str(err.args[0]).strip("'\"") if err.args else "")) from None
    except (flags.Error, OSError, TypeError, ValueError) as err:
        raise BadInput(one_line(err)) from None
    finally:
        sys.argv = saved_argv
    if len(rest) > 1:
        raise BadInput(f"unexpected positional arguments: {' '.join(rest[1:])}")
    if _MODE.value == "eval" and _WORKDIR.value is None:
        raise BadInput("--mode=eval needs --workdir (a training workdir with checkpoints)")
    if _MODE.value != "eval" and _CONFIG.value is None:
        raise BadInput("--config is required, e.g. --config=configs/baseconv.py:cpu")


def default_workdir(name: str) -> str:
    return f"runs/{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def execute(log=print) -> None:
    """The parsed command: set up JAX, then one call per mode."""
    import jax
    from absl import logging

    from lsq_jax import checkpointing, parallel, train
    from lsq_jax.experiment import experiment_from_config, matmul_precision_of

    logging.set_verbosity(logging.ERROR)  # Orbax reports every save (INFO) and read-only opens (WARNING)
    jax.config.update("jax_enable_x64", True)
    mode = _MODE.value
    config = _CONFIG.value
    try:
        jax.config.update("jax_default_matmul_precision", matmul_precision_of(config))
    except ValueError as err:
        raise BadInput(one_line(err)) from None
    try:
        parallel.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
        experiment = experiment_from_config(config) if mode != "eval" else None
    except ValueError as err:
        raise BadInput(one_line(err)) from None

    def main_log(line):
        if jax.process_index() == 0:
            log(line)

    checkpointing.raise_on_sigterm()
    suffix = "-construct" if mode == "construct" else ""
    workdir = checkpointing.resolve_workdir(_WORKDIR.value or default_workdir(experiment.name + suffix))
    if workdir.exists() and not workdir.is_dir():
        raise BadInput(f"--workdir: {workdir} exists and is not a directory")
    main_log(f"workdir: {workdir}")
    if mode == "train":
        train.train_and_evaluate(experiment, workdir, log=main_log, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    elif mode == "eval":
        train.evaluate_checkpoint(workdir, _STEP.value, log=main_log)
    else:
        checkpointing.check_writable(workdir / "eval")
        train.write_evaluation(experiment, None, workdir, log=main_log, constructions=True)


def run(argv: list[str], log=print) -> int:
    """The whole command in this process; returns the exit status (2 and one stderr line for bad input)."""
    from lsq_jax.checkpointing import CheckpointError, Preempted, WorkdirError
    from lsq_jax.experiment import UsageError

    if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help())
        return 0
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        parse_flags(argv)
        execute(log)
    except (BadInput, CheckpointError, UsageError, WorkdirError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except Preempted:
        log("preempted (SIGTERM) outside the training steps; run the same command to resume")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv))
