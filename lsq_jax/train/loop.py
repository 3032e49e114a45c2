"""The training run: its sizes checked against the devices, resume or start, the loop over steps with its
checkpoints, metrics and progress lines, and the test metrics at the end. Evaluation reports are not
train's: the caller (lsq_jax.main) makes them from the final parameters."""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax import preemption
from lsq_jax.checkpoint import Checkpointer, abstract_like, saved_experiment
from lsq_jax.config.check import ConfigError
from lsq_jax.config.experiment import RESUMABLE_CHANGES, Experiment, config_differences, experiment_to_dict
from lsq_jax.mesh import batch_sharded, check_batch_size, make_mesh, replicated
from lsq_jax.train.log import MetricsWriter, Progress
from lsq_jax.train.memory import check_memory, lm_chunks, microbatches
from lsq_jax.train.state import TrainState, count_params, init_state, place_state, uses_lm
from lsq_jax.train.step import StepFns, advance, evaluate_loss, in_lm_phase, make_step_fns, sizes_at
from lsq_jax.workdir import claimed

ALWAYS_LOGGED = ("loss", "grad_norm", "learning_rate", "damping", "skipped_steps")  # logged even when NaN


class Trained(NamedTuple):
    """How a run ended: its final state, the test metrics at the end (None when preempted), and whether it
    stopped for a preemption (then it saved its last step; running the same command resumes)."""

    state: TrainState
    test_metrics: dict[str, float] | None
    preempted: bool


