"""The training run: its sizes checked against the devices, resume or start, the loop over steps with its
checkpoints, metrics and progress lines, and the test metrics at the end. Evaluation reports are not
train's: the caller (lsq_jax.main) makes them from the final parameters."""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax import preemption
from lsq_jax.checkpoint import Checkpointer, abstract_like
from lsq_jax.config.check import ConfigError
from lsq_jax.config.experiment import RESUMABLE_CHANGES, Experiment, config_differences, experiment_to_dict
from lsq_jax.mesh import replicated
from lsq_jax.plan.run import RunPlan
from lsq_jax.train.log import MetricsWriter, Progress
from lsq_jax.train.state import TrainState, init_state, place_state
from lsq_jax.train.step import Steps, advance, evaluate_loss
from lsq_jax.workdir import Workdir

ALWAYS_LOGGED = ("loss", "grad_norm", "learning_rate", "damping", "skipped_steps")  # logged even when NaN


class Trained(NamedTuple):
    """How a run ended: its final state, the test metrics at the end (None when preempted), and whether it
    stopped for a preemption (then it saved its last step; running the same command resumes)."""

    state: TrainState
    test_metrics: dict[str, float] | None
    preempted: bool


def resume_or_init(plan: RunPlan, ckpt: Checkpointer, *, allow_config_change: bool, log) -> TrainState:
    """The newest good checkpoint of the workdir (refusing one of a different configuration; moving one
    that cannot be restored out of the way), or a new state. The initial state is traced once: its shapes
    are the restore target, and its compiled form draws a new state."""
    exp = plan.exp
    initial = jax.jit(lambda: init_state(plan)).trace()
    abstract = abstract_like(initial.out_info, replicated(plan.mesh))

    def target(saved: Experiment):
        # compared as decoded: fields added since the checkpoint was saved hold their defaults
        changed = [f for f in config_differences(experiment_to_dict(saved), experiment_to_dict(exp))
                   if f not in RESUMABLE_CHANGES]
        if changed and not allow_config_change:
            raise ConfigError(f"the workdir holds a run with a different config (fields: {', '.join(changed)}); "
                             "use another --workdir, or --allow_config_change to resume anyway")
        return abstract

    restored = ckpt.restore_newest(target, log=log, set_aside=True)
    if restored is None:
        return place_state(initial.lower().compile()(), plan.mesh)
    step, _, state = restored
    log(f"resumed from step {step}")
    return state


def train(plan: RunPlan, workdir: Workdir, *, log=print, allow_config_change: bool = False) -> Trained:
    """Train to exp.train.num_steps iterations (resuming from the workdir's checkpoints), then measure the
    test metrics. The caller has planned the run (lsq_jax.plan.run.make_plan) and holds the workdir
    (Workdir.claimed). `log` gets the progress lines (main passes workdir.log(print)).

    Writes <workdir>/config.json, <workdir>/metrics.jsonl (process 0) and checkpoints every
    checkpoint_every steps and at the end. On SIGTERM while steps are unsaved (or at Orbax's preemption
    point in a multi-process run) it saves at the next step and returns with `preempted` true; on SIGTERM
    with nothing unsaved, lsq_jax.preemption.Preempted propagates.
    """
    exp = plan.exp
    ckpt = Checkpointer(workdir.path, save_every=exp.train.checkpoint_every)
    writer = MetricsWriter(workdir)
    try:
        state = resume_or_init(plan, ckpt, allow_config_change=allow_config_change, log=log)
        config = experiment_to_dict(exp)
        workdir.write(workdir / "config.json", json.dumps(config, indent=2) + "\n")
        steps = Steps(plan)
        with preemption.on_exit(ckpt.wait):

            def preempted(step: int) -> bool:
                return preemption.requested() or ckpt.preempted(step)

            if int(state.step) == 0 and exp.optim.lm_restarts > 1:
                state = best_start(steps, state, writer, log, preempted)
                if state is None:
                    log("preempted during the restarts, before any checkpoint; run the same command to start again")
                    return Trained(init_state(plan), None, True)
                ckpt.save(int(state.step), state, config, force=True)
            state, stopped = _train_loop(steps, state, ckpt, config, writer, log, preempted)
        if stopped:
            log(preemption.saved_line(int(state.step)))
            return Trained(state, None, True)
    finally:
        ckpt.close()
    metrics = {k: float(v) for k, v in jax.jit(lambda p: evaluate_loss(p, plan))(state.params).items()}
    writer.write(exp.train.num_steps, {f"eval_{k}": v for k, v in metrics.items()})
    log("eval | " + " | ".join(f"{k} {v:.3e}" for k, v in metrics.items()))
    return Trained(state, metrics, False)


