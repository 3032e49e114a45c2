"""Training: the state, one pure jitted step, and the driver loop (SPEC §5).

The batch of step t is drawn INSIDE the step from fold_in(data_key, t) and each example's global index,
so it is bit-identical for any number of devices or processes and there is no loader state to save.
Parameters and optimizer state are replicated over the 'data' mesh and the per-example keys are
sharded along it, so each device draws and differentiates only its share; XLA sums the gradients.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from lsq_jax import evaluate, grad_stats, optim, parallel, plots
from lsq_jax.checkpointing import CheckpointError, Checkpointer, WorkdirLock, abstract_like, check_writable
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import Task, curriculum_value
from lsq_jax.experiment import (RESUMABLE_CHANGES, Experiment, UsageError, config_differences,
                                experiment_from_dict, experiment_to_dict)
from lsq_jax.metrics import MetricsWriter, Progress, read_metrics
from lsq_jax.models.backbone import SequenceModel, init_params
from lsq_jax.optim import lm

class TrainState(NamedTuple):
    """step: training iterations done (skipped ones included); params; opt_state (EMA, LR controller,
    skip counter live in it)."""

    step: jax.Array
    params: Any
    opt_state: Any


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Independent streams of the one run key: parameters, training data, gradient statistics, evaluation."""
    root = jax.random.key(seed)
    names = ("params", "data", "stats", "eval", "lm")
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(names)}


def count_params(exp: Experiment) -> int:
    """P, the model's parameter count (from shapes alone: nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init_params(exp.model, jax.random.key(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def uses_lm(exp: Experiment) -> bool:
    return exp.optim.optimizer == "lm"


def init_state(exp: Experiment) -> TrainState:
    """Parameters, step 0 and the optimizer state: the recipe's, or with optimizer 'lm' {'adam': the
    recipe's (its phase of a hybrid), 'lm': lm.LMState}."""
    params = init_params(exp.model, run_keys(exp.seed)["params"])
    opt_state = optim.make_optimizer(exp.optim).init(params)
    if uses_lm(exp):
        opt_state = {"adam": opt_state,
                     "lm": lm.init_lm_state(count_params(exp), exp.model.jnp_dtype, exp.optim.lm_damping)}
    return TrainState(step=jnp.zeros((), jnp.int64 if jax.config.x64_enabled else jnp.int32),
                      params=params, opt_state=opt_state)


def sizes_at(exp: Experiment, step: int) -> tuple[int, int | None]:
    """(n_points, n_dims_truncated or None) that the curriculum gives iteration `step` (host-side ints)."""
    n_points = curriculum_value(exp.points, step)
    n_dims = curriculum_value(exp.dims, step)
    return n_points, (None if n_dims == exp.task.n_dims else n_dims)


