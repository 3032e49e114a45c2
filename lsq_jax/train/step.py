"""One training iteration as a pure jitted step: the batch, its gradient (accumulated over microbatches),
the recipe's update or a Levenberg-Marquardt iteration, and the gradient statistics.

The batch of step t is drawn INSIDE the step from fold_in(data_key, t) and each example's global index,
so it is bit-identical for any number of devices or processes and there is no loader state to save.
Parameters and optimizer state are replicated over the 'data' mesh and the per-example keys are
sharded along it, so each device draws and differentiates only its share; XLA sums the gradients.
"""
from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from lsq_jax.data.base import Task
from lsq_jax.data.samplers import example_keys
from lsq_jax.mesh import DATA_AXIS, replicated
from lsq_jax.models.backbone import SequenceModel
from lsq_jax.optim import grad_stats, lm, recipe
from lsq_jax.plan.run import Phase, RunPlan, scan_unroll
from lsq_jax.train.state import TrainState


def _placed(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def draw_batch(task: Task, key, step, batch_size: int, n_points: int, n_dims: int | None, sharding=None):
    """The global batch of `step`: one key per global example index, sharded before anything is drawn."""
    keys = _placed(example_keys(key, step, 0, batch_size), sharding)
    return task.sample(keys, n_points=n_points, n_dims_truncated=n_dims)


def accumulated_value_and_grad(fn, params, xs, n_chunks: int, sharding=None, unroll: int | None = None):
    """The mean over `n_chunks` chunks of xs of fn(params, chunk) -> (scalar, aux), and its gradient.

    One chunk at a time in a lax.scan, so only one chunk's activations are live (`unroll` of them when
    the scan is unrolled; None: `scan_unroll` of JAX's default backend). Chunk c holds the rows c,
    c + n_chunks, c + 2 n_chunks, ... of every leaf of xs: rows sharded over devices in contiguous blocks
    stay on their device (n_chunks must divide the per-device rows). Equal to value_and_grad of the mean
    over all rows when every chunk's value is a mean over its rows. With several devices the replicated
    accumulator is all-reduced once per chunk (a shard_map form with one reduction per step stalled
    emulated CPU devices in half the runs).
    """
    value_and_grad = jax.value_and_grad(fn, has_aux=True)
    if n_chunks == 1:
        return value_and_grad(params, xs)
    chunked = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(-1, n_chunks, *a.shape[1:]), 0, 1), xs)

    def add_chunk(total, chunk):
        out = value_and_grad(params, jax.tree.map(lambda a: _placed(a, sharding), chunk))
        return jax.tree.map(jnp.add, total, out), None

    shapes = jax.eval_shape(value_and_grad, params, jax.tree.map(lambda a: a[0], chunked))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    unroll = scan_unroll(jax.default_backend()) if unroll is None else unroll
    total, _ = jax.lax.scan(add_chunk, zeros, chunked, unroll=unroll)
    return jax.tree.map(lambda t: t / n_chunks, total)


def reads_last_only(task: Task, n_points: int) -> bool:
    """Whether the task compares the model output at the last position alone (then the model computes
    only that position in its last block: same numbers, less work)."""
    return tuple(task.target_positions(n_points)) == (task.seq_len(n_points) - 1,)


def predict(params, model: SequenceModel, task: Task, inputs, n_points: int):
    """The model output the task reads: every position, or only the last when that is all it reads."""
    return model.apply({"params": params}, inputs, last_only=reads_last_only(task, n_points))


def example_loss(params, keys, *, model: SequenceModel, task: Task, n_points: int, n_dims: int | None):
    """(training loss, per-position MSE) on the examples drawn from `keys` (one key per example): the task's
    `train_loss` (the MSE, or with task.train_loss='relative' the mean squared relative error)."""
    batch = task.sample(keys, n_points=n_points, n_dims_truncated=n_dims)
    pred = predict(params, model, task, batch.inputs, n_points)
    return task.train_loss(pred, batch.targets), task.per_position_loss(pred, batch.targets)


def batch_gradient(params, key, step, *, plan: RunPlan, phase: Phase):
    """((task loss, per-position loss), gradient) on the global batch drawn from `key` at `step`,
    accumulated over the plan's microbatches per device (the keys are sharded before anything is drawn).
    With a range of rows, the mean over the row counts' equal shares (plan.row_groups) of their values
    and gradients: the mean over every example of the batch."""
    parts = []
    for n_points, start, count in plan.row_groups(phase.n_points):
        keys = _placed(example_keys(key, step, start, count), plan.sharding)
        loss = functools.partial(example_loss, model=plan.model, task=plan.task, n_points=n_points,
                                 n_dims=phase.n_dims)
        parts.append(accumulated_value_and_grad(loss, params, keys, plan.microbatches[n_points], plan.sharding,
                                                plan.unroll))
    return parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: sum(xs) / len(xs), *parts)


