"""The command's flags (FLAGS), loading the config file and parsing them; every failure is ConfigError, one line.

`load_config_file` runs the file's get_config as ml_collections will, so that a missing file, a syntax
error, a missing get_config or one that raises is reported as such (not as a bad override); `parse_flags`
runs absl's parser, which loads the file and applies the --config.a.b=v overrides.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import sys

from absl import flags
from ml_collections import config_flags

from lsq_jax.config.check import ConfigError, one_line

# The command's own flags, apart from absl's global FLAGS: other entry points (the benchmark) define a
# --config flag too, and both may be imported in one process.
FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/baseconv.py:cpu", lock_config=True,
                                flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>-<timestamp>).",
                    flag_values=FLAGS)
flags.DEFINE_enum(
    "mode", "train", ("train", "eval", "construct"),
    "train: train (resuming from --workdir), then evaluate; eval: evaluate the checkpoint of --workdir "
    "(its saved config defines the model; --config is not needed); construct: the hand-built exact-GD "
    "models (BaseConv, linear attention) through the same evaluation, for the task sizes of --config.",
    flag_values=FLAGS)
flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: the newest good one).",
                     flag_values=FLAGS)
flags.DEFINE_bool("report", True, "--mode=train: the final report after training (test MSE, iterated use, "
                  "generality, plots in <workdir>/eval); --noreport trains only (evaluate later with --mode=eval).",
                  flag_values=FLAGS)
flags.DEFINE_enum(
    "distributed", "off", ("off", "auto", "explicit"),
    "Multi-process JAX: off; auto (cloud TPU pods, SLURM); explicit (needs the three flags below).",
    flag_values=FLAGS)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed=explicit).",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed=explicit).", flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "This process's index (--distributed=explicit).", flag_values=FLAGS)
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose saved config differs from --config.",
                  flag_values=FLAGS)


def config_spec(argv: list[str]) -> tuple[str, str | None] | None:
    """(path, variant or None) of the last --config=PATH[:VARIANT], or None."""
    specs = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    if not specs:
        return None
    path, colon, variant = specs[-1].partition(":")
    return path, (variant if colon else None)


def load_config_file(path: str, variant: str | None):
    """The ConfigDict of a config file's get_config(variant); ConfigError (one line) saying what is wrong."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("lsq_jax_config_check", path)
    if spec is None or spec.loader is None:  # a name Python does not load as source, e.g. no .py
        raise ConfigError(f"--config: {path} is not a Python file (a config file is FILE.py defining get_config)")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"--config: {path} line {err.lineno}: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 -- a config file runs arbitrary code
        raise ConfigError(f"--config: {path} failed to load: {type(err).__name__}: {one_line(err)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config: {path} has no get_config() function")
    try:
        return module.get_config(*([] if variant is None else [variant]))
    except ValueError as err:  # the file's own validation, e.g. an unknown variant
        raise ConfigError(f"--config: {path}: {one_line(err)}") from None
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"--config: {path}: get_config raised {type(err).__name__}: {one_line(err)}") from None


def _unknown_field(argv: list[str], key: str) -> str:
    for arg in argv:
        if arg.startswith("--config.") and key in arg.split("=", 1)[0].split("."):
            return f"{arg.split('=', 1)[0]}: the config has no field {key!r}"
    return f"the config has no field {key!r}"


def parse_config_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
    """absl's parser on `flag_values` (which define --config as a config file); every failure is
    ConfigError. A second parse in one process (tests) starts afresh."""
    spec = config_spec(argv)
    if spec is not None:
        load_config_file(*spec)
    flag_values.unparse_flags()  # forget the last parse's overrides
    for name in [name for name in flag_values if name.startswith("config.")]:
        delattr(flag_values, name)
    saved_argv, sys.argv = sys.argv, list(argv)  # ml_collections reads the overrides from sys.argv
    try:
        rest = flag_values(argv)
    except (AttributeError, KeyError) as err:
        raise ConfigError(_unknown_field(argv, str(err.args[0]).strip("'\"") if err.args else "")) from None
    except (flags.Error, OSError, TypeError, ValueError) as err:
        raise ConfigError(one_line(err)) from None
    finally:
        sys.argv = saved_argv
    if len(rest) > 1:
        raise ConfigError(f"unexpected positional arguments: {' '.join(rest[1:])}")


def parse_flags(argv: list[str]) -> None:
    """The command's flags (parse_config_flags on FLAGS) and their combinations; every failure is ConfigError."""
    parse_config_flags(FLAGS, argv)
    if FLAGS.workdir is not None and not FLAGS.workdir.strip():
        raise ConfigError(f"--workdir: got {FLAGS.workdir!r}; allowed a directory path (leave the flag out for "
                          "runs/<name>-<time>)")
    if FLAGS.mode == "eval" and FLAGS.workdir is None:
        raise ConfigError("--mode=eval needs --workdir (a training workdir with checkpoints)")
    if not FLAGS.report and FLAGS.mode != "train":
        raise ConfigError(f"--noreport: allowed with --mode=train only (--mode={FLAGS.mode} is a report)")
    if FLAGS.mode != "eval" and FLAGS.config is None:
        raise ConfigError("--config is required, e.g. --config=configs/baseconv.py:cpu")


def default_workdir(name: str, mode: str = "train") -> str:
    """runs/<name>-<timestamp> (runs/<name>-<mode>-<timestamp> for another --mode): the workdir when
    --workdir is not given, and where --mode=eval writes the report of a released checkpoint."""
    name += "" if mode == "train" else f"-{mode}"
    return f"runs/{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
