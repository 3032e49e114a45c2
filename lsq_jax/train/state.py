"""The training state: parameters, optimizer state and the step; how it starts and where it lives."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax.config.experiment import Experiment
from lsq_jax.data.keys import run_keys
from lsq_jax.mesh import replicated
from lsq_jax.models.backbone import init_params
from lsq_jax.optim import lm_transform, recipe
from lsq_jax.train.plan import uses_lm


class TrainState(NamedTuple):
    """step: training iterations done (skipped ones included); params; opt_state (EMA, LR controller,
    skip counter live in it)."""

    step: jax.Array
    params: Any
    opt_state: Any


def run_optimizer(exp: Experiment):
    """The run's optimizer: the recipe (lsq_jax.optim.recipe), or with optimizer 'lm' the hybrid of the
    recipe and Levenberg-Marquardt (lsq_jax.optim.lm_transform.make_lm_optimizer)."""
    return lm_transform.make_lm_optimizer(exp.optim) if uses_lm(exp) else recipe.make_optimizer(exp.optim)


def init_state(exp: Experiment, start: int = 0) -> TrainState:
    """Parameters, step 0 and the optimizer's state (`run_optimizer`: the recipe's, or the hybrid's
    {'adam': the recipe's, 'lm': lsq_jax.optim.lm.LMState}). `start` k > 0 draws the parameters of the
    run's k-th other initialisation (optim.lm_restarts) from the parameter key folded with k."""
    key = run_keys(exp.seed)["params"]
    params = init_params(exp.model, jax.random.fold_in(key, start) if start else key)
    opt_state = run_optimizer(exp).init(params)
    return TrainState(step=jnp.zeros((), jnp.int64 if jax.config.x64_enabled else jnp.int32),
                      params=params, opt_state=opt_state)


def place_state(state: TrainState, mesh) -> TrainState:
    """The state replicated over every device of the mesh."""
    return jax.device_put(state, replicated(mesh))