def train_step(state: TrainState, grad_metric=None, *, plan: RunPlan, phase: Phase
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One iteration of the recipe: loss, gradient (accumulated over the plan's microbatches), update
    (in a hybrid run, optimizer 'lm', the hybrid's Adam phase: lsq_jax.optim.lm_transform).

    `grad_metric` is the adaptive LR's signal: the mean consecutive-gradient cosine that
    `measure_grad_stats` measured on this iteration's state, or NaN / None on iterations without a
    measurement (see `advance`).
    """
    l1 = plan.exp.optim.l1
    (loss, per_position), grads = batch_gradient(state.params, plan.keys["data"], state.step, plan=plan, phase=phase)
    if l1:  # + l1 * sum |p|, whose gradient is sign(p): 0 at p = 0 as torch's abs (JAX's abs gives 1)
        grads = jax.tree.map(lambda g, p: g + l1 * jnp.sign(p), grads, state.params)
    updates, opt_state = plan.optimizer().update(grads, state.opt_state, state.params, grad_metric=grad_metric)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "per_position_loss": per_position, "grad_norm": optax.tree.norm(grads),
               **recipe.optimizer_metrics(opt_state)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def lm_residuals(params, keys, *, model: SequenceModel, task: Task, n_points: int, n_dims: int | None):
    """(problems, K) residuals on the problems drawn from `keys`: model output minus target, divided per
    problem by sqrt(s_b) with task.train_loss='relative' (Task.train_residuals); their mean square is the
    training loss, `example_loss`'s."""
    batch = task.sample(keys, n_points=n_points, n_dims_truncated=n_dims)
    pred = predict(params, model, task, batch.inputs, n_points)
    return task.train_residuals(pred, batch.targets)


def lm_residual_fn(plan: RunPlan, phase: Phase):
    """(params, keys) -> the (problems, K) residuals LM fits, at the phase's curriculum size. With a range
    of rows the keys are lsq_jax.optim.lm.Groups, one array per row count (lm_keys), and the residuals of
    every row count are stacked (a row count whose keys are None adds none): each chunk of LM's Jacobian
    then holds problems of every size, each size compiled once and differentiated on its own."""
    groups = plan.row_groups(phase.n_points)
    by_rows = [functools.partial(lm_residuals, model=plan.model, task=plan.task, n_points=n_points,
                                 n_dims=phase.n_dims) for n_points, _, _ in groups]
    if len(groups) == 1:
        return by_rows[0]
    return lambda params, keys: jnp.concatenate([fn(params, k) for fn, k in zip(by_rows, keys) if k is not None])


def lm_keys(plan: RunPlan, step):
    """The per-problem keys of the batch LM fits at iteration `step` (a new batch every lm_refresh_every):
    one array, or with a range of rows lsq_jax.optim.lm.Groups of one array per row count."""
    o = plan.exp.optim
    index = (step - o.lm_after) // o.lm_refresh_every if o.lm_refresh_every else 0
    groups = plan.row_groups(plan.exp.task.n_points)
    keys = tuple(_placed(example_keys(plan.keys["lm"], index, start, count), plan.sharding)
                 for _, start, count in groups)
    return keys[0] if len(keys) == 1 else lm.Groups(keys)


def per_device(fn, plan: RunPlan):
    """fn(replicated, keys) run on each device of the plan's mesh with its own share of the keys (split along
    'data'): LM sums over its own problems and reduces across devices once per sum (lsq_jax.optim.lm,
    axis_name); what fn returns is replicated. Without the replication check: under it, differentiating the
    per-device residuals with respect to the replicated parameters would add a reduction across devices to
    every chunk's Jacobian, the reductions this layout saves."""
    return jax.shard_map(fn, mesh=plan.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(), check_vma=False)


def lm_loss(state: TrainState, *, plan: RunPlan, phase: Phase) -> jax.Array:
    """The loss LM's next iteration fits: the mean square of the residuals of its batch at state.params."""
    loss = lambda params, keys: lm.mean_squared_residual(lm_residual_fn(plan, phase), params, keys, plan.lm_chunks,
                                                         DATA_AXIS)
    return per_device(loss, plan)(state.params, lm_keys(plan, state.step))


def lm_step(state: TrainState, grad_metric=None, *, plan: RunPlan, phase: Phase
            ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Levenberg-Marquardt iteration (the hybrid's LM phase: lsq_jax.optim.lm_transform) on the
    residuals of train.batch_size problems.

    The problems are drawn from the run's 'lm' key and batch index (iteration - lm_after) // lm_refresh_every
    (0 throughout when lm_refresh_every is 0), sharded over the devices like the step's batch. Each device
    builds J^T J, J^T r and r.r of its own problems in the plan's chunks, and one reduction across devices
    adds them (`per_device`); the damped solves are then made from that same system (with Cholesky, the
    retries' factorisations spread over the devices). A rejected step leaves the parameters unchanged and
    counts as skipped.
    """
    del grad_metric

    def iterate(state, keys):
        return plan.optimizer(lm=True).update(None, state.opt_state, state.params, batch=keys,
                                              residual_fn=lm_residual_fn(plan, phase), n_chunks=plan.lm_chunks,
                                              axis_name=DATA_AXIS)

    updates, opt_state, m = per_device(iterate, plan)(state, lm_keys(plan, state.step))
    lm_state = opt_state["lm"]
    metrics = {"loss": m["loss"], "trial_loss": m["trial_loss"], "damping": m["damping"],
               "gain_ratio": m["gain_ratio"], "step_norm": m["step_norm"],
               "skipped_steps": lm_state.rejected, "lm_accepted": lm_state.accepted,
               **{name: m[name] for name in ("valley_loss", "valley_scale", "valley_damping", "cg_iterations")
                  if name in m}}
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state), metrics


def measure_grad_stats(state: TrainState, *, plan: RunPlan, phase: Phase) -> dict[str, jax.Array]:
    """The statistics (lsq_jax.optim.grad_stats) of the gradients of `grad_stats_batches` fresh mini-batches at
    state.params (the task loss, unclipped, without L1): one mini-batch at a time, each accumulated over
    microbatches like the step's (all at once would hold grad_stats_batches batches of activations)."""
    stats_key = plan.keys["stats"]

    def flat_gradient(i):
        _, grads = batch_gradient(state.params, jax.random.fold_in(stats_key, i), state.step, plan=plan,
                                  phase=phase)
        return ravel_pytree(grads)[0]

    return grad_stats.gradient_stats(jax.lax.map(flat_gradient, jnp.arange(plan.exp.train.grad_stats_batches)))


class StepFns(NamedTuple):
    """The jitted functions of one phase: the (donating) train step, the gradient statistics (None when
    grad_stats_batches = 0 or in the LM phase), the NaN "no measurement" metric, placed like the
    statistics' output (replicated) so that both kinds of iteration share one compiled step, the
    measurement interval, and in the LM phase the loss of LM's batch at a state (`lm_loss`; None
    otherwise)."""

    train: Any
    stats: Any
    no_metric: jax.Array
    log_every: int
    lm_loss: Any = None


def make_step_fns(plan: RunPlan, phase: Phase) -> StepFns:
    """The jitted step of one phase: the recipe's (with its gradient statistics), or LM's, built for the
    plan's backend."""
    exp = plan.exp
    # made by a computation, not device_put: a multi-process device_put checks the value is the same on
    # every process, and NaN != NaN
    no_metric = jax.jit(lambda: jnp.full((), jnp.nan, jnp.dtype(exp.task.dtype)),
                        out_shardings=replicated(plan.mesh))()
    sizes = dict(plan=plan, phase=phase)
    if phase.lm:
        return StepFns(train=jax.jit(functools.partial(lm_step, **sizes), donate_argnums=0), stats=None,
                       no_metric=no_metric, log_every=exp.train.log_every,
                       lm_loss=jax.jit(functools.partial(lm_loss, **sizes)))
    stats = jax.jit(functools.partial(measure_grad_stats, **sizes)) if exp.train.grad_stats_batches else None
    return StepFns(train=jax.jit(functools.partial(train_step, **sizes), donate_argnums=0), stats=stats,
                   no_metric=no_metric, log_every=exp.train.log_every)


class Steps:
    """The jitted functions of a run, built on first use for each phase the run reaches (a curriculum
    size, the recipe or LM). With `warm`, a new step is also run once on a copy of the state, so that its
    compilation is over before the caller's next measurement; `build_s` adds up the seconds spent
    building and warming."""

    def __init__(self, plan: RunPlan, *, warm: bool = False):
        self.plan, self._warm, self._fns, self.build_s = plan, warm, {}, 0.0

    def at(self, step: int, state: TrainState | None = None) -> StepFns:
        """The functions of iteration `step` (`state`: the state it starts from, for the warm-up)."""
        phase = self.plan.phase(step)
        if phase not in self._fns:
            started = time.perf_counter()
            self._fns[phase] = make_step_fns(self.plan, phase)
            if self._warm and state is not None:
                jax.block_until_ready(advance(self._fns[phase], jax.tree.map(jnp.copy, state), step))
            self.build_s += time.perf_counter() - started
        return self._fns[phase]


def advance(fns: StepFns, state: TrainState, step: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """Iteration `step` (a host int equal to state.step): on measurement steps (step % log_every == 0, as
    in the reference, before the update) the gradient statistics first, in their own jitted call, and
    their mean cosine fed to the step; otherwise the step with a NaN metric. Metrics include the
    statistics on measurement steps."""
    stats = fns.stats(state) if fns.stats is not None and step % fns.log_every == 0 else {}
    metric = stats.get("gradient_cosine_mean", fns.no_metric)
    state, metrics = fns.train(state, metric)
    return state, {**metrics, **stats}


def evaluate_loss(params, plan: RunPlan) -> dict[str, jax.Array]:
    """Test metrics of the task (MSE, and the primitives' relative errors) on fresh problems at full size."""
    exp = plan.exp
    batch = draw_batch(plan.task, plan.keys["eval"], 0, exp.train.eval_batch_size, exp.task.n_points, None,
                       plan.sharding)
    return plan.task.eval_metrics(plan.model.apply({"params": params}, batch.inputs), batch.targets)
