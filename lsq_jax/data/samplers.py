"""Data samplers: pure functions of PRNG keys, one key per example.

Every example is drawn from its OWN key and the batch is a `vmap` over the keys. The keys come from
`example_keys(key, step, start, count)`, which folds the training step and the GLOBAL example index into
the run's data key, so a process drawing only its shard [start, start + count) of the global batch gets
exactly the examples a single-process run would draw at those indices: data never depends on the number
of devices or processes.

Sizes (`n_points`, `n_dims`) are static Python ints; `dtype` (default float64) is the dtype of every
floating array returned. Bad options raise `ValueError` naming the field, the value and what is allowed.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "LeastSquaresSample",
    "example_keys",
    "gaussian",
    "least_squares",
    "scale_singular_values",
]


class LeastSquaresSample(NamedTuple):
    """One batch of least-squares problems A x* = b with a starting point x0.

    Attributes:
        a: (B, L, D) the matrices A, one row a_i per point.
        b: (B, L) right-hand sides b = A x* (no noise).
        x_star: (B, D) the solutions x*.
        x0: (B, D) the starting points (independent of x*).
    """

    a: jax.Array
    b: jax.Array
    x_star: jax.Array
    x0: jax.Array


# ---------------------------------------------------------------------------------------------------
# Validation helpers (shared with tasks.py): messages name the field, the value and what is allowed.


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: allowed values are ints > 0")


def _check_positive_number(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name}={value!r} is invalid: allowed values are finite numbers > 0")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: allowed values are True or False")


def _check_kappa(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 1
    ):
        raise ValueError(
            f"{name}={value!r} is invalid: allowed values are finite numbers >= 1 (1 = unchanged)"
        )


def _check_truncation(n_dims_truncated: Any, n_dims: int) -> None:
    # A traced value (the driver may feed the curriculum's dims as an array to avoid recompiling) is
    # used as is; a Python int is checked here.
    if n_dims_truncated is None or isinstance(n_dims_truncated, jax.Array):
        return
    if (
        isinstance(n_dims_truncated, bool)
        or not isinstance(n_dims_truncated, numbers.Integral)
        or not 1 <= n_dims_truncated <= n_dims
    ):
        raise ValueError(
            f"n_dims_truncated={n_dims_truncated!r} is invalid: allowed values are None or ints in "
            f"[1, n_dims={n_dims}]"
        )


def _check_dtype(dtype: Any) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed values are floating dtypes") from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype={dtype!r} is invalid: allowed values are floating dtypes")
    return dt


def _check_keys(keys: jax.Array) -> None:
    """Keys must be a 1-D batch of keys: typed keys (B,) or raw uint32 keys (B, 2)."""
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    batch_ndim = keys.ndim if typed else keys.ndim - 1
    if batch_ndim != 1:
        raise ValueError(
            f"keys with shape {keys.shape} and dtype {keys.dtype} are invalid: allowed is a 1-D batch "
            "of PRNG keys, one per example (see example_keys)"
        )


# ---------------------------------------------------------------------------------------------------
# Keys


def example_keys(key: jax.Array, step: Any, start: Any, count: int) -> jax.Array:
    """Per-example keys fold_in(fold_in(key, step), i) for global example indices i in [start, start+count).

    A process that holds examples [start, start + count) of the global batch draws exactly what a
    single-process run draws at those indices: data never depend on the device count.

    Args:
        key: the run's data key (typed `jax.random.key` or raw `PRNGKey`).
        step: the training step (Python or traced int).
        start: global index of the first example (Python or traced int).
        count: number of examples (static Python int).

    Returns:
        (count,) typed keys, or (count, 2) raw keys if `key` is raw.
    """
    _check_positive_int("count", count)
    step_key = jax.random.fold_in(key, step)
    indices = start + jnp.arange(count)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(indices)


# ---------------------------------------------------------------------------------------------------
# Samplers


def _ordered_dot(u: jax.Array, v: jax.Array) -> jax.Array:
    """sum_d u[..., d] * v[..., d], accumulated in the fixed order d = 0, 1, ..., D - 1.

    XLA may order a reduction differently for different array sizes (a B = 4096 batch gave row norms one
    ulp away from a B = 4 batch); a chain of elementwise adds cannot be reordered, so every example is
    bitwise the same whatever the size of the batch or shard it is drawn in.
    """
    terms = u * v
    total = terms[..., 0]
    for d in range(1, terms.shape[-1]):
        total = total + terms[..., d]
    return total


def _normalize_rows(x: jax.Array) -> jax.Array:
    return x / jnp.sqrt(_ordered_dot(x, x))[..., None]


def _keep_dims(n_dims_truncated: Any, n_dims: int) -> jax.Array:
    """The number of leading coordinates kept, as an int32 array (None: all of them).

    Always an array of one type, so that truncated and untruncated draws share one compiled sampler
    (keeping all coordinates is an exact no-op).
    """
    return jnp.asarray(n_dims if n_dims_truncated is None else n_dims_truncated, jnp.int32)


def _truncate(x: jax.Array, keep_dims: jax.Array) -> jax.Array:
    """Zero the coordinates >= keep_dims of the last axis."""
    keep = jnp.arange(x.shape[-1]) < keep_dims
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def gaussian(
    keys: jax.Array,
    n_points: int,
    n_dims: int,
    *,
    normalize: bool = False,
    scale: float = 1.0,
    n_dims_truncated: int | None = None,
    dtype: Any = jnp.float64,
) -> jax.Array:
    """Gaussian inputs x ~ N(0, I), one (L, D) example per key (the reference\'s `gaussian`).

    Options are applied in the reference's order: `normalize` (unit rows), `scale` (multiply), then
    `n_dims_truncated` (zero the coordinates >= that index; the curriculum's fewer dims).

    Args:
        keys: a batch of B PRNG keys, one per example.
        n_points: L, points (rows) per example.
        n_dims: D, the dimension.
        normalize: divide every row by its Euclidean norm.
        scale: multiply by this (> 0).
        n_dims_truncated: None, or keep only the first n_dims_truncated coordinates (1..D).
        dtype: floating dtype of the result.

    Returns:
        x: (B, L, D) of `dtype`.
    """
    _check_keys(keys)
    _check_positive_int("n_points", n_points)
    _check_positive_int("n_dims", n_dims)
    _check_bool("normalize", normalize)
    _check_positive_number("scale", scale)
    _check_truncation(n_dims_truncated, n_dims)
    dtype = _check_dtype(dtype)
    return _gaussian(keys, _keep_dims(n_dims_truncated, n_dims), jnp.asarray(normalize),
                     jnp.asarray(scale, dtype), n_points=n_points, n_dims=n_dims, dtype=dtype)


# The samplers run as one jitted program per (shape, dtype): called eagerly (evaluation, tests) they
# compile once instead of dispatching every vmapped primitive, and under an outer jit they are inlined.
# Only shapes and the presence of an SVD are static; the options are runtime values, so a new option
# value or a dims-curriculum step does not recompile (multiplying by 1 and jnp.where are exact, so the
# defaults give bit-for-bit the plain draw).
@functools.partial(jax.jit, static_argnames=("n_points", "n_dims", "dtype"))
def _gaussian(keys, keep_dims, normalize, scale, *, n_points, n_dims, dtype):
    def one(key):
        x = jax.random.normal(key, (n_points, n_dims), dtype)
        x = jnp.where(normalize, _normalize_rows(x), x)
        x = x * scale
        return _truncate(x, keep_dims)

    return jax.vmap(one)(keys)


def scale_singular_values(a: jax.Array, kappa: float) -> jax.Array:
    """Map the singular values of each matrix affinely onto [1, kappa] (the reference\'s `scale_cond`).

    Per matrix, with the thin SVD A = U diag(s) V^T (s_max, s_min its largest and smallest):
        s' = 1 + (s - s_min) * (kappa - 1) / (s_max - s_min),    A' = U diag(s') V^T,
    so the smallest singular value becomes 1 and the largest kappa (the 2-norm condition number of A' is
    kappa); U and V are kept. kappa == 1 returns `a` unchanged without an SVD, as the reference does.
    The SVD is one-sided Jacobi in plain jnp (see `_jacobi_svd`), not LAPACK.

    Args:
        a: (L, D) or (B, L, D) matrices of full rank min(L, D) (true with probability 1 for Gaussian
            draws); needs min(L, D) >= 2 when kappa != 1 (with one singular value the map is undefined).
        kappa: static Python number >= 1.

    Returns:
        An array of `a`'s shape and dtype.
    """
    _check_kappa("kappa", kappa)
    if kappa == 1:
        return a
    if a.ndim not in (2, 3):
        raise ValueError(f"a with shape {a.shape} is invalid: allowed shapes are (L, D) or (B, L, D)")
    if min(a.shape[-2:]) < 2:
        raise ValueError(
            f"a with shape {a.shape} is invalid for kappa={kappa!r}: the affine map of the singular "
            "values needs min(L, D) >= 2"
        )
    return _rescale_each(a, jnp.asarray(kappa, a.dtype))


@jax.jit
def _rescale_each(a: jax.Array, kappa: jax.Array) -> jax.Array:
    """_rescale_singular_values of one (L, D) matrix or of each of a (B, L, D) batch."""
    if a.ndim == 2:
        return _rescale_singular_values(a, kappa)
    return jax.vmap(_rescale_singular_values, in_axes=(0, None))(a, kappa)


def _jacobi_svd(a: jax.Array, max_sweeps: int = 30) -> tuple[jax.Array, jax.Array]:
    """One-sided (Hestenes) Jacobi on the columns of one (M, N) matrix, M >= N: (W, V) with A V = W,
    V orthogonal and W's columns orthogonal, so A = U diag(s) V^T with s_k = ||w_k||, u_k = w_k / s_k.

    Each sweep rotates every pair of columns (p, q), p < q, in a fixed order, by the plane rotation
    that makes them orthogonal; a pair already orthogonal to within N eps (|w_p . w_q| <= N eps
    ||w_p|| ||w_q||) is left exactly as it is. The sweeps stop after the first that changes nothing,
    so each matrix's result does not depend on the batch it is vmapped in. Gaussian matrices take at
    most 4 sweeps at 12 x 3, 6 at 20 x 5 and 8 at 40 x 20 (the last, unchanged one included).

    Plain jnp, no LAPACK: XLA's CPU LAPACK kernels run a batch on the thread pool they are called from,
    and two of them at once can wait on each other for good.
    """
    m, n = a.shape
    tol = n * jnp.finfo(a.dtype).eps
    pairs = [(p, q) for p in range(n) for q in range(p + 1, n)]
    first, second = (jnp.asarray(index, jnp.int32) for index in zip(*pairs))

    def pair(i, state):  # wv (N, M + N): row k holds column k of W, then column k of V
        wv, changed = state
        p, q = first[i], second[i]
        w_p, w_q = wv[p, :m], wv[q, :m]
        alpha, beta, gamma = _ordered_dot(w_p, w_p), _ordered_dot(w_q, w_q), _ordered_dot(w_p, w_q)
        turn = jnp.abs(gamma) > tol * jnp.sqrt(alpha * beta)
        zeta = (beta - alpha) / (2 * jnp.where(turn, gamma, 1))
        t = jnp.where(zeta >= 0, 1, -1) / (jnp.abs(zeta) + jnp.sqrt(1 + zeta * zeta))
        c = jnp.where(turn, 1 / jnp.sqrt(1 + t * t), 1)
        s = jnp.where(turn, c * t, 0)
        wv = wv.at[p].set(c * wv[p] - s * wv[q]).at[q].set(s * wv[p] + c * wv[q])
        return wv, changed | turn

    def sweep(state):
        wv, count, _ = state
        wv, changed = jax.lax.fori_loop(0, first.size, pair, (wv, jnp.zeros((), bool)))
        return wv, count + 1, changed

    def again(state):
        return state[2] & (state[1] < max_sweeps)

    start = (jnp.concatenate([a.T, jnp.eye(n, dtype=a.dtype)], axis=1), 0, jnp.ones((), bool))
    wv, _, _ = jax.lax.while_loop(again, sweep, start)
    return wv[:, :m].T, wv[:, m:].T


def _rescale_singular_values(a: jax.Array, kappa: Any) -> jax.Array:
    """scale_singular_values of one (L, D) matrix without the checks; kappa may be traced."""
    tall = a.shape[0] >= a.shape[1]
    w, v = _jacobi_svd(a if tall else a.T)  # A = W V^T (tall) or A = V W^T (wide)
    s = jnp.sqrt(_ordered_dot(w.T, w.T))
    s_max, s_min = jnp.max(s), jnp.min(s)
    ratio = (1 + (s - s_min) * ((kappa - 1) / (s_max - s_min))) / s
    # U diag(s') V^T = sum_k (s'_k / s_k) w_k v_k^T, summed in a fixed order (see _ordered_dot).
    left, right = (w * ratio, v) if tall else (v, w * ratio)
    return _ordered_dot(left[:, None, :], right[None, :, :])


def least_squares(
    keys: jax.Array,
    n_points: int,
    n_dims: int,
    *,
    normalize_a: bool = False,
    scale_cond: float = 1.0,
    normalize_x: bool = False,
    scale_target: float = 1.0,
    n_dims_truncated: int | None = None,
    dtype: Any = jnp.float64,
    scale_cond_max: float | None = None,
    scale_target_max: float | None = None,
) -> LeastSquaresSample:
    """Least-squares problems, one per key (the reference\'s `least_squares`).

    Per example, in the reference's order: draw A ~ N(0, I) (L, D); `normalize_a` (unit rows);
    `scale_cond` = kappa (singular values mapped onto [1, kappa], see `scale_singular_values`); draw
    x* ~ N(0, I_D), `normalize_x` then times `scale_target`; the same for x0 (independent of x*);
    `n_dims_truncated` zeroes the trailing coordinates of A, x* and x0 (after the rescaling, so it
    changes the spectrum, as in the reference); b = A x* last, no noise. A, x* and x0 are disjoint rows
    of one (L + 2, D) standard normal draw from the example's key, hence independent.

    Ranges: with `scale_cond_max` (`scale_target_max`) each example's kappa (target scale) is drawn
    log-uniform in [scale_cond, scale_cond_max] ([scale_target, scale_target_max]): lo (hi / lo)^u with
    u ~ U[0, 1) from fold_in(key, 1) (kappa u[0], scale u[1]), so the normal draw is the same as without
    a range; A's singular values are then mapped onto [1, kappa] whatever kappa is (1 included).

    Args:
        keys: a batch of B PRNG keys, one per example.
        n_points: L, rows of A.
        n_dims: D, columns of A.
        normalize_a: unit rows of A.
        scale_cond: kappa >= 1; 1 leaves A unchanged. Needs min(L, D) >= 2 otherwise.
        normalize_x: unit x* and x0.
        scale_target: multiply x* and x0 by this (> 0).
        n_dims_truncated: None, or keep only the first n_dims_truncated coordinates (1..D).
        dtype: floating dtype of every array.
        scale_cond_max, scale_target_max: None (a fixed value), or the top of a log-uniform range whose
            bottom is scale_cond, scale_target (>= it).

    Returns:
        LeastSquaresSample(a (B, L, D), b (B, L), x_star (B, D), x0 (B, D)).
    """
    _check_keys(keys)
    _check_positive_int("n_points", n_points)
    _check_positive_int("n_dims", n_dims)
    _check_bool("normalize_a", normalize_a)
    _check_kappa("scale_cond", scale_cond)
    _check_bool("normalize_x", normalize_x)
    _check_positive_number("scale_target", scale_target)
    kappa_hi = _check_range("scale_cond_max", scale_cond_max, scale_cond)
    scale_hi = _check_range("scale_target_max", scale_target_max, scale_target)
    if kappa_hi != 1 and min(n_points, n_dims) < 2:
        raise ValueError(
            f"scale_cond={scale_cond!r}, scale_cond_max={scale_cond_max!r} is invalid with n_points={n_points}, "
            f"n_dims={n_dims}: rescaling the singular values needs min(n_points, n_dims) >= 2 (or kappa 1)"
        )
    _check_truncation(n_dims_truncated, n_dims)
    dtype = _check_dtype(dtype)
    return _least_squares(keys, _keep_dims(n_dims_truncated, n_dims), jnp.asarray(normalize_a),
                          jnp.asarray(scale_cond, dtype), jnp.asarray(normalize_x),
                          jnp.asarray(scale_target, dtype), jnp.asarray(kappa_hi, dtype), jnp.asarray(scale_hi, dtype),
                          n_points=n_points, n_dims=n_dims, rescale=kappa_hi != 1,
                          ranges=(kappa_hi != scale_cond, scale_hi != scale_target), dtype=dtype)


def _check_range(name: str, top: Any, bottom: float) -> float:
    """The top of a range whose bottom is `bottom` (None: the bottom itself, a fixed value)."""
    if top is None:
        return bottom
    _check_positive_number(name, top)
    if top < bottom:
        raise ValueError(f"{name}={top!r} is invalid: allowed values are None or numbers >= {bottom!r}")
    return top


def _log_uniform(lo: jax.Array, hi: jax.Array, u: jax.Array) -> jax.Array:
    """lo (hi / lo)^u: for u ~ U[0, 1), log-uniform on [lo, hi)."""
    return lo * jnp.exp(u * jnp.log(hi / lo))


@functools.partial(jax.jit, static_argnames=("n_points", "n_dims", "rescale", "ranges", "dtype"))
def _least_squares(keys, keep_dims, normalize_a, scale_cond, normalize_x, scale_target, kappa_hi, scale_hi, *,
                   n_points, n_dims, rescale, ranges, dtype):
    def vector(v, scale):
        v = jnp.where(normalize_x, _normalize_rows(v), v)
        return v * scale

    def one(key):
        # A, x* and x0 are disjoint rows of one standard normal draw (independent; one RNG call is
        # cheaper to compile and run than three).
        z = jax.random.normal(key, (n_points + 2, n_dims), dtype)
        kappa, scale = scale_cond, scale_target
        if any(ranges):  # a second stream, so the normal draw is the same with and without a range
            u = jax.random.uniform(jax.random.fold_in(key, 1), (2,), dtype)
            kappa = _log_uniform(scale_cond, kappa_hi, u[0]) if ranges[0] else kappa
            scale = _log_uniform(scale_target, scale_hi, u[1]) if ranges[1] else scale
        a = jnp.where(normalize_a, _normalize_rows(z[:n_points]), z[:n_points])
        if rescale:  # kappa == 1 means no SVD at all, as in the reference
            a = _rescale_singular_values(a, kappa)
        x_star = vector(z[n_points], scale)
        x0 = vector(z[n_points + 1], scale)
        a = _truncate(a, keep_dims)
        x_star = _truncate(x_star, keep_dims)
        x0 = _truncate(x0, keep_dims)
        return LeastSquaresSample(a=a, b=_ordered_dot(a, x_star), x_star=x_star, x0=x0)

    return jax.vmap(one)(keys)
