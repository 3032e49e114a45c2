"""The high-precision training recipe as Optax transforms (SPEC §5).

One optimizer step of the recipe, as built by :func:`make_optimizer`::

    gradient -> clip by global norm (100) -> skip test -> EMA filter (optional)
             -> base direction (Adam eps 1e-16 | AdamW | SGD momentum 0.9) -> scale by -lr

The pieces are ordinary Optax transforms and can be used on their own:

* :func:`ema_filter` -- the reference's Grokfast-style ``gradfilter_ema``.
* :func:`scale_by_lr_controller` -- constant, step-threshold or adaptive learning rate. It owns the lr,
  the count of APPLIED steps, the EMA of the gradient-cosine metric and the grow/decay flag.
* :func:`step_guard` -- clip, skip non-finite (or too large) steps, count them, run the inner chain.
* :class:`OptimConfig` and :func:`make_optimizer` -- the whole recipe from one validated config.
* :func:`current_lr`, :func:`applied_steps`, :func:`skipped_steps`, :func:`optimizer_metrics` -- read
  the loggable quantities out of an optimizer state.

Using it from a train step (the measurement is data dependent, so it is delivered as a float scalar in
which NaN means "no new measurement this step"; lsq_jax.train measures it in a separate jitted call on
measurement steps and passes it into the step)::

    tx = make_optimizer(cfg)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, grad_metric):      # grad_metric: a cosine, or NaN
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, grad_metric=grad_metric)
        return optax.apply_updates(params, updates), opt_state, optimizer_metrics(opt_state)

    metric = grad_stats.gradient_signal(task_loss, params, keys)["gradient_cosine_mean"] if step % log_every == 0 else nan

As in the reference, the metric is absorbed BEFORE that step's optimizer step, and it is absorbed even
when the guard then skips the step (the reference updates its scheduler's metric before, and
independently of, its skip test).

dtypes: every floating state leaf (EMA, moments, lr, metric EMA) follows the parameters' dtype, so a
float64 model gets a float64 optimizer; step counters are int32 like Optax's own and are cast to int64
(when x64 is on) before any float arithmetic.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "EmaFilterState",
    "LRControllerState",
    "StepGuardState",
    "OptimConfig",
    "ema_filter",
    "scale_by_lr_controller",
    "observe_metric",
    "step_guard",
    "make_optimizer",
    "lr_controller_state",
    "current_lr",
    "applied_steps",
    "skipped_steps",
    "optimizer_metrics",
]

SCHEDULES = ("constant", "step", "adaptive")
OPTIMIZERS = ("adam", "adamw", "sgd", "lm")
LM_SOLVERS = ("cholesky", "cg")


# --------------------------------------------------------------------------------------------------
# Validation helpers: every hyperparameter is checked up front, with the field, value and allowed range.


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require(owner: str, field: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{owner}{field} = {value!r} is not allowed; allowed: {allowed}")


def _check_real(owner, field, value, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    ok = _is_real(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    allowed = f"a finite real in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    _require(owner, field, value, ok, allowed)


def _check_int(owner, field, value, lo):
    _require(owner, field, value, _is_int(value) and value >= lo, f"an integer >= {lo}")


def _check_choice(owner, field, value, choices):
    _require(owner, field, value, value in choices, f"one of {choices}")


def _check_optional_positive(owner, field, value):
    ok = value is None or (_is_real(value) and value > 0)
    _require(owner, field, value, ok, "None or a finite real > 0")


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


# --------------------------------------------------------------------------------------------------
# 1. EMA gradient filter.


class EmaFilterState(NamedTuple):
    """State of :func:`ema_filter`.

    Attributes:
        count: int32, the number of gradients filtered so far (0 means "m not yet initialised").
        ema: the running average m, same structure and dtypes as the parameters.
    """

    count: jax.Array
    ema: optax.Updates


def ema_filter(alpha: float = 0.98, lam: float = 2.0) -> optax.GradientTransformationExtraArgs:
    """Grokfast-style EMA gradient filter, the reference's ``gradfilter_ema`` (SPEC §5 "EMA filter").

    On each incoming (clipped) gradient g::

        m <- alpha * m + (1 - alpha) * g        (m starts as the FIRST gradient, not zero)
        emit g' = g + lam * m                  (no bias correction, no 1 / (1 + lam) normalisation)

    so the first emitted value is (1 + lam) g. The operations are done in the reference's order
    (``m * alpha + g * (1 - alpha)``, then ``g + m * lam``) so that float64 results match it bit for
    bit. Unlike the reference, m lives in the optimizer state and therefore survives a resume.

    Args:
        alpha: EMA decay, in [0, 1].
        lam: weight of the EMA added to the gradient, >= 0 (0 makes the filter the identity).

    Returns:
        A ``GradientTransformationExtraArgs``; its update accepts and ignores extra keyword arguments.

    Raises:
        ValueError: if a hyperparameter is out of range.
    """
    _check_real("ema_filter: ", "alpha", alpha, 0.0, 1.0)
    _check_real("ema_filter: ", "lam", lam, 0.0)
    one_minus_alpha = 1.0 - alpha  # a Python float, exactly as the reference computes it

    def init_fn(params):
        return EmaFilterState(count=jnp.zeros([], jnp.int32), ema=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        first = state.count == 0

        def new_ema(g, m):
            m_prev = jnp.where(first, g.astype(m.dtype), m)
            return (m_prev * alpha + g * one_minus_alpha).astype(m.dtype)

        ema = jax.tree.map(new_ema, updates, state.ema)
        filtered = jax.tree.map(lambda g, m: (g + m * lam).astype(g.dtype), updates, ema)
        return filtered, EmaFilterState(count=optax.safe_increment(state.count), ema=ema)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# 2. Learning-rate controller.


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
    """Absorbs one gradient-cosine measurement into the controller state (SPEC §5 "Adaptive LR").

    If ``grad_metric`` is finite::

        metric_ema <- metric_decay * metric_ema + (1 - metric_decay) * grad_metric
        grow       <- metric_ema < metric_threshold  and  applied_steps > no_increase_length  (strict)

    If ``grad_metric`` is None or non-finite (NaN is the "no measurement this step" sentinel), the state
    is returned unchanged. A genuinely non-finite measurement is therefore dropped instead of poisoning
    the EMA forever, which is what the reference would do (ours).

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
    """Scales updates by -lr, with the lr set by one of the reference's schedules (SPEC §5).

    Let n be the number of steps applied before the current one (``applied_steps``; skipped steps are
    not counted when this transform sits inside :func:`step_guard`). Applied step n (n = 0, 1, ...)
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
    owner = "scale_by_lr_controller: "
    _check_real(owner, "learning_rate", learning_rate, 0.0, lo_open=True)
    _check_choice(owner, "schedule", schedule, SCHEDULES)
    _check_int(owner, "step_rate", step_rate, 1)
    _check_real(owner, "gamma", gamma, 0.0, 1.0, lo_open=True)
    _check_real(owner, "lr_floor", lr_floor, 0.0)
    _require(owner, "initial_decay", initial_decay, isinstance(initial_decay, bool), "True or False")
    _check_real(owner, "metric_decay", metric_decay, 0.0, 1.0)
    _check_real(owner, "metric_threshold", metric_threshold)
    _check_int(owner, "no_increase_length", no_increase_length, 0)

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


def _observe_metric_in_tree(inner_state: Any, grad_metric=None, **observe_kwargs) -> Any:
    """Applies :func:`observe_metric` to every LRControllerState inside an optimizer state tree."""
    def visit(node):
        if isinstance(node, LRControllerState):
            return observe_metric(node, grad_metric, **observe_kwargs)
        return node

    return jax.tree.map(visit, inner_state, is_leaf=lambda x: isinstance(x, LRControllerState))


# --------------------------------------------------------------------------------------------------
# 3. Step guard.


class StepGuardState(NamedTuple):
    """State of :func:`step_guard`.

    Attributes:
        inner_state: the wrapped transform's state (untouched on a skipped step, see ``on_skip``).
        skipped: int32, the number of skipped steps so far.
    """

    inner_state: optax.OptState
    skipped: jax.Array


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def step_guard(
    inner: optax.GradientTransformation,
    *,
    clip_norm: Optional[float] = 100.0,
    skip_norm: Optional[float] = None,
    on_skip: Optional[Callable[..., Any]] = None,
) -> optax.GradientTransformationExtraArgs:
    """Clip -> skip test -> ``inner`` (SPEC §5 "Order of one step" and "Skip test").

    1. g <- clip_by_global_norm(g, clip_norm), i.e. g * clip_norm / ||g|| when ||g|| >= clip_norm
       (``optax.clip_by_global_norm``; torch's ``clip_grad_norm_`` divides by ||g|| + 1e-6 instead, a
       relative difference below 1e-8). ``clip_norm=None`` disables clipping.
    2. The step is SKIPPED if the clipped gradient has a non-finite entry (an inf entry becomes NaN
       after clipping), or if the pre-clip global norm is non-finite (it overflowed), or, when
       ``skip_norm`` is not None, if the pre-clip global norm exceeds ``skip_norm``. The default
       ``skip_norm=None`` is the reference's behaviour (its "norm > 1e3" test on the clipped gradient
       can never fire, so it skips only non-finite steps).
    3. Otherwise ``inner`` runs on the clipped gradient.

    A skipped step returns zero updates and leaves every leaf of the inner state unchanged -- EMA,
    moments, the lr controller and its applied-step count -- (it runs no inner computation at all, via
    ``lax.cond``) and increments ``skipped``. The one exception is ``on_skip``: if given, it is called
    as ``on_skip(inner_state, **extra_args)`` and its result is kept; :func:`make_optimizer` uses it so
    that a gradient-cosine measurement delivered on a skipped step is still absorbed, as in the
    reference. Extra arguments are forwarded to ``inner``.

    Args:
        inner: the transform to protect (e.g. an ``optax.chain``).
        clip_norm: maximum global norm (reference 100), or None for no clipping.
        skip_norm: optional threshold on the PRE-clip global norm; None (default) disables it.
        on_skip: optional ``(inner_state, **extra_args) -> inner_state`` run on skipped steps.

    Returns:
        A ``GradientTransformationExtraArgs`` whose state is a :class:`StepGuardState`.

    Raises:
        ValueError: if ``clip_norm`` or ``skip_norm`` is not None or a finite positive number.
    """
    _check_optional_positive("step_guard: ", "clip_norm", clip_norm)
    _check_optional_positive("step_guard: ", "skip_norm", skip_norm)
    inner = optax.with_extra_args_support(inner)
    clip = optax.clip_by_global_norm(clip_norm) if clip_norm is not None else None

    def init_fn(params):
        return StepGuardState(inner_state=inner.init(params), skipped=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        pre_clip_norm = optax.tree.norm(updates)
        clipped = clip.update(updates, optax.EmptyState())[0] if clip is not None else updates
        skip = ~(_all_finite(clipped) & jnp.isfinite(pre_clip_norm))
        if skip_norm is not None:
            skip = skip | (pre_clip_norm > skip_norm)

        def apply_step():
            return inner.update(clipped, state.inner_state, params, **extra_args)

        # The skip branch must return updates shaped and typed like the inner transform's output.
        out_updates = jax.eval_shape(apply_step)[0]

        def skip_step():
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_updates)
            inner_state = state.inner_state if on_skip is None else on_skip(state.inner_state, **extra_args)
            return zeros, inner_state

        new_updates, inner_state = jax.lax.cond(skip, skip_step, apply_step)
        skipped = jnp.where(skip, optax.safe_increment(state.skipped), state.skipped)
        return new_updates, StepGuardState(inner_state=inner_state, skipped=skipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# 4. The recipe from one config.


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer half of a run's settings (SPEC §5, §6), validated on construction.

    Attributes:
        optimizer: ``"adam"`` (torch Adam, eps 1e-16), ``"adamw"`` (decoupled weight decay) or ``"sgd"``
            (heavy-ball momentum, torch convention: buf <- momentum * buf + g, first buf = g).
        lr: initial learning rate lr0 > 0.
        schedule: ``"constant"``, ``"step"`` (step-threshold) or ``"adaptive"``.
        step_rate: the schedule's period in applied steps (reference ``scheduler_steprate``), >= 1.
        gamma: the schedule's factor in (0, 1] (1 makes "step" constant).
        lr_floor: lower bound for decay (reference 1e-10); growth is uncapped.
        initial_decay: adaptive only: start at lr0 * gamma like the reference (True) or at lr0.
        metric_decay: EMA decay of the gradient-cosine metric, in [0, 1].
        metric_threshold: adaptive grows while the metric EMA is below this.
        no_increase_length: adaptive never grows before more than this many applied steps.
        clip_norm: global-norm clipping threshold (100), or None for none.
        skip_norm: optional pre-clip global norm above which a step is skipped; None = reference.
        ema_alpha: EMA filter decay, in [0, 1].
        ema_lambda: EMA filter weight, >= 0; 0 turns the filter off.
        b1, b2: Adam decay rates, in [0, 1).
        eps: Adam epsilon added to sqrt(v_hat), >= 0 (1e-16, not 1e-8).
        weight_decay: >= 0; AdamW's decoupled decay, or SGD's L2 term (torch's ``weight_decay``, added
            to the gradient after the EMA filter); must be 0 for plain Adam.
        momentum: SGD momentum in [0, 1] (0 = plain SGD).
        l1: L1 regularisation weight >= 0, used by the loss (lambda * sum |p|), only carried here.
        lm_after: with optimizer ``"lm"``: iterations of the Adam recipe (the fields above) before
            Levenberg-Marquardt takes over (0: LM from the start).
        lm_refresh_every: LM fits the residuals of one batch of train.batch_size problems; a new batch
            every this many LM iterations (0: the same batch throughout).
        lm_damping: LM's initial damping lambda, relative to Marquardt's diagonal scaling, > 0.
        lm_solver: ``"cholesky"`` (dense J^T J, P x P) or ``"cg"`` (matrix-free Gauss-Newton-CG).
        lm_cg_iters: conjugate-gradient iterations per LM step with ``"cg"``.
        lm_geodesic: add Transtrum-Sethna geodesic acceleration to each LM step.
        lm_tries: damped solves per LM iteration: a rejected step is solved again at once with the raised
            damping, reusing J^T J (Cholesky path).
        lm_chunk: problems per Jacobian chunk (0: auto, about 2^20 Jacobian entries per chunk).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "step"
    step_rate: int = 10_000
    gamma: float = 0.9
    lr_floor: float = 1e-10
    initial_decay: bool = True
    metric_decay: float = 0.9
    metric_threshold: float = 0.9
    no_increase_length: int = 1000
    clip_norm: Optional[float] = 100.0
    skip_norm: Optional[float] = None
    ema_alpha: float = 0.98
    ema_lambda: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-16
    weight_decay: float = 0.0
    momentum: float = 0.9
    l1: float = 0.0
    lm_after: int = 0
    lm_refresh_every: int = 0
    lm_damping: float = 1e-3
    lm_solver: str = "cholesky"
    lm_cg_iters: int = 100
    lm_geodesic: bool = False
    lm_tries: int = 10
    lm_chunk: int = 0

    def __post_init__(self):
        owner = "OptimConfig."
        _check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        _check_real(owner, "lr", self.lr, 0.0, lo_open=True)
        _check_choice(owner, "schedule", self.schedule, SCHEDULES)
        _check_int(owner, "step_rate", self.step_rate, 1)
        _check_real(owner, "gamma", self.gamma, 0.0, 1.0, lo_open=True)
        _check_real(owner, "lr_floor", self.lr_floor, 0.0)
        _require(owner, "initial_decay", self.initial_decay, isinstance(self.initial_decay, bool),
                 "True or False")
        _check_real(owner, "metric_decay", self.metric_decay, 0.0, 1.0)
        _check_real(owner, "metric_threshold", self.metric_threshold)
        _check_int(owner, "no_increase_length", self.no_increase_length, 0)
        _check_optional_positive(owner, "clip_norm", self.clip_norm)
        _check_optional_positive(owner, "skip_norm", self.skip_norm)
        _check_real(owner, "ema_alpha", self.ema_alpha, 0.0, 1.0)
        _check_real(owner, "ema_lambda", self.ema_lambda, 0.0)
        _check_real(owner, "b1", self.b1, 0.0, 1.0, hi_open=True)
        _check_real(owner, "b2", self.b2, 0.0, 1.0, hi_open=True)
        _check_real(owner, "eps", self.eps, 0.0)
        _check_real(owner, "weight_decay", self.weight_decay, 0.0)
        if self.optimizer == "adam":
            _require(owner, "weight_decay", self.weight_decay, self.weight_decay == 0,
                     "0 with optimizer='adam' (use 'adamw' for weight decay)")
        _check_real(owner, "momentum", self.momentum, 0.0, 1.0)
        _check_real(owner, "l1", self.l1, 0.0)
        _check_int(owner, "lm_after", self.lm_after, 0)
        _check_int(owner, "lm_refresh_every", self.lm_refresh_every, 0)
        _check_real(owner, "lm_damping", self.lm_damping, 0.0, lo_open=True)
        _check_choice(owner, "lm_solver", self.lm_solver, LM_SOLVERS)
        _check_int(owner, "lm_cg_iters", self.lm_cg_iters, 1)
        _require(owner, "lm_geodesic", self.lm_geodesic, isinstance(self.lm_geodesic, bool), "True or False")
        _check_int(owner, "lm_tries", self.lm_tries, 1)
        _check_int(owner, "lm_chunk", self.lm_chunk, 0)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """Builds the recipe: guard(clip -> skip -> [EMA] -> base direction -> scale by -lr) (SPEC §5).

    Base direction: ``"adam"`` (and ``"lm"``, whose Adam phase this is): ``optax.scale_by_adam(b1, b2, eps)`` (torch Adam with eps added to
    sqrt(v_hat), bias-corrected); ``"adamw"``: the same followed by ``+ weight_decay * p`` so the applied
    update is -lr (adam + wd p), which equals torch AdamW's p (1 - lr wd) - lr adam; ``"sgd"``:
    ``+ weight_decay * p`` (if nonzero), then ``optax.trace(momentum)`` (torch SGD, dampening 0).
    The EMA filter is included only when ``ema_lambda > 0``.

    Call ``update(grads, opt_state, params, grad_metric=m)`` with ``m`` a float scalar, NaN on steps
    without a new measurement (see :func:`scale_by_lr_controller`). Read the lr and counters with
    :func:`current_lr`, :func:`applied_steps`, :func:`skipped_steps` or :func:`optimizer_metrics`.

    Args:
        cfg: a validated :class:`OptimConfig`.

    Returns:
        A ``GradientTransformationExtraArgs`` whose state is a :class:`StepGuardState`.
    """
    transforms = []
    if cfg.ema_lambda > 0:
        transforms.append(ema_filter(cfg.ema_alpha, cfg.ema_lambda))
    if cfg.optimizer in ("adam", "adamw", "lm"):  # lm: the Adam phase of a hybrid (lm_after > 0)
        transforms.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eps_root=0.0))
        if cfg.optimizer == "adamw" and cfg.weight_decay > 0:
            transforms.append(optax.add_decayed_weights(cfg.weight_decay))
    else:
        if cfg.weight_decay > 0:
            transforms.append(optax.add_decayed_weights(cfg.weight_decay))
        if cfg.momentum > 0:
            transforms.append(optax.trace(decay=cfg.momentum))
    observe_kwargs = dict(
        metric_decay=cfg.metric_decay,
        metric_threshold=cfg.metric_threshold,
        no_increase_length=cfg.no_increase_length,
    )
    transforms.append(
        scale_by_lr_controller(
            cfg.lr,
            schedule=cfg.schedule,
            step_rate=cfg.step_rate,
            gamma=cfg.gamma,
            lr_floor=cfg.lr_floor,
            initial_decay=cfg.initial_decay,
            **observe_kwargs,
        )
    )

    def on_skip(inner_state, grad_metric=None, **extra_args):
        del extra_args
        return _observe_metric_in_tree(inner_state, grad_metric, **observe_kwargs)

    return step_guard(
        optax.chain(*transforms), clip_norm=cfg.clip_norm, skip_norm=cfg.skip_norm, on_skip=on_skip
    )


# --------------------------------------------------------------------------------------------------
# Reading the loggable quantities out of an optimizer state.


def _find_unique(tree: Any, cls: type) -> Any:
    found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one {cls.__name__} in the optimizer state, found {len(found)}")
    return found[0]


def lr_controller_state(opt_state: Any) -> LRControllerState:
    """The (unique) :class:`LRControllerState` inside an optimizer state."""
    return _find_unique(opt_state, LRControllerState)


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate the next applied step will use (the reference's ``get_last_lr()``)."""
    return lr_controller_state(opt_state).lr


def applied_steps(opt_state: Any) -> jax.Array:
    """The number of optimizer steps applied so far (skipped steps excluded)."""
    return lr_controller_state(opt_state).applied_steps


def skipped_steps(opt_state: Any) -> jax.Array:
    """The number of steps the :func:`step_guard` skipped so far."""
    return _find_unique(opt_state, StepGuardState).skipped


def optimizer_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """Scalars to log from a :func:`make_optimizer` state.

    Returns:
        ``learning_rate`` (the next step's lr), ``applied_steps``, ``skipped_steps``,
        ``gradient_cosine_metric_lrscheduler`` (the metric EMA, under the reference's log key) and
        ``lr_grow`` (the direction flag).
    """
    lr_state = lr_controller_state(opt_state)
    return {
        "learning_rate": lr_state.lr,
        "applied_steps": lr_state.applied_steps,
        "skipped_steps": skipped_steps(opt_state),
        "gradient_cosine_metric_lrscheduler": lr_state.metric_ema,
        "lr_grow": lr_state.grow,
    }
