"""The Grokfast-style EMA gradient filter, the reference's ``gradfilter_ema``, as an Optax transform."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lsq_jax.config.check import check_real

__all__ = [
    "EmaFilterState",
    "ema_filter",
]


class EmaFilterState(NamedTuple):
    """State of :func:`ema_filter`.

    Attributes:
        count: int32, the number of gradients filtered so far (0 means "m not yet initialised").
        ema: the running average m, same structure and dtypes as the parameters.
    """

    count: jax.Array
    ema: optax.Updates


def ema_filter(alpha: float = 0.98, lam: float = 2.0) -> optax.GradientTransformationExtraArgs:
    """Grokfast-style EMA gradient filter, the reference's ``gradfilter_ema``.

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
    check_real("ema_filter.alpha", alpha, 0.0, 1.0)
    check_real("ema_filter.lam", lam, 0.0)
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
