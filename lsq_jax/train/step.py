"""One training iteration as a pure jitted step: the batch, its gradient (accumulated over microbatches),
the recipe's update or a Levenberg-Marquardt iteration, and the gradient statistics.

The batch of step t is drawn INSIDE the step from fold_in(data_key, t) and each example's global index,
so it is bit-identical for any number of devices or processes and there is no loader state to save.
Parameters and optimizer state are replicated over the 'data' mesh and the per-example keys are
sharded along it, so each device draws and differentiates only its share; XLA sums the gradients.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from lsq_jax.config.experiment import Experiment
from lsq_jax.data.base import Task
from lsq_jax.data.keys import run_keys
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import curriculum_value, make_task
from lsq_jax.mesh import batch_sharded, replicated
from lsq_jax.models.backbone import SequenceModel
from lsq_jax.optim import grad_stats, lm, recipe
from lsq_jax.train.memory import lm_chunks, microbatches, scan_unroll
from lsq_jax.train.state import TrainState, count_params, uses_lm


def sizes_at(exp: Experiment, step: int) -> tuple[int, int | None]:
    """(n_points, n_dims_truncated or None) that the curriculum gives iteration `step` (host-side ints)."""
    n_points = curriculum_value(exp.points, step)
    n_dims = curriculum_value(exp.dims, step)
    return n_points, (None if n_dims == exp.task.n_dims else n_dims)


def in_lm_phase(exp: Experiment, step: int) -> bool:
    """Whether iteration `step` is a Levenberg-Marquardt one (optimizer 'lm', after its lm_after Adam steps)."""
    return uses_lm(exp) and step >= exp.optim.lm_after


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
    """(task loss, per-position loss) on the examples drawn from `keys` (one key per example)."""
    batch = task.sample(keys, n_points=n_points, n_dims_truncated=n_dims)
    pred = predict(params, model, task, batch.inputs, n_points)
    return task.loss(pred, batch.targets), task.per_position_loss(pred, batch.targets)


def batch_gradient(params, key, step, *, exp: Experiment, n_points: int, n_dims: int | None, sharding=None,
                   n_microbatches: int = 1, unroll: int | None = None):
    """((task loss, per-position loss), gradient) on the global batch drawn from `key` at `step`,
    accumulated over `n_microbatches` per device, `unroll` per scan iteration (the keys are sharded before
    anything is drawn)."""
    keys = _placed(example_keys(key, step, 0, exp.train.batch_size), sharding)
    loss = functools.partial(example_loss, model=SequenceModel(exp.model), task=make_task(exp.task),
                             n_points=n_points, n_dims=n_dims)
    return accumulated_value_and_grad(loss, params, keys, n_microbatches, sharding, unroll)


def train_step(state: TrainState, grad_metric=None, *, exp: Experiment, n_points: int, n_dims: int | None,
               sharding=None, n_microbatches: int = 1, unroll: int | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One training iteration: loss, gradient (accumulated over `n_microbatches` per device, `unroll` per
    scan iteration), recipe, update.

    `grad_metric` is the adaptive LR's signal: the mean consecutive-gradient cosine that
    `measure_grad_stats` measured on this iteration's state, or NaN / None on iterations without a
    measurement (see `advance`).
    """
    if uses_lm(exp):  # the Adam phase of a hybrid: the recipe on its own part of the state
        inner, metrics = train_step(state._replace(opt_state=state.opt_state["adam"]), grad_metric,
                                    exp=_as_adam(exp), n_points=n_points, n_dims=n_dims, sharding=sharding,
                                    n_microbatches=n_microbatches, unroll=unroll)
        return inner._replace(opt_state={**state.opt_state, "adam": inner.opt_state}), metrics
    tx = recipe.make_optimizer(exp.optim)
    (loss, per_position), grads = batch_gradient(state.params, run_keys(exp.seed)["data"], state.step, exp=exp,
                                                 n_points=n_points, n_dims=n_dims, sharding=sharding,
                                                 n_microbatches=n_microbatches, unroll=unroll)
    if exp.optim.l1:  # + l1 * sum |p|, whose gradient is sign(p): 0 at p = 0 as torch's abs (JAX's abs gives 1)
        grads = jax.tree.map(lambda g, p: g + exp.optim.l1 * jnp.sign(p), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_metric=grad_metric)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "per_position_loss": per_position, "grad_norm": optax.tree.norm(grads),
               **recipe.optimizer_metrics(opt_state)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _as_adam(exp: Experiment) -> Experiment:
    return dataclasses.replace(exp, optim=dataclasses.replace(exp.optim, optimizer="adam"))