@contextlib.contextmanager
def training(plan: RunPlan, workdir: Workdir, *, log=print, allow_config_change: bool = False) -> Iterator[Trained]:
    """The whole run of `plan` (lsq_jax.plan.run.make_plan, which refuses a run that does not fit before
    anything is written), as `with training(...) as trained:`: the workdir claimed
    (Workdir.claimed), `train`; the workdir stays held until the block ends, so that what the
    caller does with the final state (the report) is part of the run."""
    with workdir.claimed(log):
        yield train(plan, workdir, log=log, allow_config_change=allow_config_change)


def drive(steps: Steps, state: TrainState, stop: int,
          after_step: Callable[[int, TrainState, dict], bool]) -> tuple[TrainState, bool]:
    """The training iterations from state.step to `stop`, each in the jitted functions of its phase
    (`steps`); `after_step(step, new state, metrics)` runs after each and returns True to stop there.
    Steps are dispatched without waiting for the previous one, except where the plan says it must wait
    (RunPlan.waits_each_step). Returns (the last state, whether `after_step` stopped the run)."""
    for step in range(int(state.step), stop):
        state, metrics = advance(steps.at(step, state), state, step)
        if steps.plan.waits_each_step:
            state = jax.block_until_ready(state)
        if after_step(step, state, metrics):
            return state, True
    return state, False


def best_start(steps: Steps, state: TrainState, writer, log, preempted) -> TrainState | None:
    """optim.lm_restarts starts (`state`, the run's own initialisation, then init_state(plan, k) for k >= 1),
    each trained optim.lm_restart_steps iterations; the one whose LM training loss is then the lowest (a
    non-finite loss never wins) goes on. None when `preempted(step)` turns true meanwhile: nothing is saved
    before the choice, so the run starts over, choosing the same start."""
    exp = steps.plan.exp
    n = min(exp.optim.lm_restart_steps, exp.train.num_steps)
    best, best_loss, losses = None, math.inf, []
    for k in range(exp.optim.lm_restarts):
        s = state if k == 0 else place_state(jax.jit(lambda k=k: init_state(steps.plan, k))(), steps.plan.mesh)
        s, stopped = drive(steps, s, n, lambda step, *_: preempted(step + 1))
        if stopped:
            return None
        losses.append(float(steps.at(n).lm_loss(s)))
        log(f"start {k}: LM training loss {losses[-1]:.3e} after {n} iterations")
        loss = losses[-1] if math.isfinite(losses[-1]) else math.inf
        if best is None or loss < best_loss:
            best, best_loss = (k, s), loss
    writer.write(n, {"restart_losses": losses, "restart_chosen": best[0]})
    log(f"start {best[0]} goes on")
    return best[1]


def _train_loop(steps, state, ckpt, config, writer, log, preempted):
    """Steps from state.step to num_steps with their checkpoints and measurements; (final state, whether
    it stopped for preemption). It tells lsq_jax.preemption whether it holds work that is not saved yet:
    steps past the last checkpoint, or a measurement not yet written."""
    num_steps, every = steps.plan.exp.train.num_steps, steps.plan.exp.train.log_every
    progress = Progress(int(state.step), num_steps)
    pending = None  # (step, metrics, whether metrics.jsonl gets them) of the last step to report, read
    # after the next dispatch: every log_every steps, and a progress line alone every PROGRESS_EVERY_S
    saved = int(state.step)  # the state at the start is restored or drawn again the same by a rerun

    def report():
        nonlocal pending
        if pending is not None:
            _report(writer, progress, log, *pending)
            pending = None

    def after_step(step, state, metrics):
        nonlocal pending, saved
        preemption.unsaved(True)
        report()
        if step % every == 0 or step == num_steps - 1:
            pending = (step, metrics, True)
        elif progress.due():
            pending = (step, metrics, False)
        if ckpt.save(step + 1, state, config, force=step + 1 == num_steps):
            saved = step + 1
        if preempted(step + 1):
            ckpt.save(step + 1, state, config, force=True)  # a no-op when step + 1 was just saved
            report()
            return True
        preemption.unsaved(saved != step + 1 or (pending is not None and pending[2]))
        return False

    state, stopped = drive(steps, state, num_steps, after_step)
    report()
    preemption.unsaved(False)
    return state, stopped


def _report(writer, progress, log, step, metrics, record: bool):
    """Print a measurement, and write it when `record`; other NaN scalars mean "not measured at this step"
    and are dropped."""
    metrics = jax.device_get(metrics)
    metrics = {k: v for k, v in metrics.items()
               if k in ALWAYS_LOGGED or not (jnp.ndim(v) == 0 and math.isnan(float(v)))}
    if record:
        writer.write(step, metrics)
    log(progress.line(step, metrics))
