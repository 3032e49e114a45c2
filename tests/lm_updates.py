"""One LM iteration returning the new parameters, theta + step where the step was accepted and theta
otherwise, computed on the flat parameters (the tests' reference for what the transform's updates apply)."""
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lsq_jax.optim import lm


def _moved(params, step, metrics):
    theta, unravel = ravel_pytree(params)
    return unravel(jnp.where(metrics["accepted"], theta + step, theta))


def lm_update(residual_fn, params, batch, state, n_chunks: int = 1, **options):
    """(new_params, new_state, metrics) of lm.lm_iteration (Cholesky), which takes the same arguments."""
    step, new_state, metrics = lm.lm_iteration(residual_fn, params, batch, state, n_chunks, **options)
    return _moved(params, step, metrics), new_state, metrics


def lm_update_cg(residual_fn, params, batch, state, n_chunks: int = 1, **options):
    """(new_params, new_state, metrics) of lm.lm_iteration_cg, which takes the same arguments."""
    step, new_state, metrics = lm.lm_iteration_cg(residual_fn, params, batch, state, n_chunks, **options)
    return _moved(params, step, metrics), new_state, metrics
