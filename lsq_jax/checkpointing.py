"""Checkpoints (the only module that imports Orbax): save, retain, restore, preemption.

A checkpoint holds the whole TrainState (parameters, optimizer state with the EMA, the LR controller and
the skip counter, and the step) plus the resolved configuration as JSON. Layout:
<workdir>/checkpoints/<step>/{state,config}. Saves are asynchronous; `close()` waits for them.
"""
from __future__ import annotations

import json
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

_POLICIES = ocp.checkpoint_managers


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
        self._sigterm = False
        self._previous_handler = None

    # -- saving --------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, config: dict, *, force: bool = False) -> bool:
        """Save (asynchronously) if `step` is due, or always with `force`. Every process must call it."""
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)

    # -- preemption ----------------------------------------------------------------------------------
    def watch_preemption(self) -> None:
        """After this, SIGTERM (a preemption notice) makes `preempted(step)` true instead of killing.

        Single-process runs only: in a multi-process run JAX's own preemption notifier (started by
        jax.distributed.initialize) must see the signal, so that every process agrees on the step at which
        to stop; a Python handler here would make the signalled process stop alone and hang the others.
        """
        if jax.process_count() > 1:
            return

        def handler(signum, frame):
            del signum, frame
            self._sigterm = True

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def preempted(self, step: int) -> bool:
        """True once a SIGTERM arrived, or (multi-process runs) Orbax's preemption sync point is reached."""
        if self._sigterm:
            return True
        try:
            return bool(self._manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 -- only available after jax.distributed.initialize
            return False

    # -- restoring -----------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def saved_config(self, step: int) -> dict:
        """The JSON configuration stored with `step`."""
        try:
            path = self.directory / str(step) / "config" / "metadata"
            return json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {step} in {self.directory} has no readable config ({err})") from None

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state at `step`, onto `abstract_state` (ShapeDtypeStructs with concrete shardings)."""
        if step not in self.steps():
            raise CheckpointError(f"step {step} is not in {self.directory}: available are {self.steps() or 'none'}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except Exception as err:  # noqa: BLE001 -- Orbax raises many types for damaged or mismatched files
            raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be restored: "
                                  f"{_first_line(err)}") from None
        return restored.state

    def restore_latest(self, abstract_state: Any, log=print) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, falling back past damaged ones; None if
        there is no checkpoint at all."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                return step, self.restore(step, abstract_state)
            except CheckpointError as err:
                log(f"warning: {err}; trying an earlier checkpoint")
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be restored")
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def abstract_like(state: Any, sharding) -> Any:
    """ShapeDtypeStructs of `state` with a concrete sharding, as Orbax's restore target."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
