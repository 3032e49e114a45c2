"""A workdir's checkpoints (the only module that imports Orbax): save (a full disk as one line), retain,
restore with fallback, Orbax's multi-process preemption point. The workdir itself is lsq_jax.workdir's.

A checkpoint holds the whole training state (parameters, optimizer state with the EMA, the LR controller
and the skip counter, and the step) plus the resolved configuration as JSON. Layout:
<workdir>/checkpoints/<step>/{state,config}. Saves are asynchronous; `close()` waits for them. A newest
checkpoint that cannot be restored while training resumes is moved to <workdir>/unrestorable/<step>-<time>
(kept for inspection), so that training can save that step again. The caller hands the restore target (the
abstract state, or for evaluation the abstract parameters alone): this module knows no model or optimizer.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from lsq_jax.config.check import one_line
from lsq_jax.config.experiment import Experiment, experiment_from_dict
from lsq_jax.workdir import FULL_DISK, WorkdirError, is_writer, os_error_line

_POLICIES = ocp.checkpoint_managers


def _not_from_orbax(record: logging.LogRecord) -> bool:
    """Orbax logs a failed background save from each of its threads, with tracebacks: the failure reaches
    the user once, as this module's WorkdirError (or the exception of the next save)."""
    return "orbax" not in record.pathname


def _closed_loop_error(value: BaseException | None) -> bool:
    """After a save or a restore failed, the storage callbacks of Orbax's other reads and writes find their
    event loop closed, and each prints that traceback (as an unraisable exception, or through excepthook):
    the failure reaches the user once, as this module's error."""
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _quiet_excepthook(excepthook):
    def hook(kind, value, tb):
        if not _closed_loop_error(value):
            excepthook(kind, value, tb)
    hook.quiets_orbax = True
    return hook


def _quiet_unraisablehook(unraisablehook):
    def hook(unraisable):
        if not _closed_loop_error(unraisable.exc_value):
            unraisablehook(unraisable)
    hook.quiets_orbax = True
    return hook


def _not_never_retrieved(record: logging.LogRecord) -> bool:
    """asyncio's 'Task exception was never retrieved' of the reads a failed restore left behind."""
    return "never retrieved" not in record.getMessage()


def quiet_orbax_failures() -> None:
    """Keep a failed save or restore to this module's one error, process-wide: wrap sys.excepthook and
    sys.unraisablehook, and filter the absl and asyncio loggers (the filters above). The entry points call
    it before training; it stays for the process, since the callbacks it silences can still fire after the
    run (when their tasks are collected). Calling it again changes nothing."""
    if not getattr(sys.excepthook, "quiets_orbax", False):
        sys.excepthook = _quiet_excepthook(sys.excepthook)
    if not getattr(sys.unraisablehook, "quiets_orbax", False):
        sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)
    logging.getLogger("absl").addFilter(_not_from_orbax)  # a logger holds a filter once
    logging.getLogger("asyncio").addFilter(_not_never_retrieved)


class CheckpointError(Exception):
    """A workdir without a usable checkpoint, or a checkpoint that does not fit the model asked for."""


