"""Least squares min_x ||A x - b||^2 / (2L), the math: the gradient, gradient descent, prefix gradients, and
the token layouts of the one-step and k-step tasks. Plain functions, batched over any leading axes."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def least_squares_gradient(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    """g = A^T (A x - b) / L, the explicit_gradient target (no factor 2).

    Args:
        a: (..., L, D). b: (..., L). x: (..., D).

    Returns:
        (..., D).
    """
    residual = jnp.einsum("...ld,...d->...l", a, x) - b
    return jnp.einsum("...ld,...l->...d", a, residual) / a.shape[-2]


def prefix_gradients(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    """Gradients over the first j rows, A_j^T (A_j x - b_j) / j for j = 1..L (explicit_gradient 'all').

    Args:
        a: (..., L, D). b: (..., L). x: (..., D).

    Returns:
        (..., L, D); entry j - 1 is the gradient over rows 1..j.
    """
    residual = jnp.einsum("...ld,...d->...l", a, x) - b
    partial_sums = jnp.cumsum(a * residual[..., None], axis=-2)
    counts = jnp.arange(1, a.shape[-2] + 1, dtype=a.dtype)
    return partial_sums / counts[:, None]


def gradient_descent(a: jax.Array, b: jax.Array, x0: jax.Array, n_iters: int, eta: float) -> jax.Array:
    """x_k after k steps of x <- x - eta A^T (A x - b) / L from x0 (multistep_gd).

    Args:
        a: (..., L, D). b: (..., L). x0: (..., D). n_iters: k >= 0 (static). eta: step size.

    Returns:
        x_k, (..., D).
    """
    eta = jnp.asarray(eta, x0.dtype)
    return jax.lax.fori_loop(0, n_iters, lambda _, x: x - eta * least_squares_gradient(a, b, x), x0)


def explicit_gradient_inputs(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    """Tokens of explicit_gradient: token 0 = [x, 0], tokens 1..L = [a_i, b_i].

    Evaluation rebuilds the input of a learned one-step model from (A, b, x_t) with this.

    Args:
        a: (..., L, D). b: (..., L). x: (..., D).

    Returns:
        (..., L + 1, D + 1).
    """
    first = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], axis=-1)
    rows = jnp.concatenate([a, b[..., None]], axis=-1)
    return jnp.concatenate([first[..., None, :], rows], axis=-2)


def explicit_gradient_normalization(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """explicit_gradient's tokens with the problem at unit scale, and the factor that scales the gradient back.

    The gradient g = A^T (A x0 - b) / L is homogeneous in the problem's two scales: with A -> s A and
    x -> t x (x0 and x*, so b -> s t b), g -> s^2 t g. Take s = rms(A) and t = beta, where beta^2 is the mean
    of x0's and (b / s)'s mean squares (both in units of x; > 0 unless x0 = b = 0). Dividing the rows by
    alpha = s sqrt(L), x0 by beta and b by alpha beta gives a problem whose A^T (A x0 - b), a plain sum over
    rows with no 1/L, times s^2 beta is g, exactly. A model fed the normalised tokens and scaled back by that
    factor is equivariant under both scalings, and what it must compute does not depend on the number of
    rows: a sum of one function of each row (the same rows repeated k times give the same sum of k times as
    many terms, each 1/k as large). A zero scale is taken as 1.

    Args:
        tokens: (..., L + 1, D + 1), token 0 = [x0, 0], tokens 1..L = [a_i, b_i].

    Returns:
        (the normalised tokens, of the same shape; s^2 beta, of shape (..., 1, 1)).
    """
    a, b, x0 = tokens[..., 1:, :-1], tokens[..., 1:, -1], tokens[..., 0, :-1]
    s = _root_mean(a.reshape(*a.shape[:-2], -1) ** 2)
    beta = _root_mean(jnp.stack([jnp.mean(x0 ** 2, axis=-1), jnp.mean((b / s[..., None]) ** 2, axis=-1)], axis=-1))
    alpha = s * jnp.sqrt(jnp.asarray(a.shape[-2], a.dtype))
    first = tokens[..., :1, :] / beta[..., None, None]
    rows = jnp.concatenate([a / alpha[..., None, None], (b / (alpha * beta)[..., None])[..., None]], axis=-1)
    return jnp.concatenate([first, rows], axis=-2), (s ** 2 * beta)[..., None, None]


def _root_mean(squares: jax.Array) -> jax.Array:
    """The root of the mean over the last axis, 1 where it is 0."""
    scale = jnp.sqrt(jnp.mean(squares, axis=-1))
    return jnp.where(scale > 0, scale, 1)


def multistep_gd_inputs(a: jax.Array, b: jax.Array, x0: jax.Array) -> jax.Array:
    """Tokens of multistep_gd: tokens 0..L-1 = [a_i, b_i], token L = [x0, 0] (x0 LAST.

    Args:
        a: (..., L, D). b: (..., L). x0: (..., D).

    Returns:
        (..., L + 1, D + 1).
    """
    rows = jnp.concatenate([a, b[..., None]], axis=-1)
    last = jnp.concatenate([x0, jnp.zeros_like(x0[..., :1])], axis=-1)
    return jnp.concatenate([rows, last[..., None, :]], axis=-2)
