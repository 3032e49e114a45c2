"""The high-precision training recipe from one ``OptimConfig``: make_optimizer and optimizer_metrics.

One optimizer step, as built by :func:`make_optimizer`::

    gradient -> clip by global norm (100) -> skip test -> EMA filter (optional)
             -> base direction (Adam eps 1e-16 | AdamW | SGD momentum 0.9) -> scale by -lr

Using it from a train step (the measurement is data dependent, so it is delivered as a float scalar in
which NaN means "no new measurement this step"; the train loop measures it in a separate jitted call on
measurement steps and passes it into the step)::

    tx = make_optimizer(cfg)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, grad_metric):      # grad_metric: a cosine, or NaN
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, grad_metric=grad_metric)
        return optax.apply_updates(params, updates), opt_state, optimizer_metrics(opt_state)

    metric = grad_stats.batched_gradient_stats(task_loss, params, keys)["gradient_cosine_mean"]  # or nan

As in the reference, the metric is absorbed BEFORE that step's optimizer step, and it is absorbed even
when the guard then skips the step (the reference updates its scheduler's metric before, and
independently of, its skip test).

dtypes: every floating state leaf (EMA, moments, lr, metric EMA) follows the parameters' dtype, so a
float64 model gets a float64 optimizer; step counters are int32 like Optax's own.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from lsq_jax.config.optim import OptimConfig
from lsq_jax.optim.ema_filter import ema_filter
from lsq_jax.optim.lr_controller import lr_controller_state, observe_metric_in_tree, scale_by_lr_controller
from lsq_jax.optim.step_guard import skipped_steps, step_guard

__all__ = [
    "make_optimizer",
    "optimizer_metrics",
]


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """Builds the recipe: guard(clip -> skip -> [EMA] -> base direction -> scale by -lr).

    Base direction: ``"adam"`` (and ``"lm"``, whose Adam phase this is): ``optax.scale_by_adam(b1, b2,
    eps)`` (torch Adam with eps added to sqrt(v_hat), bias-corrected); ``"adamw"``: the same followed by
    ``+ weight_decay * p`` so the applied update is -lr (adam + wd p), which equals torch AdamW's
    p (1 - lr wd) - lr adam; ``"sgd"``: ``+ weight_decay * p`` (if nonzero), then
    ``optax.trace(momentum)`` (torch SGD, dampening 0).
    The EMA filter is included only when ``ema_lambda > 0``.

    Call ``update(grads, opt_state, params, grad_metric=m)`` with ``m`` a float scalar, NaN on steps
    without a new measurement (see ``lr_controller.scale_by_lr_controller``). Read the lr and counters
    with ``lr_controller.current_lr`` / ``applied_steps``, ``step_guard.skipped_steps`` or
    :func:`optimizer_metrics`.

    Args:
        cfg: a validated :class:`OptimConfig`.

    Returns:
        A ``GradientTransformationExtraArgs`` whose state is a ``step_guard.StepGuardState``.
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
        return observe_metric_in_tree(inner_state, grad_metric, **observe_kwargs)

    return step_guard(
        optax.chain(*transforms), clip_norm=cfg.clip_norm, skip_norm=cfg.skip_norm, on_skip=on_skip
    )


def optimizer_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """Scalars to log from a :func:`make_optimizer` state (these keys are written to metrics.jsonl).

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
