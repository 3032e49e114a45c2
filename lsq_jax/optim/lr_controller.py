"""The learning-rate controller: constant, step-threshold or adaptive lr, as an Optax transform.

:func:`scale_by_lr_controller` owns the lr, the count of APPLIED steps, the EMA of the gradient-cosine
metric and the grow/decay flag (:class:`LRControllerState`); :func:`observe_metric` absorbs one
measurement. :func:`lr_controller_state`, :func:`current_lr` and :func:`applied_steps` read that state out
of any optimizer state that holds one.

dtypes: the float state (lr, metric EMA) follows the parameters' dtype; the step counter is int32 like
Optax's own and is cast to int64 (when x64 is on) before any arithmetic.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lsq_jax.config.check import check_choice, check_flag, check_int, check_real
from lsq_jax.config.optim import SCHEDULES
from lsq_jax.optim._tree import find_unique

__all__ = [
    "LRControllerState",
    "observe_metric",
    "observe_metric_in_tree",
    "scale_by_lr_controller",
    "lr_controller_state",
    "current_lr",
    "applied_steps",
]


def _float_dtype(params: Any) -> jnp.dtype:
    """The floating dtype the optimizer's own float state follows: that of the parameters."""
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(params)]
    dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    if not dtypes:
        return jnp.result_type(float)  # the default float: float64 when x64 is on
    return jnp.result_type(*dtypes)


def _count_as_int64(count: jax.Array) -> jax.Array:
    # Optax counters are int32; widen before arithmetic (int64 exists only with x64, else stays int32).
    return count.astype(jax.dtypes.canonicalize_dtype(jnp.int64))


class LRControllerState(NamedTuple):
    """State of :func:`scale_by_lr_controller`.

    Attributes:
        lr: the learning rate the NEXT applied step will use (parameters' float dtype). This is what the
            reference's ``scheduler.get_last_lr()`` reports after ``scheduler.step()``.
        applied_steps: int32, number of optimizer steps applied so far (skipped steps do not count).
        metric_ema: EMA of the gradient-cosine metric, starts at 1.0 (parameters' float dtype).
        grow: bool, the direction flag as last set by a measurement (False = "decay", the initial value).
    """

    lr: jax.Array
    applied_steps: jax.Array
    metric_ema: jax.Array
    grow: jax.Array


def _initial_lr(schedule, learning_rate, gamma, lr_floor, initial_decay) -> float:
    if schedule == "adaptive" and initial_decay:
        # The reference's AdaptiveStepLR runs one step when built (last_epoch 0 is a multiple of
        # step_size, and the flag starts at "decay"), so training starts at lr0 * gamma.
        return max(learning_rate * gamma, lr_floor)
    return learning_rate


def observe_metric(
    state: LRControllerState,
    grad_metric: Optional[jax.typing.ArrayLike],
    *,
    metric_decay: float = 0.9,
    metric_threshold: float = 0.9,
    no_increase_length: int = 1000,
) -> LRControllerState:
    """Absorbs one gradient-cosine measurement into the controller state (the adaptive lr's signal).

    If ``grad_metric`` is finite::

        metric_ema <- metric_decay * metric_ema + (1 - metric_decay) * grad_metric
        grow       <- metric_ema < metric_threshold  and  applied_steps > no_increase_length  (strict)

    If ``grad_metric`` is None or non-finite (NaN is the "no measurement this step" sentinel), the state
    is returned unchanged. A genuinely non-finite measurement is therefore dropped; the reference would
    let it poison the EMA forever.

    Args:
        state: the controller state.
        grad_metric: a scalar (Python float or 0-d array, may be traced) or None.
        metric_decay: EMA decay in [0, 1].
        metric_threshold: grow only while the EMA is below this.
        no_increase_length: never grow before more than this many steps were applied.

    Returns:
        The updated state; ``lr`` and ``applied_steps`` are untouched.
    """
    if grad_metric is None:
        return state
    metric = jnp.reshape(jnp.asarray(grad_metric), ()).astype(state.metric_ema.dtype)
    measured = jnp.isfinite(metric)
    # The reference's order of operations, so that float64 traces match it bit for bit.
    ema = metric_decay * state.metric_ema + (1.0 - metric_decay) * metric
    grow = (ema < metric_threshold) & (_count_as_int64(state.applied_steps) > no_increase_length)
    return state._replace(
        metric_ema=jnp.where(measured, ema, state.metric_ema),
        grow=jnp.where(measured, grow, state.grow),
    )


