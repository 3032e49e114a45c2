"""Gradient statistics (``grad_stats``) over many mini-batches.

Every ``log_every`` steps the reference draws 64 fresh mini-batches, takes the gradient of the task loss
on each (unclipped, no L1 term), flattens them into a (64, P) matrix and reports the statistics below;
the adaptive learning rate consumes ``gradient_cosine_mean``. The reference spends 64 backward passes;
the train loop builds the (64, P) matrix one mini-batch at a time (on CPU the activations of many
mini-batches at once outgrow the cache), and :func:`batched_gradients` does it in one vmapped call
(optionally in chunks), which suits an accelerator with memory to spare.

Key names are the reference's (``compute_gradient_stats`` / ``compute_gradient_stats_gt``), so logs
compare one to one. All functions are pure and jittable; the statistics are 0-d arrays.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

__all__ = [
    "batched_gradients",
    "batched_gradient_stats",
    "consecutive_cosines",
    "cosines_vs",
    "gradient_stats",
    "gradient_stats_vs",
]

# torch.nn.functional.cosine_similarity clamps each vector's norm below at eps = 1e-8 before dividing.
_COSINE_EPS = 1e-8


def _prefixed(prefix: str) -> str:
    # The reference appends "_" to a non-empty prefix unless it already ends with one.
    if prefix and not prefix.endswith("_"):
        return prefix + "_"
    return prefix


def _unit_rows(x: jax.Array) -> jax.Array:
    # Normalise first, then take the dot product, as torch does (keeps the result in [-1, 1]).
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norms, _COSINE_EPS)


def _check_matrix(grads_NxP: jax.Array, min_rows: int) -> None:
    if grads_NxP.ndim != 2 or grads_NxP.shape[0] < min_rows:
        raise ValueError(f"grads_NxP must have shape (N, P) with N >= {min_rows}; got {grads_NxP.shape}")


def consecutive_cosines(grads_NxP: jax.Array) -> jax.Array:
    """Cosine similarity of each consecutive pair of rows: cos(g_{i-1}, g_i), i = 1..N-1, shape (N-1,)."""
    unit_NxP = _unit_rows(grads_NxP)
    return jnp.sum(unit_NxP[:-1] * unit_NxP[1:], axis=-1)


def cosines_vs(grads_NxP: jax.Array, gt_P: jax.Array) -> jax.Array:
    """Cosine similarity of every row with a reference gradient ``gt_P``, shape (N,)."""
    return jnp.sum(_unit_rows(grads_NxP) * _unit_rows(gt_P)[None, :], axis=-1)


def gradient_stats(grads_NxP: jax.Array, prefix: str = "") -> dict[str, jax.Array]:
    """The reference's ``compute_gradient_stats`` on N flattened gradients.

    With g_i the rows and c_i = cos(g_{i-1}, g_i) the N - 1 consecutive cosines:

    * ``gradient_cosine_mean`` = mean_i c_i; ``gradient_cosine_variance`` = unbiased variance of c_i;
    * ``gradient_l1_norm`` = mean_i ||g_i||_1; ``gradient_l2_norm`` = mean_i ||g_i||_2;
    * ``gradient_mean`` = mean_j (mean_i |g_ij|);
    * ``gradient_variance`` = mean_j (unbiased variance over i of g_ij).

    Args:
        grads_NxP: (N, P) gradients, N >= 3 (the cosine variance needs two cosines).
        prefix: prepended to every key as ``f"{prefix}_"`` (the reference's rule), e.g. "ema".

    Returns:
        A dict of 0-d arrays under the reference's key names.
    """
    _check_matrix(grads_NxP, 3)
    p = _prefixed(prefix)
    cos = consecutive_cosines(grads_NxP)
    return {
        f"{p}gradient_l1_norm": jnp.mean(jnp.sum(jnp.abs(grads_NxP), axis=1)),
        f"{p}gradient_l2_norm": jnp.mean(jnp.linalg.norm(grads_NxP, axis=1)),
        f"{p}gradient_mean": jnp.mean(jnp.mean(jnp.abs(grads_NxP), axis=0)),
        f"{p}gradient_variance": jnp.mean(jnp.var(grads_NxP, axis=0, ddof=1)),
        f"{p}gradient_cosine_mean": jnp.mean(cos),
        f"{p}gradient_cosine_variance": jnp.var(cos, ddof=1),
    }


def gradient_stats_vs(grads_NxP: jax.Array, gt_P: jax.Array, prefix: str = "gt") -> dict[str, jax.Array]:
    """The reference's ``compute_gradient_stats_gt``: statistics against a reference gradient.

    With c_i = cos(g_i, gt) and d_ij = |g_ij - gt_j|:

    * ``gt_gradient_cosine_mean`` / ``gt_gradient_cosine_variance``: mean and unbiased variance of c_i;
    * ``gt_gradient_mean`` = mean_j (mean_i d_ij);
    * ``gt_gradient_variance`` = mean_j (unbiased variance over i of d_ij).

    Args:
        grads_NxP: (N, P) gradients, N >= 2.
        gt_P: (P,) the reference ("ground-truth", e.g. full-batch) gradient.
        prefix: key prefix, "gt" as in the reference's training script.

    Returns:
        A dict of 0-d arrays under the reference's key names.
    """
    _check_matrix(grads_NxP, 2)
    p = _prefixed(prefix)
    cos = cosines_vs(grads_NxP, gt_P)
    diffs_NxP = jnp.abs(grads_NxP - gt_P[None, :])
    return {
        f"{p}gradient_mean": jnp.mean(jnp.mean(diffs_NxP, axis=0)),
        f"{p}gradient_variance": jnp.mean(jnp.var(diffs_NxP, axis=0, ddof=1)),
        f"{p}gradient_cosine_mean": jnp.mean(cos),
        f"{p}gradient_cosine_variance": jnp.var(cos, ddof=1),
    }


def batched_gradients(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    xs: Any,
    *,
    chunk_size: Optional[int] = None,
) -> jax.Array:
    """Gradients of N mini-batch losses in one vectorised call, flattened to (N, P).

    Row i is ``ravel_pytree(jax.grad(loss_fn)(params, x_i))`` where x_i is slice i of every leaf of
    ``xs`` along axis 0. The train loop passes ``loss_fn(params, key) -> scalar`` (which draws its own
    mini-batch from the key: the task loss, unclipped and without the L1 term) and
    ``xs = jax.random.split(key, 64)``; a pytree of pre-drawn batches works the same way. The column
    order is ``ravel_pytree``'s (leaf order); the statistics do not depend on it.

    Args:
        loss_fn: ``(params, x) -> scalar`` loss.
        params: the parameter pytree.
        xs: a pytree whose leaves share a leading axis N (keys, or batches).
        chunk_size: None vectorises all N at once; an integer k computes k at a time with
            ``jax.lax.map(..., batch_size=k)`` to bound activation memory.

    Returns:
        An (N, P) array of gradients.
    """
    grad_fn = jax.grad(loss_fn)

    def flat_grad(x):
        return ravel_pytree(grad_fn(params, x))[0]

    if chunk_size is None:
        return jax.vmap(flat_grad)(xs)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size = {chunk_size!r} is not allowed; allowed: None or an integer >= 1")
    return jax.lax.map(flat_grad, xs, batch_size=chunk_size)


def batched_gradient_stats(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    xs: Any,
    *,
    chunk_size: Optional[int] = None,
    prefix: str = "",
) -> dict[str, jax.Array]:
    """``gradient_stats(batched_gradients(loss_fn, params, xs))``: the per-``log_every`` measurement.

    Its ``gradient_cosine_mean`` is the adaptive learning rate's ``grad_metric``.
    """
    return gradient_stats(batched_gradients(loss_fn, params, xs, chunk_size=chunk_size), prefix=prefix)
