"""The training state: parameters, optimizer state and the step; how it starts and where it lives."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax.config.experiment import Experiment
from lsq_jax.data.keys import run_keys
from lsq_jax.mesh import replicated
from lsq_jax.models.backbone import abstract_params, init_params
from lsq_jax.optim import lm, recipe


class TrainState(NamedTuple):
    """step: training iterations done (skipped ones included); params; opt_state (EMA, LR controller,
    skip counter live in it)."""

    step: jax.Array
    params: Any
    opt_state: Any


def count_params(exp: Experiment) -> int:
    """P, the model's parameter count (from shapes alone: nothing is allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(exp.model)))


def uses_lm(exp: Experiment) -> bool:
    """Whether the run trains with Levenberg-Marquardt (optimizer 'lm', after its lm_after recipe steps)."""
    return exp.optim.optimizer == "lm"


def init_state(exp: Experiment, start: int = 0) -> TrainState:
    """Parameters, step 0 and the optimizer state: the recipe's, or with optimizer 'lm' {'adam': the
    recipe's (its phase of a hybrid), 'lm': lm.LMState}. `start` k > 0 draws the parameters of the run's
    k-th other initialisation (optim.lm_restarts) from the parameter key folded with k."""
    key = run_keys(exp.seed)["params"]
    params = init_params(exp.model, jax.random.fold_in(key, start) if start else key)
    opt_state = recipe.make_optimizer(exp.optim).init(params)
    if uses_lm(exp):
        opt_state = {"adam": opt_state,
                     "lm": lm.init_lm_state(count_params(exp), exp.model.jnp_dtype, exp.optim.lm_damping)}
    return TrainState(step=jnp.zeros((), jnp.int64 if jax.config.x64_enabled else jnp.int32),
                      params=params, opt_state=opt_state)


def place_state(state: TrainState, mesh) -> TrainState:
    """The state replicated over every device of the mesh."""
    return jax.device_put(state, replicated(mesh))
