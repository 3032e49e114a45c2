"""Statistics of least-squares iterates in numerical-analysis units, and their JSON form.

Per problem, then as the median and the 10th / 90th percentiles over problems:

    forward error       e_t = ||x_t - x*|| / ||x*||
    relative residual   ||A x_t - b|| / ||b||
    distance to GD      ||x_t - x^GD_{k t}|| / ||x*||     (k = GD steps that one iteration stands for)
    floor               median of e_t over the last 10% of the iterations, also / (kappa(A) eps)
    contraction         geometric mean of e_{t+1} / e_t over the window just before the floor, next to
                        the theory (GD: max_i |1 - eta lambda_i(A^T A / L)|)
    iterations to       the first t at which the median forward error is <= 1e-6, 1e-10, 1e-14

Also the spectra of the problems (singular values, kappa(A), the extreme eigenvalues of A^T A / L), the
theoretical contraction per iteration of the classical methods, and the iterations a report keeps
(`report_times`). JSON values: floats, or None where not finite (JSON has no NaN/inf).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "THRESHOLDS",
    "report_times",
    "singular_values",
    "trajectory_statistics",
]

THRESHOLDS = (1e-6, 1e-10, 1e-14)  # forward-error targets of "iterations to"
TAIL_FRACTION = 0.1  # the floor is read over this last fraction of the iterations
SETTLE_MARGIN = 100.0  # a trajectory has reached its floor once e_t <= SETTLE_MARGIN * floor


def threshold_key(threshold: float) -> str:
    """The report key of a forward-error threshold: 1e-06, 1e-10, 1e-14."""
    return f"{threshold:.0e}"


# ---------------------------------------------------------------------------------------------------
# Problem spectra


def singular_values(a_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values of each A, descending (B, D), and the mask of the numerically nonzero ones.

    Nonzero means s > s_max * max(L, D) * eps (numpy's `matrix_rank` rule), so the exactly zero columns
    of a dims-truncated A do not count as a tiny singular value.
    """
    s = jnp.linalg.svd(a_BxLxD, compute_uv=False)
    eps = jnp.finfo(a_BxLxD.dtype).eps
    nonzero = s > s[..., :1] * max(a_BxLxD.shape[-2:]) * eps
    return s, nonzero


