"""Levenberg-Marquardt's damping: the scaling D of the damped system (JtJ + lam D) delta = -Jtr, and the
rule that moves lam after each trial step. Pure functions of arrays, selected by name (optim.lm_scaling,
optim.lm_rule); docs/performance.md has the measurements behind the defaults.

Scalings (D is held as a (P,) vector):
    isotropic: D = mean(diag JtJ) I, measured at the first LM iteration and then held, so lam is the
        damping relative to the model's average curvature and every direction is damped alike.
    marquardt: Marquardt's D = diag(JtJ) with Moré's running maximum, D <- max(D, diag JtJ): a direction
        that was steep once stays damped as steeply.

Rules (rho the gain ratio; a step is accepted iff rho > 0):
    nielsen: accepted: lam <- lam max(1/3, 1 - (2 rho - 1)^3), nu <- 2; rejected: lam <- lam nu, nu <- 2 nu
        (Madsen, Nielsen & Tingleff, "Methods for non-linear least squares problems" (2004), eq. 3.16).
    delayed: accepted: lam <- lam / 3; rejected: lam <- 2 lam (Transtrum & Sethna's "delayed
        gratification": fall slowly, rise fast), nu stays 2.
Either way lam is then clamped into [damping_min, damping_max].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lsq_jax.config.optim import LM_RULES, LM_SCALINGS


def update_scaling(kind: str, scaling: jax.Array, diag: jax.Array, rel_floor: float = 1e-10) -> jax.Array:
    """D for this iteration's solve from the previous D (all zeros before the first LM iteration) and this
    iteration's diag(JtJ) (or an estimate of it).

    The floor, max(rel_floor * mean(D), tiny), keeps a zero column (a parameter the loss does not see)
    solvable, where it simply gets a zero step.
    """
    if kind == "isotropic":
        d = jnp.where(jnp.any(scaling > 0), scaling, jnp.full_like(scaling, jnp.mean(diag)))
    elif kind == "marquardt":
        d = jnp.maximum(scaling, diag)
    else:
        raise ValueError(f"lm_scaling={kind!r} is not allowed: must be one of {', '.join(LM_SCALINGS)}")
    return jnp.maximum(d, jnp.maximum(rel_floor * jnp.mean(d), jnp.finfo(d.dtype).tiny))


def update_damping(rule: str, damping, nu, gain_ratio, accepted, damping_min: float = 1e-15,
                   damping_max: float = 1e15):
    """(lam, nu) after a trial step with gain ratio `gain_ratio` that was `accepted` or not (see above)."""
    if rule == "nielsen":
        factor = jnp.where(accepted, jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * gain_ratio - 1.0) ** 3), nu)
        nu = jnp.where(accepted, 2.0, 2.0 * nu)
    elif rule == "delayed":
        factor, nu = jnp.where(accepted, 1.0 / 3.0, 2.0), jnp.full_like(nu, 2.0)
    else:
        raise ValueError(f"lm_rule={rule!r} is not allowed: must be one of {', '.join(LM_RULES)}")
    return jnp.clip(damping * factor, damping_min, damping_max), nu