def lm_residuals(params, keys, *, model: SequenceModel, task: Task, n_points: int, n_dims: int | None):
    """(problems, K) model output minus target on the problems drawn from `keys` (their mean square is the
    task loss)."""
    batch = task.sample(keys, n_points=n_points, n_dims_truncated=n_dims)
    pred = predict(params, model, task, batch.inputs, n_points)
    return (task.read(pred) - batch.targets).reshape(keys.shape[0], -1)


def lm_residual_fn(exp: Experiment, n_points: int, n_dims: int | None):
    """(params, keys) -> the (problems, K) residuals LM fits, at one curriculum size."""
    return functools.partial(lm_residuals, model=SequenceModel(exp.model), task=make_task(exp.task),
                             n_points=n_points, n_dims=n_dims)


def lm_keys(exp: Experiment, step, sharding=None):
    """The per-problem keys of the batch LM fits at iteration `step` (a new batch every lm_refresh_every)."""
    o = exp.optim
    index = (step - o.lm_after) // o.lm_refresh_every if o.lm_refresh_every else 0
    return _placed(example_keys(run_keys(exp.seed)["lm"], index, 0, exp.train.batch_size), sharding)


def lm_loss(state: TrainState, *, exp: Experiment, n_points: int, n_dims: int | None, sharding=None,
            n_chunks: int = 1) -> jax.Array:
    """The loss LM's next iteration fits: the mean square of the residuals of its batch at state.params."""
    return lm.mean_squared_residual(lm_residual_fn(exp, n_points, n_dims), state.params,
                                    lm_keys(exp, state.step, sharding), n_chunks)