def gram_extremes(a_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lambda_min, lambda_max) of A^T A / L per problem, lambda_min over the nonzero spectrum."""
    s, nonzero = singular_values(a_BxLxD)
    n = a_BxLxD.shape[-2]
    lam_max = s[..., 0] ** 2 / n
    lam_min = jnp.min(jnp.where(nonzero, s, jnp.inf), axis=-1) ** 2 / n
    return lam_min, lam_max


def cond_b(a_BxLxD: jax.Array) -> jax.Array:
    """kappa(A) per problem (B,): s_max over the smallest nonzero singular value."""
    s, nonzero = singular_values(a_BxLxD)
    return s[:, 0] / jnp.min(jnp.where(nonzero, s, jnp.inf), axis=-1)


def theory_b(follows: str | None, k: int, eta_b, lam_min, lam_max, kappa_b):
    """Theoretical contraction per iteration, per problem, of the classical iteration `follows`
    ('gd' for k steps, 'optimal_gd', 'cg'), or None."""
    if follows == "gd":
        return jnp.maximum(jnp.abs(1 - eta_b * lam_min), jnp.abs(1 - eta_b * lam_max)) ** k
    if follows == "optimal_gd":
        return (lam_max - lam_min) / (lam_max + lam_min)
    if follows == "cg":
        return (kappa_b - 1) / (kappa_b + 1)
    return None


# ---------------------------------------------------------------------------------------------------
# Errors and their trajectories


def as_error(e: jax.Array) -> jax.Array:
    """NaN -> +inf: a diverged iterate (inf - inf = NaN) is infinitely wrong, not "missing"."""
    return jnp.where(jnp.isnan(e), jnp.inf, e)


def relative_norm(diff: jax.Array, ref: jax.Array) -> jax.Array:
    return as_error(jnp.linalg.norm(diff, axis=-1) / jnp.linalg.norm(ref, axis=-1))


def relative_error_b(pred, target, scale):
    """||pred - target|| / ||scale|| per problem."""
    return jnp.linalg.norm(pred - target, axis=-1) / jnp.linalg.norm(scale, axis=-1)


def error_ratio(num_b, den_b):
    """num / den per problem; 1 where both are exactly zero (small problems can land on x* bit for bit)."""
    num_b, den_b = as_error(num_b), as_error(den_b)
    both_zero = (num_b == 0) & (den_b == 0)
    return jnp.where(both_zero, 1.0, num_b / jnp.where(both_zero, 1.0, den_b))


@functools.partial(jax.jit, static_argnames=("k",))
def trajectory_errors(xs, a, b, x_star, x_gd, *, k):
    """Forward error, relative residual and distance to GD (T + 1, B) of iterates xs (T + 1, B, D)."""
    n_t = xs.shape[0]
    gd_t = x_gd[: k * (n_t - 1) + 1 : k]
    residual = jnp.einsum("bld,tbd->tbl", a, xs) - b
    return {
        "forward_error": relative_norm(xs - x_star, jnp.broadcast_to(x_star, xs.shape)),
        "residual": relative_norm(residual, jnp.broadcast_to(b, residual.shape)),
        "distance_to_gd": relative_norm(xs - gd_t, jnp.broadcast_to(x_star, xs.shape)),
    }


@functools.partial(jax.jit, static_argnames=("thresholds", "tail_fraction", "settle_margin"))
def trajectory_statistics(errors_TxB: jax.Array, *, thresholds: Sequence[float] = THRESHOLDS,
                          tail_fraction: float = TAIL_FRACTION, settle_margin: float = SETTLE_MARGIN
                          ) -> dict[str, jax.Array]:
    """Floor, contraction and iterations-to-threshold of error trajectories e_t (rows t = 0..T, B problems).

    Definitions (NaN entries count as +inf: a diverged iterate):
      * quantiles: the 10th, 50th and 90th percentiles over problems at every t (linear interpolation,
        as numpy), (3, T + 1).
      * floor_b: the median of e_t over the last n_tail = max(1, ceil(tail_fraction T)) iterates.
      * settled_b: the trajectory descends to within settle_margin of a finite floor before the tail,
        from above that margin: the first t with e_t <= settle_margin * floor_b, end_b, is before the
        tail and > 0. Otherwise (still converging, diverging, or never `settle_margin` above its floor,
        like a constant iterate) end_b = T.
      * contraction_b: the geometric mean of e_{t+1} / e_t over [start_b, end_b], start_b = end_b // 2
        (the later half of the descent, past the transient of the fast components; for an unsettled
        trajectory the later half of all iterations): (e_end / e_start)^(1 / (end - start)), 1 for a
        constant iterate; NaN when e_start = 0 or both ends are infinite.
      * iters_to[i]: the first t at which the MEDIAN forward error is <= thresholds[i], -1 if never.

    Returns:
        dict with 'quantiles' (3, T + 1), 'floor_b' (B,), 'settled_b' (B,) bool, 'contraction_b' (B,),
        'iters_to' (len(thresholds),) int.
    """
    e = as_error(errors_TxB)
    n_t = e.shape[0]
    n_iters = n_t - 1
    quantiles = jnp.quantile(e, jnp.asarray([0.1, 0.5, 0.9], e.dtype), axis=1)
    n_tail = max(1, math.ceil(tail_fraction * n_iters))
    floor_b = jnp.median(e[n_t - n_tail:], axis=0)
    before_tail = (jnp.arange(n_t) < n_t - n_tail)[:, None]
    reached = before_tail & (e <= settle_margin * floor_b) & jnp.isfinite(floor_b)
    first = jnp.argmax(reached, axis=0)
    settled_b = jnp.any(reached, axis=0) & (first > 0)
    end_b = jnp.where(settled_b, first, n_iters)
    start_b = end_b // 2
    columns = jnp.arange(e.shape[1])
    e_start, e_end = e[start_b, columns], e[end_b, columns]
    length = (end_b - start_b).astype(e.dtype)
    valid = (end_b > start_b) & (e_start > 0)
    ratio = jnp.where(valid, e_end / jnp.where(valid, e_start, 1), 1)
    contraction_b = jnp.where(valid, ratio ** (1 / jnp.where(valid, length, 1)), jnp.nan)
    median = quantiles[1]
    hit = median[:, None] <= jnp.asarray(thresholds, e.dtype)[None, :]
    iters_to = jnp.where(jnp.any(hit, axis=0), jnp.argmax(hit, axis=0), -1)
    return {"quantiles": quantiles, "floor_b": floor_b, "settled_b": settled_b,
            "contraction_b": contraction_b, "iters_to": iters_to}


# ---------------------------------------------------------------------------------------------------
# JSON values


def json_float(x) -> float | None:
    """A float, or None when not finite (JSON has no NaN/inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def quantile_dict(v_B) -> dict[str, float | None]:
    """{'median', 'p10', 'p90'} over problems (NaN counts as +inf)."""
    v = np.asarray(as_error(jnp.asarray(v_B)))
    with np.errstate(invalid="ignore"):  # inf - inf between two diverged problems: None below
        p10, med, p90 = np.percentile(v, [10, 50, 90]) if v.size else (np.nan,) * 3
    return {"median": json_float(med), "p10": json_float(p10), "p90": json_float(p90)}


def nanmedian(v_B) -> float | None:
    """The median over the problems whose value is not NaN; None when there is none."""
    v = np.asarray(v_B, dtype=float)
    v = v[~np.isnan(v)]
    return json_float(np.median(v)) if v.size else None


def json_ratio(num, den) -> float | None:
    """num / den of two JSON values, None when either is None or den is 0."""
    if num is None or den is None or den == 0:
        return None
    return json_float(num / den)


def curves(quantiles_3xT, times) -> dict[str, list]:
    """The (p10, median, p90) rows of a (3, T + 1) array at the iterations `times`, as JSON lists."""
    q = np.asarray(quantiles_3xT)[:, np.asarray(times)]
    return {"median": [json_float(v) for v in q[1]], "p10": [json_float(v) for v in q[0]],
            "p90": [json_float(v) for v in q[2]]}


def report_times(n_iters: int, n_points: int | None = 64) -> list[int]:
    """The iterations kept in a report: t = 0, T and ~n_points log-spaced plus ~n_points evenly spaced
    (all t when n_points is None or T is small), so the curves read on a log or a linear axis."""
    if n_points is None or n_iters <= 2 * n_points:
        return list(range(n_iters + 1))
    log_t = np.round(np.logspace(0, math.log10(n_iters), n_points)).astype(int)
    lin_t = np.round(np.linspace(0, n_iters, n_points + 1)).astype(int)
    return sorted(set(log_t.tolist()) | set(lin_t.tolist()) | {0, n_iters})
