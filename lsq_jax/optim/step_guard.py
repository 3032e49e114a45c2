"""The step guard: clip by global norm, skip non-finite (or too large) steps and count them, as an Optax
transform wrapping the rest of the chain; :func:`skipped_steps` reads its count out of an optimizer state.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lsq_jax.config.check import check_optional_positive
from lsq_jax.optim._tree import find_unique

__all__ = [
    "StepGuardState",
    "step_guard",
    "skipped_steps",
]


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
    """Clip -> skip test -> ``inner``: the start of every step of the recipe.

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
    as ``on_skip(inner_state, **extra_args)`` and its result is kept; the recipe's ``make_optimizer``
    uses it so that a gradient-cosine measurement delivered on a skipped step is still absorbed, as in
    the reference. Extra arguments are forwarded to ``inner``.

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
    check_optional_positive("step_guard.clip_norm", clip_norm)
    check_optional_positive("step_guard.skip_norm", skip_norm)
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


def skipped_steps(opt_state: Any) -> jax.Array:
    """The number of steps the :func:`step_guard` skipped so far."""
    return find_unique(opt_state, StepGuardState).skipped
