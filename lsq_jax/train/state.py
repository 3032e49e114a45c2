"""The training state: parameters, optimizer state and the step; how it starts and where it lives."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax.mesh import replicated
from lsq_jax.models.backbone import init_params
from lsq_jax.plan.run import RunPlan


class TrainState(NamedTuple):
    """step: training iterations done (skipped ones included); params; opt_state (EMA, LR controller,
    skip counter live in it)."""

    step: jax.Array
    params: Any
    opt_state: Any


def init_state(plan: RunPlan, start: int = 0) -> TrainState:
    """Parameters, step 0 and the state of the plan's optimizer (plan.tx: the recipe's, or the hybrid's
    {'adam': the recipe's, 'lm': lsq_jax.optim.lm.LMState}). `start` k > 0 draws the parameters of the
    run's k-th other initialisation (optim.lm_restarts) from the parameter key folded with k."""
    key = plan.keys["params"]
    params = init_params(plan.exp.model, jax.random.fold_in(key, start) if start else key)
    return TrainState(step=jnp.zeros((), jnp.int64 if jax.config.x64_enabled else jnp.int32),
                      params=params, opt_state=plan.tx.init(params))


def place_state(state: TrainState, mesh) -> TrainState:
    """The state replicated over every device of the mesh."""
    return jax.device_put(state, replicated(mesh))