def checked_mesh(exp: Experiment):
    """The mesh over every device, once the run's sizes are known to fit it; ConfigError, before anything is
    written, for a batch that does not split over the devices, a microbatch size or LM chunk that does not
    divide a device's share, or a run whose memory estimate exceeds a device."""
    mesh = make_mesh()
    try:
        check_batch_size("train.batch_size", exp.train.batch_size, mesh)
        check_batch_size("train.eval_batch_size", exp.train.eval_batch_size, mesh)
        microbatches(exp, exp.task.n_points, mesh.devices.size)  # an explicit size must divide the device share
        check_memory(exp, mesh)
        if uses_lm(exp):
            lm_chunks(exp, count_params(exp), mesh.devices.size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return mesh


def resume_or_init(exp: Experiment, ckpt: Checkpointer, mesh, *, allow_config_change: bool, log) -> TrainState:
    """The newest good checkpoint of the workdir (refusing one of a different configuration; moving one
    that cannot be restored out of the way), or a new state."""
    abstract = abstract_like(jax.eval_shape(lambda: init_state(exp)), replicated(mesh))

    def target(saved: dict):
        saved = experiment_to_dict(saved_experiment(saved))  # fields added since it was saved: defaults
        changed = [f for f in config_differences(saved, experiment_to_dict(exp)) if f not in RESUMABLE_CHANGES]
        if changed and not allow_config_change:
            raise ConfigError(f"the workdir holds a run with a different config (fields: {', '.join(changed)}); "
                             "use another --workdir, or --allow_config_change to resume anyway")
        return abstract

    restored = ckpt.restore_newest(target, log=log, set_aside=True)
    if restored is None:
        return place_state(jax.jit(lambda: init_state(exp))(), mesh)
    step, _, state = restored
    log(f"resumed from step {step}")
    return state


def train(exp: Experiment, workdir, mesh, *, log=print, allow_config_change: bool = False) -> Trained:
    """Train to exp.train.num_steps iterations (resuming from the workdir's checkpoints), then measure the
    test metrics. The caller has checked the sizes (`checked_mesh`) and holds the workdir
    (lsq_jax.workdir.claimed).

    Writes <workdir>/config.json, <workdir>/metrics.jsonl (process 0) and checkpoints every
    checkpoint_every steps and at the end. On SIGTERM while steps are unsaved (or at Orbax's preemption
    point in a multi-process run) it saves at the next step and returns with `preempted` true; on SIGTERM
    with nothing unsaved, lsq_jax.preemption.Preempted propagates.
    """
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(workdir, save_every=exp.train.checkpoint_every)
    try:
        state = resume_or_init(exp, ckpt, mesh, allow_config_change=allow_config_change, log=log)
        config = experiment_to_dict(exp)
        if is_main:
            (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        writer, main_log = MetricsWriter(workdir / "metrics.jsonl", is_main), log if is_main else (lambda line: None)
        fns: dict[tuple, StepFns] = {}
        with preemption.on_exit(ckpt.wait):

            def preempted(step: int) -> bool:
                return preemption.requested() or ckpt.preempted(step)

            if int(state.step) == 0 and exp.optim.lm_restarts > 1:
                state = best_start(exp, state, mesh, fns, writer, main_log, preempted)
                if state is None:
                    log("preempted during the restarts, before any checkpoint; run the same command to start again")
                    return Trained(init_state(exp), None, True)
                ckpt.save(int(state.step), state, config, force=True)
            state, stopped = _train_loop(exp, state, mesh, ckpt, config, writer, main_log, fns, preempted)
        if stopped:
            log(f"preempted: saved step {int(state.step)}; run the same command to resume")
            return Trained(state, None, True)
    finally:
        ckpt.close()
    metrics = {k: float(v) for k, v in jax.jit(
        lambda p: evaluate_loss(p, exp, sharding=batch_sharded(mesh)))(state.params).items()}
    MetricsWriter(workdir / "metrics.jsonl", is_main).write(exp.train.num_steps,
                                                            {f"eval_{k}": v for k, v in metrics.items()})
    if is_main:
        log("eval | " + " | ".join(f"{k} {v:.3e}" for k, v in metrics.items()))
    return Trained(state, metrics, False)


@contextlib.contextmanager
def training(exp: Experiment, workdir, *, log=print, allow_config_change: bool = False) -> Iterator[Trained]:
    """The whole run, as `with training(...) as trained:`: the sizes checked before anything is written
    (`checked_mesh`), the workdir claimed (lsq_jax.workdir.claimed), `train`; the workdir stays held
    until the block ends, so that what the caller does with the final state (the report) is part of the run."""
    mesh = checked_mesh(exp)
    with claimed(workdir, log):
        yield train(exp, workdir, mesh, log=log, allow_config_change=allow_config_change)


def _step_fns(fns: dict, exp: Experiment, mesh, step: int) -> StepFns:
    """The jitted functions of iteration `step`, compiled once per curriculum size and phase."""
    key = (*sizes_at(exp, step), in_lm_phase(exp, step))
    if key not in fns:
        fns[key] = make_step_fns(exp, mesh, *key)
    return fns[key]


def best_start(exp: Experiment, state: TrainState, mesh, fns: dict, writer, log, preempted) -> TrainState | None:
    """optim.lm_restarts starts (`state`, the run's own initialisation, then init_state(exp, k) for k >= 1),
    each trained optim.lm_restart_steps iterations; the one whose LM training loss is then the lowest (a
    non-finite loss never wins) goes on. None when `preempted(step)` turns true meanwhile: nothing is saved
    before the choice, so the run starts over, choosing the same start."""
    n = min(exp.optim.lm_restart_steps, exp.train.num_steps)
    best, best_loss, losses = None, math.inf, []
    for k in range(exp.optim.lm_restarts):
        s = state if k == 0 else place_state(jax.jit(lambda k=k: init_state(exp, k))(), mesh)
        for step in range(n):
            s = advance(_step_fns(fns, exp, mesh, step), s, step)[0]
            if preempted(step + 1):
                return None
        losses.append(float(_step_fns(fns, exp, mesh, n).lm_loss(s)))
        log(f"start {k}: LM training loss {losses[-1]:.3e} after {n} iterations")
        loss = losses[-1] if math.isfinite(losses[-1]) else math.inf
        if best is None or loss < best_loss:
            best, best_loss = (k, s), loss
    writer.write(n, {"restart_losses": losses, "restart_chosen": best[0]})
    log(f"start {best[0]} goes on")
    return best[1]


def _train_loop(exp, state, mesh, ckpt, config, writer, log, fns, preempted):
    """Steps from state.step to num_steps; (final state, whether it stopped for preemption). It tells
    lsq_jax.preemption whether it holds work that is not saved yet: steps past the last checkpoint, or a
    measurement not yet written."""
    start, num_steps, every = int(state.step), exp.train.num_steps, exp.train.log_every
    progress = Progress(start, num_steps)
    pending = None  # (step, metrics) of the last measurement step, read after the next dispatch
    saved = start  # the state at `start` is restored or drawn again the same by a rerun
    for step in range(start, num_steps):
        state, metrics = advance(_step_fns(fns, exp, mesh, step), state, step)
        preemption.unsaved(True)
        if pending is not None:
            _report(writer, progress, log, *pending)
            pending = None
        if step % every == 0 or step == num_steps - 1:
            pending = (step, metrics)
        if ckpt.save(step + 1, state, config, force=step + 1 == num_steps):
            saved = step + 1
        if preempted(step + 1):
            ckpt.save(step + 1, state, config, force=True)  # a no-op when step + 1 was just saved
            if pending is not None:
                _report(writer, progress, log, *pending)
            return state, True
        preemption.unsaved(saved != step + 1 or pending is not None)
    if pending is not None:
        _report(writer, progress, log, *pending)
    preemption.unsaved(False)
    return state, False


def _report(writer, progress, log, step, metrics):
    """Write and print a measurement; other NaN scalars mean "not measured at this step" and are dropped."""
    metrics = jax.device_get(metrics)
    metrics = {k: v for k, v in metrics.items()
               if k in ALWAYS_LOGGED or not (jnp.ndim(v) == 0 and math.isnan(float(v)))}
    writer.write(step, metrics)
    log(progress.line(step, metrics))