def _placed(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def draw_batch(task: Task, key, step, batch_size: int, n_points: int, n_dims: int | None, sharding=None):
    """The global batch of `step`: one key per global example index, sharded before anything is drawn."""
    keys = _placed(example_keys(key, step, 0, batch_size), sharding)
    return task.sample(keys, n_points=n_points, n_dims_truncated=n_dims)


MICROBATCH_ELEMENTS = 2**17  # auto microbatch on CPU: one (examples, T, E) activation holds at most this many


def microbatches(exp: Experiment, n_points: int, n_devices: int, backend: str | None = None) -> int:
    """How many microbatches each device's share of the batch is differentiated in (see TrainConfig).

    Auto (microbatch_size 0) on CPU: the fewest that bring one (examples, T, E) activation down to
    MICROBATCH_ELEMENTS (1 MiB in float64). XLA:CPU's step is bound by main memory once the activations
    outgrow the cache: on a 2-core VM with ~7 GB/s to memory one pass over a 1024 x 21 x 64 float64 tensor
    costs ~3 ms, the matmul that reads it ~1 ms in cache. Measured there (steps/s by examples per
    microbatch): width 64 float64 32: 13.4, 64: 17.1, 128: 14.8, 1024: 8.0; float32 64: 28.8, 128: 27.0,
    1024: 13.0; width 256 float64 8-32: 1.03-1.07, 64: 0.93, 1024: 0.46. The rule picks 64, 64 and 16.
    The bound is per microbatch: on CPU two are live at once (CPU_SCAN_UNROLL), and swept again that way
    64 stayed the best (float64 / float32 steps/s: 32: 18.9 / 30.0, 128: 16.6 / 34.2, 64 in the bench:
    20.6 / 36.7).
    """
    local = exp.train.batch_size // n_devices
    size = exp.train.microbatch_size
    if size:
        if local % size:
            raise ValueError(f"train.microbatch_size={size} is not allowed: must divide the per-device batch "
                             f"{local} (train.batch_size / {n_devices} devices)")
        return local // size
    if (backend or jax.default_backend()) != "cpu":
        return 1
    per_example = exp.make_task().seq_len(n_points) * exp.model.n_embd
    return next((n for n in divisors(local) if (local // n) * per_example <= MICROBATCH_ELEMENTS), local)


def divisors(n: int) -> list[int]:
    """The divisors of n in increasing order (trial division up to sqrt(n))."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


# Microbatches per iteration of the accumulating scan on CPU. Two independent microbatches in one loop
# body let XLA:CPU run their ops side by side on two cores, where one microbatch's small ops scale poorly.
# Measured on 2 cores in alternated runs (steps/s, unroll 1 -> 2): baseconv float64 18.7-19.1 ->
# 20.5-21.8, float32 32.5-34.5 -> 38.2-38.3; linear_attention float64 0.98-1.14 -> 1.20; multistep_gd
# float64 8.1-9.0 -> 8.4-8.5. 4 was slower (float64 13-16). The sums are the same: bitwise equal over 3
# steps with 4 or 8 microbatches; with 2 the single unrolled body is fused differently (7e-16 apart).
# Off CPU the scan is not unrolled: a microbatch size chosen there to fit device memory stays the most
# that is live at once.
CPU_SCAN_UNROLL = 2


def accumulated_value_and_grad(fn, params, xs, n_chunks: int, sharding=None):
    """The mean over `n_chunks` chunks of xs of fn(params, chunk) -> (scalar, aux), and its gradient.

    One chunk at a time in a lax.scan, so only one chunk's activations are live (two on CPU, where the
    scan is unrolled by CPU_SCAN_UNROLL). Chunk c holds the rows c, c + n_chunks, c + 2 n_chunks, ... of
    every leaf of xs: rows sharded over devices in contiguous blocks stay on their device (n_chunks must
    divide the per-device rows). Equal to value_and_grad of the mean over all rows when every chunk's
    value is a mean over its rows. With several devices the replicated accumulator is all-reduced once per
    chunk (a shard_map form with one reduction per step stalled emulated CPU devices in half the runs; see
    the note on issue 11).
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
    unroll = CPU_SCAN_UNROLL if jax.default_backend() == "cpu" else 1
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
                   n_microbatches: int = 1):
    """((task loss, per-position loss), gradient) on the global batch drawn from `key` at `step`,
    accumulated over `n_microbatches` per device (the keys are sharded before anything is drawn)."""
    keys = _placed(example_keys(key, step, 0, exp.train.batch_size), sharding)
    loss = functools.partial(example_loss, model=SequenceModel(exp.model), task=exp.make_task(),
                             n_points=n_points, n_dims=n_dims)
    return accumulated_value_and_grad(loss, params, keys, n_microbatches, sharding)


def train_step(state: TrainState, grad_metric=None, *, exp: Experiment, n_points: int, n_dims: int | None,
               sharding=None, n_microbatches: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One training iteration: loss, gradient (accumulated over `n_microbatches` per device), recipe, update.

    `grad_metric` is the adaptive LR's signal: the mean consecutive-gradient cosine that
    `gradient_statistics` measured on this iteration's state, or NaN / None on iterations without a
    measurement (see `advance`).
    """
    if uses_lm(exp):  # the Adam phase of a hybrid: the recipe on its own part of the state
        inner, metrics = train_step(state._replace(opt_state=state.opt_state["adam"]), grad_metric,
                                    exp=_as_adam(exp), n_points=n_points, n_dims=n_dims, sharding=sharding,
                                    n_microbatches=n_microbatches)
        return inner._replace(opt_state={**state.opt_state, "adam": inner.opt_state}), metrics
    tx = optim.make_optimizer(exp.optim)
    (loss, per_position), grads = batch_gradient(state.params, run_keys(exp.seed)["data"], state.step, exp=exp,
                                                 n_points=n_points, n_dims=n_dims, sharding=sharding,
                                                 n_microbatches=n_microbatches)
    if exp.optim.l1:  # + l1 * sum |p|, whose gradient is sign(p): 0 at p = 0 as torch's abs (JAX's abs gives 1)
        grads = jax.tree.map(lambda g, p: g + exp.optim.l1 * jnp.sign(p), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_metric=grad_metric)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "per_position_loss": per_position, "grad_norm": optax.tree.norm(grads),
               **optim.optimizer_metrics(opt_state)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _as_adam(exp: Experiment) -> Experiment:
    return dataclasses.replace(exp, optim=dataclasses.replace(exp.optim, optimizer="adam"))


LM_CHUNK_ENTRIES = 2**22  # auto lm_chunk: a chunk's Jacobian holds at most this many entries (32 MiB float64)


def lm_chunks(exp: Experiment, n_params: int, n_devices: int) -> int:
    """How many strided chunks the LM batch's Jacobian is built in: optim.lm_chunk problems each, or
    (auto) the fewest whose Jacobian stays within LM_CHUNK_ENTRIES; a chunk spreads over every device."""
    n = exp.train.batch_size
    per_problem = lm_outputs(exp) * n_params
    candidates = [c for c in divisors(n) if (n // c) % n_devices == 0]
    if exp.optim.lm_chunk:
        if n % exp.optim.lm_chunk or (n // exp.optim.lm_chunk) not in candidates:
            raise ValueError(f"optim.lm_chunk={exp.optim.lm_chunk} is not allowed: must divide train.batch_size "
                             f"{n} into chunks that split over {n_devices} devices")
        return n // exp.optim.lm_chunk
    return next((c for c in candidates if (n // c) * per_problem <= LM_CHUNK_ENTRIES), candidates[-1])


def lm_outputs(exp: Experiment) -> int:
    """K, the residuals of one problem (the entries of its target)."""
    task = exp.make_task()
    keys = example_keys(jax.random.key(0), 0, 0, 1)
    return math.prod(jax.eval_shape(lambda k: task.sample(k, n_points=exp.task.n_points).targets, keys).shape)


def lm_residuals(params, keys, *, model: SequenceModel, task: Task, n_points: int, n_dims: int | None):
    """(problems, K) model output minus target on the problems drawn from `keys` (their mean square is the
    task loss)."""
    batch = task.sample(keys, n_points=n_points, n_dims_truncated=n_dims)
    pred = predict(params, model, task, batch.inputs, n_points)
    return (task.read(pred) - batch.targets).reshape(keys.shape[0], -1)


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
    index = (state.step - o.lm_after) // o.lm_refresh_every if o.lm_refresh_every else 0
    keys = _placed(example_keys(run_keys(exp.seed)["lm"], index, 0, exp.train.batch_size), sharding)
    residuals = functools.partial(lm_residuals, model=SequenceModel(exp.model), task=exp.make_task(),
                                  n_points=n_points, n_dims=n_dims)
    if o.lm_solver == "cg":
        params, lm_state, m = lm.lm_update_cg(residuals, state.params, keys, state.opt_state["lm"], n_chunks,
                                              maxiter=o.lm_cg_iters)
    else:
        params, lm_state, m = lm.lm_update(residuals, state.params, keys, state.opt_state["lm"], n_chunks,
                                           geodesic=o.lm_geodesic, max_tries=o.lm_tries)
    metrics = {"loss": m["loss"], "trial_loss": m["trial_loss"], "damping": m["damping"],
               "gain_ratio": m["gain_ratio"], "step_norm": m["step_norm"],
               "skipped_steps": lm_state.rejected, "lm_accepted": lm_state.accepted}
    return TrainState(step=state.step + 1, params=params, opt_state={**state.opt_state, "lm": lm_state}), metrics


def gradient_statistics(state: TrainState, *, exp: Experiment, n_points: int, n_dims: int | None,
                        sharding=None, n_microbatches: int = 1) -> dict[str, jax.Array]:
    """SPEC §5 statistics of the gradients of `grad_stats_batches` fresh mini-batches at state.params
    (the task loss, unclipped, without L1): one mini-batch at a time, each accumulated over microbatches
    like the step's (all at once would hold grad_stats_batches batches of activations)."""
    stats_key = run_keys(exp.seed)["stats"]

    def flat_gradient(i):
        _, grads = batch_gradient(state.params, jax.random.fold_in(stats_key, i), state.step, exp=exp,
                                  n_points=n_points, n_dims=n_dims, sharding=sharding,
                                  n_microbatches=n_microbatches)
        return ravel_pytree(grads)[0]

    return grad_stats.gradient_stats(jax.lax.map(flat_gradient, jnp.arange(exp.train.grad_stats_batches)))


class StepFns(NamedTuple):
    """The jitted functions of one curriculum size: the (donating) train step, the gradient statistics
    (None when grad_stats_batches = 0), the NaN "no measurement" metric, placed like the statistics'
    output (replicated) so that both kinds of iteration share one compiled step, and the measurement
    interval."""

    train: Any
    stats: Any
    no_metric: jax.Array
    log_every: int


def in_lm_phase(exp: Experiment, step: int) -> bool:
    """Whether iteration `step` is a Levenberg-Marquardt one (optimizer 'lm', after its lm_after Adam steps)."""
    return uses_lm(exp) and step >= exp.optim.lm_after


def make_step_fns(exp: Experiment, mesh, n_points: int, n_dims: int | None, lm_phase: bool = False) -> StepFns:
    """The jitted step of one curriculum size: the recipe's (with its gradient statistics), or LM's."""
    sharding = parallel.batch_sharded(mesh)
    # made by a computation, not device_put: a multi-process device_put checks the value is the same on
    # every process, and NaN != NaN
    no_metric = jax.jit(lambda: jnp.full((), jnp.nan, jnp.dtype(exp.task.dtype)),
                        out_shardings=parallel.replicated(mesh))()
    if lm_phase:
        n_params = count_params(exp)
        step = functools.partial(lm_step, exp=exp, n_points=n_points, n_dims=n_dims, sharding=sharding,
                                 n_chunks=lm_chunks(exp, n_params, mesh.devices.size))
        return StepFns(train=jax.jit(step, donate_argnums=0), stats=None, no_metric=no_metric,
                       log_every=exp.train.log_every)
    sizes = dict(exp=exp, n_points=n_points, n_dims=n_dims, sharding=sharding,
                 n_microbatches=microbatches(exp, n_points, mesh.devices.size))
    stats = jax.jit(functools.partial(gradient_statistics, **sizes)) if exp.train.grad_stats_batches else None
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
    model, task = SequenceModel(exp.model), exp.make_task()
    batch = draw_batch(task, run_keys(exp.seed)["eval"], 0, exp.train.eval_batch_size, exp.task.n_points, None,
                       sharding)
    return task.eval_metrics(model.apply({"params": params}, batch.inputs), batch.targets)


def memory_estimate(exp: Experiment, n_devices: int, backend: str | None = None) -> dict[str, int]:
    """A lower bound, in bytes per device, of what training `exp` holds at once, by part.

    state: parameters, their gradient and accumulator, and the optimizer's moments and EMA (6 copies);
    activations: the input and output of every block for one microbatch (two on CPU, where the scan is
    unrolled), kept for the backward pass; data: the per-device batch's inputs and per-example keys;
    statistics: the matrix of mini-batch gradients; evaluation: one activation of the test batch;
    lm_normal_equations: Levenberg-Marquardt's P x P J^T J and the chunk term being added to it.
    """
    n_params = count_params(exp)
    itemsize = jnp.dtype(exp.task.dtype).itemsize
    task = exp.make_task()
    seq_len = task.seq_len(exp.task.n_points)
    local = exp.train.batch_size // n_devices
    backend = backend or jax.default_backend()
    live = (local // microbatches(exp, exp.task.n_points, n_devices, backend)) * (
        CPU_SCAN_UNROLL if backend == "cpu" else 1)
    token = seq_len * exp.model.n_embd * itemsize
    lm_system = 2 * n_params**2 * itemsize if uses_lm(exp) and exp.optim.lm_solver == "cholesky" else 0
    return {"state": 6 * n_params * itemsize, "lm_normal_equations": lm_system,
            "activations": 2 * (exp.model.n_layer + 1) * min(live, local) * token,
            "data": local * (seq_len * exp.model.in_dims * itemsize + 8),
            "statistics": exp.train.grad_stats_batches * n_params * itemsize,
            "evaluation": exp.train.eval_batch_size // n_devices * token}


def device_memory(device) -> int | None:
    """Bytes one device can hold: the accelerator's limit, or the machine's physical memory on CPU."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- not every backend reports
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(jax.local_device_count(), 1)
    return None


_MEMORY_FIELDS = {"lm_normal_equations": "model.n_embd, or use optim.lm_solver=cg (matrix-free)",
                  "state": "model.n_embd / model.n_layer", "activations": "train.microbatch_size / model.n_embd",
                  "data": "train.batch_size", "statistics": "train.grad_stats_batches / model.n_embd",
                  "evaluation": "train.eval_batch_size"}


def check_memory(exp: Experiment, mesh) -> None:
    """Refuse, before anything is allocated or written, a run whose lower-bound estimate exceeds a device."""
    parts = memory_estimate(exp, mesh.devices.size, mesh.devices.flat[0].platform)
    limit = device_memory(mesh.devices.flat[0])
    total = sum(parts.values())
    if limit is None or total <= limit:
        return
    largest = max(parts, key=parts.get)
    gib = 2.0**30
    detail = ", ".join(f"{k} {v / gib:.3g}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
    raise UsageError(f"the run needs at least {total / gib:.3g} GiB per device ({detail} GiB) but a "
                     f"{mesh.devices.flat[0].platform} device has {limit / gib:.3g} GiB: reduce "
                     f"{_MEMORY_FIELDS[largest]}")


def place_state(state: TrainState, mesh) -> TrainState:
    return jax.device_put(state, parallel.replicated(mesh))


def saved_experiment(saved: dict) -> Experiment:
    """The experiment of a checkpoint's saved config; CheckpointError when it is not one."""
    try:
        return experiment_from_dict(saved)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"a checkpoint's saved config is unusable ({err})") from None


def resume_or_init(exp: Experiment, ckpt: Checkpointer, mesh, *, allow_config_change: bool, log) -> TrainState:
    """The newest good checkpoint of the workdir (refusing one of a different configuration; moving one
    that cannot be restored out of the way), or a new state."""
    abstract = abstract_like(jax.eval_shape(lambda: init_state(exp)), parallel.replicated(mesh))

    def target(saved: dict):
        saved = experiment_to_dict(saved_experiment(saved))  # fields added since it was saved: defaults
        changed = [f for f in config_differences(saved, experiment_to_dict(exp)) if f not in RESUMABLE_CHANGES]
        if changed and not allow_config_change:
            raise UsageError(f"the workdir holds a run with a different config (fields: {', '.join(changed)}); "
                             "use another --workdir, or --allow_config_change to resume anyway")
        return abstract

    restored = ckpt.restore_newest(target, log=log, set_aside=True)
    if restored is None:
        return place_state(jax.jit(lambda: init_state(exp))(), mesh)
    step, _, state = restored
    log(f"resumed from step {step}")
    return state


def train_and_evaluate(exp: Experiment, workdir, *, log=print, allow_config_change: bool = False) -> dict[str, Any]:
    """Train to exp.train.num_steps iterations (resuming from the workdir's checkpoints), then evaluate.

    Writes <workdir>/config.json, <workdir>/metrics.jsonl (process 0) and checkpoints every
    checkpoint_every steps and at the end. On SIGTERM (or Orbax's preemption signal in a multi-process
    run) it saves at the next step and returns with result['preempted'] = True.
    """
    mesh = parallel.make_mesh()
    try:
        parallel.check_batch_size("train.batch_size", exp.train.batch_size, mesh)
        parallel.check_batch_size("train.eval_batch_size", exp.train.eval_batch_size, mesh)
        microbatches(exp, exp.task.n_points, mesh.devices.size)  # an explicit size must divide the device share
        if uses_lm(exp):
            lm_chunks(exp, count_params(exp), mesh.devices.size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    check_memory(exp, mesh)
    is_main = jax.process_index() == 0
    config = experiment_to_dict(exp)
    lock = WorkdirLock(workdir)
    if is_main:
        check_writable(workdir)
        lock.acquire(log)
    try:
        result = _train_in_workdir(exp, workdir, mesh, config, log=log, allow_config_change=allow_config_change)
        if result["preempted"]:
            return result
        state = result["state"]
        result = {k: float(v) for k, v in jax.jit(
            lambda p: evaluate_loss(p, exp, sharding=parallel.batch_sharded(mesh)))(state.params).items()}
        MetricsWriter(workdir / "metrics.jsonl", is_main).write(exp.train.num_steps,
                                                                {f"eval_{k}": v for k, v in result.items()})
        if is_main:
            log("eval | " + " | ".join(f"{k} {v:.3e}" for k, v in result.items()))
        report = write_evaluation(exp, state.params, workdir, log=log)
    finally:
        lock.release()
    return {"state": state, "eval": result, "report": report, "preempted": False}


def _train_in_workdir(exp: Experiment, workdir, mesh, config, *, log, allow_config_change: bool) -> dict[str, Any]:
    """Resume or start, train to num_steps or to a preemption; {'state', 'preempted'}."""
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(workdir, save_every=exp.train.checkpoint_every)
    try:
        state = resume_or_init(exp, ckpt, mesh, allow_config_change=allow_config_change, log=log)
        if is_main:
            (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        ckpt.watch_preemption()
        state, preempted = _train_loop(exp, state, mesh, ckpt, config,
                                       MetricsWriter(workdir / "metrics.jsonl", is_main),
                                       log if is_main else (lambda line: None))
        if preempted:
            log(f"preempted: saved step {int(state.step)}; run the same command to resume")
            return {"state": state, "preempted": True}
    finally:
        ckpt.close()
    return {"state": state, "preempted": False}


def write_evaluation(exp: Experiment, params, workdir, *, log=print, constructions: bool = False) -> dict[str, Any]:
    """The numerical-analysis report (lsq_jax.evaluate) of a learned model, or of the hand-built GD models,
    written to <workdir>/eval/report.json with a table on the terminal and PNG plots (process 0)."""
    key = run_keys(exp.seed)["eval"]
    sizes = {"n_problems": exp.train.eval_problems, "n_iters": exp.train.eval_iters}
    if constructions:
        report = evaluate.evaluate_constructions(exp.task.n_dims, exp.task.n_points, key,
                                                 dtype=jnp.dtype(exp.task.dtype), **sizes)
    else:
        report = evaluate.evaluate_experiment(exp, params, key, **sizes)
    if jax.process_index() == 0:
        out = workdir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        log(evaluate.format_table(report))
        records = read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
        for path in plots.write_plots(report, records, out):
            log(f"wrote {path}")
        log(f"wrote {out / 'report.json'}")
    return report


def evaluate_checkpoint(workdir, step: int | None = None, *, log=print) -> dict[str, Any]:
    """--mode=eval: restore a checkpoint of `workdir` (the newest good one, or `step`) and write its report."""
    exp, state = restore_for_eval(workdir, step, log=log)
    if jax.process_index() == 0:
        check_writable(workdir / "eval")  # before the evaluation's minutes, not after
    jax.config.update("jax_default_matmul_precision", exp.matmul_precision)
    log(f"evaluating step {int(state.step)} of {exp.name}")
    return write_evaluation(exp, state.params, workdir, log=log)


def restore_for_eval(workdir, step: int | None = None, *, log=print) -> tuple[Experiment, TrainState]:
    """(experiment, state) of a workdir's checkpoint: `step`, or the newest good one. The model is rebuilt
    from the config saved WITH the checkpoint, so it cannot silently differ from what was trained."""
    if not (workdir / "checkpoints").exists():
        raise CheckpointError(f"{workdir} holds no checkpoints (is it a training workdir?)")
    sharding = parallel.replicated(parallel.make_mesh())
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        restored = ckpt.restore_newest(
            lambda saved: abstract_like(jax.eval_shape(lambda: init_state(saved_experiment(saved))), sharding),
            step=step, log=log)
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{workdir} holds no checkpoints")
    _, saved, state = restored
    return experiment_from_dict(saved), state


def _train_loop(exp, state, mesh, ckpt, config, writer, log):
    """Steps from state.step to num_steps; (final state, whether it stopped for preemption)."""
    start, num_steps, every = int(state.step), exp.train.num_steps, exp.train.log_every
    progress = Progress(start, num_steps)
    fns: dict[tuple, StepFns] = {}
    pending = None  # (step, metrics) of the last measurement step, read after the next dispatch
    for step in range(start, num_steps):
        key = (*sizes_at(exp, step), in_lm_phase(exp, step))
        if key not in fns:
            fns[key] = make_step_fns(exp, mesh, *key)
        state, metrics = advance(fns[key], state, step)
        if pending is not None:
            _report(writer, progress, log, *pending)
            pending = None
        if step % every == 0 or step == num_steps - 1:
            pending = (step, metrics)
        ckpt.save(step + 1, state, config, force=step + 1 == num_steps)
        if ckpt.preempted(step + 1):
            ckpt.save(step + 1, state, config, force=True)  # a no-op when step + 1 was just saved
            return state, True
    if pending is not None:
        _report(writer, progress, log, *pending)
    return state, False


ALWAYS_LOGGED = ("loss", "grad_norm", "learning_rate", "damping", "skipped_steps")  # logged even when NaN


def _report(writer, progress, log, step, metrics):
    """Write and print a measurement; other NaN scalars mean "not measured at this step" and are dropped."""
    metrics = jax.device_get(metrics)
    metrics = {k: v for k, v in metrics.items()
               if k in ALWAYS_LOGGED or not (jnp.ndim(v) == 0 and math.isnan(float(v)))}
    writer.write(step, metrics)
    log(progress.line(step, metrics))