def lm_step(state: TrainState, grad_metric=None, *, exp: Experiment, n_points: int, n_dims: int | None,
            sharding=None, n_chunks: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Levenberg-Marquardt iteration (lsq_jax.optim.lm) on the residuals of train.batch_size problems.

    The problems are drawn from the run's 'lm' key and batch index (iteration - lm_after) // lm_refresh_every
    (0 throughout when lm_refresh_every is 0), sharded over the devices like the step's batch; J^T J and
    J^T r are sums over problems that XLA all-reduces. A rejected step leaves the parameters unchanged
    and counts as skipped.
    """
    del grad_metric
    o = exp.optim
    keys = lm_keys(exp, state.step, sharding)
    residuals = lm_residual_fn(exp, n_points, n_dims)
    damping = dict(scaling=o.lm_scaling, rule=o.lm_rule)
    if o.lm_solver == "cg":
        params, lm_state, m = lm.lm_update_cg(residuals, state.params, keys, state.opt_state["lm"], n_chunks,
                                              maxiter=o.lm_cg_iters, **damping)
    else:
        params, lm_state, m = lm.lm_update(residuals, state.params, keys, state.opt_state["lm"], n_chunks,
                                           geodesic=o.lm_geodesic, max_tries=o.lm_tries, **damping)
    metrics = {"loss": m["loss"], "trial_loss": m["trial_loss"], "damping": m["damping"],
               "gain_ratio": m["gain_ratio"], "step_norm": m["step_norm"],
               "skipped_steps": lm_state.rejected, "lm_accepted": lm_state.accepted}
    return TrainState(step=state.step + 1, params=params, opt_state={**state.opt_state, "lm": lm_state}), metrics


def measure_grad_stats(state: TrainState, *, exp: Experiment, n_points: int, n_dims: int | None,
                        sharding=None, n_microbatches: int = 1, unroll: int | None = None
                        ) -> dict[str, jax.Array]:
    """The statistics (lsq_jax.optim.grad_stats) of the gradients of `grad_stats_batches` fresh mini-batches at
    state.params (the task loss, unclipped, without L1): one mini-batch at a time, each accumulated over
    microbatches like the step's (all at once would hold grad_stats_batches batches of activations)."""
    stats_key = run_keys(exp.seed)["stats"]

    def flat_gradient(i):
        _, grads = batch_gradient(state.params, jax.random.fold_in(stats_key, i), state.step, exp=exp,
                                  n_points=n_points, n_dims=n_dims, sharding=sharding,
                                  n_microbatches=n_microbatches, unroll=unroll)
        return ravel_pytree(grads)[0]

    return grad_stats.gradient_stats(jax.lax.map(flat_gradient, jnp.arange(exp.train.grad_stats_batches)))


class StepFns(NamedTuple):
    """The jitted functions of one curriculum size: the (donating) train step, the gradient statistics
    (None when grad_stats_batches = 0), the NaN "no measurement" metric, placed like the statistics'
    output (replicated) so that both kinds of iteration share one compiled step, the measurement
    interval, and in the LM phase the loss of LM's batch at a state (`lm_loss`; None otherwise)."""

    train: Any
    stats: Any
    no_metric: jax.Array
    log_every: int
    lm_loss: Any = None


def make_step_fns(exp: Experiment, mesh, n_points: int, n_dims: int | None, lm_phase: bool = False,
                  backend: str | None = None) -> StepFns:
    """The jitted step of one curriculum size: the recipe's (with its gradient statistics), or LM's.

    `backend` ('cpu', 'gpu', 'tpu'; None: the platform of the mesh's devices) is the platform the step is
    built for: it sets the microbatches and the unroll of their scan. Tracing here to export the step
    for another platform (jax.export) passes that platform.
    """
    backend = backend or mesh.devices.flat[0].platform
    sharding = batch_sharded(mesh)
    # made by a computation, not device_put: a multi-process device_put checks the value is the same on
    # every process, and NaN != NaN
    no_metric = jax.jit(lambda: jnp.full((), jnp.nan, jnp.dtype(exp.task.dtype)),
                        out_shardings=replicated(mesh))()
    if lm_phase:
        sizes = dict(exp=exp, n_points=n_points, n_dims=n_dims, sharding=sharding,
                     n_chunks=lm_chunks(exp, count_params(exp), mesh.devices.size))
        return StepFns(train=jax.jit(functools.partial(lm_step, **sizes), donate_argnums=0), stats=None,
                       no_metric=no_metric, log_every=exp.train.log_every,
                       lm_loss=jax.jit(functools.partial(lm_loss, **sizes)))
    sizes = dict(exp=exp, n_points=n_points, n_dims=n_dims, sharding=sharding,
                 n_microbatches=microbatches(exp, n_points, mesh.devices.size, backend),
                 unroll=scan_unroll(backend))
    stats = jax.jit(functools.partial(measure_grad_stats, **sizes)) if exp.train.grad_stats_batches else None
    return StepFns(train=jax.jit(functools.partial(train_step, **sizes), donate_argnums=0), stats=stats,
                   no_metric=no_metric, log_every=exp.train.log_every)


def advance(fns: StepFns, state: TrainState, step: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """Iteration `step` (a host int equal to state.step): on measurement steps (step % log_every == 0, as
    in the reference, before the update) the gradient statistics first, in their own jitted call, and
    their mean cosine fed to the step; otherwise the step with a NaN metric. Metrics include the
    statistics on measurement steps."""
    stats = fns.stats(state) if fns.stats is not None and step % fns.log_every == 0 else {}
    metric = stats.get("gradient_cosine_mean", fns.no_metric)
    state, metrics = fns.train(state, metric)
    return state, {**metrics, **stats}


def evaluate_loss(params, exp: Experiment, sharding=None) -> dict[str, jax.Array]:
    """Test metrics of the task (MSE, and the primitives' relative errors) on fresh problems at full size."""
    model, task = SequenceModel(exp.model), make_task(exp.task)
    batch = draw_batch(task, run_keys(exp.seed)["eval"], 0, exp.train.eval_batch_size, exp.task.n_points, None,
                       sharding)
    return task.eval_metrics(model.apply({"params": params}, batch.inputs), batch.targets)