def scale_by_lr_controller(
    learning_rate: float,
    *,
    schedule: str = "step",
    step_rate: int = 1,
    gamma: float = 1.0,
    lr_floor: float = 1e-10,
    initial_decay: bool = True,
    metric_decay: float = 0.9,
    metric_threshold: float = 0.9,
    no_increase_length: int = 1000,
) -> optax.GradientTransformationExtraArgs:
    """Scales updates by -lr, with the lr set by one of the reference's schedules.

    Let n be the number of steps applied before the current one (``applied_steps``; skipped steps are
    not counted when this transform sits inside ``step_guard``). Applied step n (n = 0, 1, ...)
    uses lr_n, where:

    * ``"constant"``: lr_n = lr0.
    * ``"step"`` (the reference's StepThresholdLR): lr_n = max(lr0 * gamma^floor(n / step_rate), floor)
      (for n = 0 the reference returns lr0 itself, without the floor; so do we).
    * ``"adaptive"`` (the reference's AdaptiveStepLR): lr_0 = max(lr0 * gamma, floor) when
      ``initial_decay`` (the reference decays once when the scheduler is built), else lr0. Then, after
      applied step n, if n + 1 is a multiple of ``step_rate``, lr <- lr / gamma when the flag is "grow"
      (uncapped) and lr <- max(lr * gamma, floor) otherwise. So with step_rate 10 steps 0..9 use lr_0,
      steps 10..19 the next value, and so on.

    This matches the reference's ``optimizer.step(); scheduler.step()`` order: the lr used by applied step
    n is the scheduler's lr at last_epoch = n; ``state.lr`` after the update is the lr of step n + 1.

    Extra argument ``grad_metric`` (adaptive schedule's signal, the mean consecutive-gradient cosine):
    a float scalar, traced or not, in which NaN (or None, the default) means "no new measurement". It is
    absorbed by :func:`observe_metric` BEFORE this step's lr is chosen, as in the reference loop, using
    n (the steps applied before this one) in the strict test n > no_increase_length. The EMA is also
    kept for the other schedules (for logging); only ``"adaptive"`` acts on it.

    Args:
        learning_rate: lr0 > 0.
        schedule: one of ``"constant"``, ``"step"``, ``"adaptive"``.
        step_rate: the reference's step_size, an integer >= 1.
        gamma: factor in (0, 1].
        lr_floor: lower bound for decay (the reference's ``threshold``, 1e-10), >= 0. Growth is uncapped.
        initial_decay: adaptive only: reproduce the reference's decay at construction (default True).
        metric_decay: EMA decay of the metric, in [0, 1] (reference 0.9).
        metric_threshold: grow while the metric EMA is below this (reference 0.9).
        no_increase_length: no growth until more than this many steps were applied (reference 1000).

    Returns:
        A ``GradientTransformationExtraArgs`` with update
        ``update_fn(updates, state, params=None, *, grad_metric=None, **extra_args)``.

    Raises:
        ValueError: if a hyperparameter is out of range.
    """
    owner = "scale_by_lr_controller."
    check_real(f"{owner}learning_rate", learning_rate, 0.0, lo_open=True)
    check_choice(f"{owner}schedule", schedule, SCHEDULES)
    check_int(f"{owner}step_rate", step_rate, 1)
    check_real(f"{owner}gamma", gamma, 0.0, 1.0, lo_open=True)
    check_real(f"{owner}lr_floor", lr_floor, 0.0)
    check_flag(f"{owner}initial_decay", initial_decay)
    check_real(f"{owner}metric_decay", metric_decay, 0.0, 1.0)
    check_real(f"{owner}metric_threshold", metric_threshold)
    check_int(f"{owner}no_increase_length", no_increase_length, 0)

    observe = functools.partial(
        observe_metric,
        metric_decay=metric_decay,
        metric_threshold=metric_threshold,
        no_increase_length=no_increase_length,
    )
    lr_init = _initial_lr(schedule, learning_rate, gamma, lr_floor, initial_decay)

    def init_fn(params):
        dtype = _float_dtype(params)
        return LRControllerState(
            lr=jnp.asarray(lr_init, dtype),
            applied_steps=jnp.zeros([], jnp.int32),
            metric_ema=jnp.asarray(1.0, dtype),
            grow=jnp.zeros([], bool),
        )

    def next_lr(state: LRControllerState) -> jax.Array:
        n_next = _count_as_int64(state.applied_steps) + 1  # last_epoch after this step
        if schedule == "constant":
            return state.lr
        if schedule == "step":
            # Closed form from the count, so no rounding drift accumulates over millions of steps.
            k = (n_next // step_rate).astype(state.lr.dtype)
            return jnp.maximum(learning_rate * jnp.asarray(gamma, state.lr.dtype) ** k, lr_floor).astype(
                state.lr.dtype
            )
        # Adaptive: recursive on the current lr, in the reference's order of operations.
        at_boundary = n_next % step_rate == 0
        decayed = jnp.maximum(state.lr * gamma, lr_floor).astype(state.lr.dtype)
        # XLA rewrites division by a constant into multiplication by its (rounded) reciprocal, one ulp
        # off the reference's lr / gamma; the barrier keeps gamma opaque so the division stays exact.
        grown = state.lr / jax.lax.optimization_barrier(jnp.asarray(gamma, state.lr.dtype))
        return jnp.where(at_boundary, jnp.where(state.grow, grown, decayed), state.lr)

    def update_fn(updates, state, params=None, *, grad_metric=None, **extra_args):
        del params, extra_args
        state = observe(state, grad_metric)
        lr = state.lr
        updates = jax.tree.map(lambda u: (-lr).astype(u.dtype) * u, updates)
        new_state = state._replace(lr=next_lr(state), applied_steps=optax.safe_increment(state.applied_steps))
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def observe_metric_in_tree(inner_state: Any, grad_metric=None, **observe_kwargs) -> Any:
    """Applies :func:`observe_metric` to every LRControllerState inside an optimizer state tree."""
    def visit(node):
        if isinstance(node, LRControllerState):
            return observe_metric(node, grad_metric, **observe_kwargs)
        return node

    return jax.tree.map(visit, inner_state, is_leaf=lambda x: isinstance(x, LRControllerState))


def lr_controller_state(opt_state: Any) -> LRControllerState:
    """The (unique) :class:`LRControllerState` inside an optimizer state."""
    return find_unique(opt_state, LRControllerState)


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate the next applied step will use (the reference's ``get_last_lr()``)."""
    return lr_controller_state(opt_state).lr


def applied_steps(opt_state: Any) -> jax.Array:
    """The number of optimizer steps applied so far (skipped steps excluded)."""
    return lr_controller_state(opt_state).applied_steps