class Checkpointer:
    """Orbax CheckpointManager for one workdir.

    Args:
      workdir: local path or cloud URL (etils.epath).
      save_every: a save every this many steps (plus `force=True` saves at the end and on preemption).
      keep_latest: the newest checkpoints kept.
      keep_every: additionally keep every checkpoint whose step is a multiple of this (None: none).
      read_only: open for restoring only (evaluation).
    """

    def __init__(self, workdir, *, save_every: int = 1, keep_latest: int = 3, keep_every: int | None = None,
                 read_only: bool = False):
        self.directory = epath.Path(workdir) / "checkpoints"
        policies = [_POLICIES.LatestN(keep_latest)]
        if keep_every:
            policies.append(_POLICIES.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, read_only=read_only, create=not read_only,
            preservation_policy=_POLICIES.AnyPreservationPolicy(policies))
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))
        self._state_bytes = 0

    # -- saving --------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, config: dict, *, force: bool = False) -> bool:
        """Save (asynchronously) if `step` is due, or always with `force`, unless `step` is saved already
        (a preemption right after a regular save). Every process must call it."""
        try:
            if not self._manager.is_saving_in_progress():  # an earlier save that failed ends the run now
                self._manager.wait_until_finished()
            if step == self._manager.latest_step():
                return False
            self._state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
            return self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)), force=force)
        except Exception as err:  # noqa: BLE001 -- a failed asynchronous save surfaces here
            raise self._save_error(err) from None

    def wait(self) -> None:
        """Until every save in flight is written."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._save_error(err) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def _save_error(self, err: Exception) -> Exception:
        """WorkdirError for a save that cannot be written: on a full disk (or quota), naming the workdir, what
        a checkpoint needs and what is free; any other OSError (a read-only or vanished directory, a file in
        the way) naming the path and the reason. Other failures unchanged. The half-written checkpoint stays
        a temporary directory that restoring skips, so the previous checkpoints remain restorable."""
        text = str(err)
        if not (getattr(err, "errno", None) in FULL_DISK or "No space left" in text
                or "RESOURCE_EXHAUSTED" in text or "quota" in text.lower()):
            cause = next((e for e in _chain(err) if isinstance(e, OSError)), None)
            if cause is None:
                return err
            return WorkdirError(os_error_line(cause, cause.filename or self.directory, "cannot write the checkpoint "))
        mib = 2.0**20
        try:
            free = f"{shutil.disk_usage(os.fspath(self.directory)).free / mib:.1f} MiB free"
        except (OSError, TypeError, ValueError):
            free = "free space unknown"
        return WorkdirError(f"{self.directory.parent} is full: a checkpoint needs about "
                            f"{self._state_bytes / mib:.1f} MiB, {free}; free some space or use another --workdir "
                            "(the checkpoints already saved are intact)")

    # -- preemption ----------------------------------------------------------------------------------
    def preempted(self, step: int) -> bool:
        """Multi-process runs: whether Orbax's preemption sync point is reached at `step` (every process
        agrees on it; lsq_jax.preemption handles SIGTERM in a single process)."""
        try:
            return bool(self._manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 -- only available after jax.distributed.initialize
            return False

    # -- restoring -----------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def saved_config(self, step: int) -> dict:
        """The JSON configuration stored with `step`, as saved."""
        try:
            config = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as err:  # noqa: BLE001 -- Orbax raises many types for damaged or missing files
            raise CheckpointError(f"checkpoint {step} in {self.directory} has no readable config "
                                  f"({one_line(err, first=True)})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"checkpoint {step} in {self.directory} has no readable config (not a JSON object)")
        return config

    def restore(self, step: int, target: Any, *, partial: bool = False) -> Any:
        """The state at `step`, onto `target` (ShapeDtypeStructs with concrete shardings). With `partial`,
        only the fields `target` names (a dict, e.g. {"params": ...}): the rest of the state is not read.
        One Checkpointer restores either way, not both: Orbax binds the item's handler on first use."""
        if step not in self.steps():
            raise CheckpointError(f"step {step} is not in {self.directory}: available are {self.steps() or 'none'}")
        if partial:  # the restore arguments StandardRestore derives from the target: its shardings and dtypes
            args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                          partial_restore=True)
        else:
            args = ocp.args.StandardRestore(target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=args))
        except Exception as err:  # noqa: BLE001 -- Orbax raises many types for damaged or mismatched files
            raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be restored: "
                                  f"{one_line(err, first=True)}") from None
        return restored.state

    def restore_newest(self, target: Callable[[Experiment], Any], *, step: int | None = None, log=print,
                       set_aside: bool = False, partial: bool = False) -> tuple[int, Experiment, Any] | None:
        """(step, saved experiment, state) of checkpoint `step`, or of the newest one that restores.

        The config saved with a checkpoint is decoded once (`saved_experiment`: a damaged or unusable one
        makes the checkpoint unusable). `target(experiment)` gives the abstract state to restore onto
        (ShapeDtypeStructs with concrete shardings; with `partial` some of its fields, see `restore`); it
        raises CheckpointError for an experiment it cannot use, anything else (a config the caller
        refuses) propagates. Without `step` it falls back past unusable checkpoints, with a warning line for
        each once an earlier one has restored; with `set_aside` (training) the unusable ones are then moved
        to <workdir>/unrestorable/ so the run can save those steps again. None when there is no checkpoint
        at all; CheckpointError (nothing moved; one line, the newest's reason) when none restores.
        """
        steps = self.steps()
        if step is not None and step not in steps:
            raise CheckpointError(f"step {step} is not in {self.directory}: available are {steps or 'none'}")
        unusable: list[tuple[int, CheckpointError]] = []
        for s in [step] if step is not None else list(reversed(steps)):
            try:
                config = self.saved_config(s)
                try:
                    exp = saved_experiment(config)
                    abstract = target(exp)
                except CheckpointError as err:
                    raise CheckpointError(f"checkpoint {s} in {self.directory}: {err}") from None
                state = self.restore(s, abstract, partial=partial)
            except CheckpointError as err:
                if step is not None:
                    raise
                unusable.append((s, err))
                continue
            for bad, err in unusable:  # one line each, once an earlier one has restored
                log(f"warning: {err}; " + (f"moved it to {self._set_aside(bad)}" if set_aside
                                           else f"using the earlier checkpoint {s}"))
            return s, exp, state
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be restored; the newest: "
                                  f"{unusable[0][1]}")
        return None

    def _set_aside(self, step: int) -> epath.Path:
        """Move checkpoint `step` to <workdir>/unrestorable/<step>-<time> and forget it."""
        destination = self.directory.parent / "unrestorable" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if is_writer():
            destination.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.reload()
        return destination


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and the exceptions it was raised from or during."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def abstract_like(state: Any, sharding) -> Any:
    """ShapeDtypeStructs of `state` with a concrete sharding, as Orbax's restore target."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def saved_experiment(saved: dict) -> Experiment:
    """The experiment of a checkpoint's saved config; CheckpointError when it is not one."""
    try:
        return experiment_from_dict(saved)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"a checkpoint's saved config is unusable ({err})") from None


def restore_params(workdir, step: int | None, params_shape: Callable[[Experiment], Any], sharding, *,
                   log=print) -> tuple[Experiment, int, Any]:
    """(experiment, step, parameters) of a workdir's checkpoint: `step`, or the newest good one (falling
    back past unusable ones with a warning). The experiment is the config saved WITH the checkpoint, so
    the model cannot silently differ from what was trained; `params_shape(experiment)` gives the abstract
    parameters, placed with `sharding`. Only the parameters are read (the saved state's step equals the
    checkpoint's)."""
    if not (workdir / "checkpoints").exists():
        raise CheckpointError(f"{workdir} holds no checkpoints (is it a training workdir?)")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        restored = ckpt.restore_newest(lambda exp: {"params": abstract_like(params_shape(exp), sharding)},
                                       step=step, log=log, partial=True)
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{workdir} holds no checkpoints")
    found, exp, state = restored
    return exp, found, state["params"]


