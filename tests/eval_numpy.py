"""Independent numpy computations (loops over problems and iterations) and exact stand-in models that the
lsq_jax.eval tests compare with."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.data.lsq import gradient_descent, least_squares_gradient
from lsq_jax.data.samplers import LeastSquaresSample
from lsq_jax.eval.solvers import run_solver
from lsq_jax.eval.stats import THRESHOLDS
from lsq_jax.plan.report import make_report_plan

EPS = np.finfo(np.float64).eps


def conditioned_problems(seed, bsz, n, d, kappa, truncate=None):
    """A with singular values mapped onto [1, kappa] (kappa = 1: plain Gaussian), x*, x0 ~ N(0, I), b = A x*.

    `truncate` zeroes the trailing coordinates of A, x* and x0 (rank-deficient A)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((bsz, n, d))
    if kappa != 1:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        lo, hi = s.min(-1, keepdims=True), s.max(-1, keepdims=True)
        a = np.einsum("bld,bd,bde->ble", u, 1 + (kappa - 1) * (s - lo) / (hi - lo), vt)
    x_star, x0 = rng.standard_normal((bsz, d)), rng.standard_normal((bsz, d))
    if truncate is not None:
        a[..., truncate:] = 0
        x_star[..., truncate:] = 0
        x0[..., truncate:] = 0
    return LeastSquaresSample(a, np.einsum("bld,bd->bl", a, x_star), x_star, x0)


def gram_eigs(a):
    return np.linalg.eigvalsh(np.einsum("bld,ble->bde", a, a) / a.shape[1])


def numpy_gd(a, b, x0, eta_b, n_iters):
    """Iterates (T + 1, B, D) of x <- x - eta_b A^T (A x - b) / L, one problem at a time."""
    out = np.zeros((n_iters + 1,) + x0.shape)
    for i in range(a.shape[0]):
        x = x0[i].copy()
        out[0, i] = x
        for t in range(n_iters):
            x = x - eta_b[i] * a[i].T @ (a[i] @ x - b[i]) / a.shape[1]
            out[t + 1, i] = x
    return out


def numpy_cgls(a, b, x0, n_iters):
    """CGLS (Bjorck's form), one problem at a time, held once ||A^T r|| <= eps ||A||_F (||A||_F ||x|| + ||b||)."""
    out = np.zeros((n_iters + 1,) + x0.shape)
    for i in range(a.shape[0]):
        ai, bi, x = a[i], b[i], x0[i].copy()
        norm_a = np.linalg.norm(ai)
        r = bi - ai @ x
        s = ai.T @ r
        p, gamma = s.copy(), s @ s
        stopped = np.sqrt(gamma) <= EPS * norm_a * (norm_a * np.linalg.norm(x) + np.linalg.norm(bi))
        out[0, i] = x
        for t in range(n_iters):
            if not stopped:
                q = ai @ p
                alpha = gamma / (q @ q)
                x = x + alpha * p
                r = r - alpha * q
                s = ai.T @ r
                gamma_new = s @ s
                p = s + gamma_new / gamma * p
                gamma = gamma_new
                stopped = np.sqrt(gamma) <= EPS * norm_a * (norm_a * np.linalg.norm(x) + np.linalg.norm(bi))
            out[t + 1, i] = x
    return out



def numpy_statistics(e, thresholds=THRESHOLDS, tail_fraction=0.1, margin=100.0):
    """The definitions of lsq_jax.eval.stats.trajectory_statistics, written out per problem."""
    e = np.where(np.isnan(e), np.inf, e)
    n_iters = e.shape[0] - 1
    n_tail = max(1, math.ceil(tail_fraction * n_iters))
    floors, settled, rates = [], [], []
    for col in e.T:
        floor = np.median(col[-n_tail:])
        end, hit = n_iters, False
        if np.isfinite(floor):
            for t in range(n_iters + 1 - n_tail):
                if col[t] <= margin * floor:
                    if t > 0:  # descended to the floor from above the margin
                        end, hit = t, True
                    break
        start = end // 2
        with np.errstate(invalid="ignore"):
            ratio = col[end] / col[start] if col[start] > 0 else np.nan
        rates.append(ratio ** (1.0 / (end - start)))
        floors.append(floor)
        settled.append(hit)
    with np.errstate(invalid="ignore"):
        quantiles = np.percentile(e, [10, 50, 90], axis=1)
    iters_to = []
    for thr in thresholds:
        below = np.nonzero(quantiles[1] <= thr)[0]
        iters_to.append(int(below[0]) if below.size else -1)
    return quantiles, np.array(floors), np.array(settled), np.array(rates), iters_to


def rel_err(xs, ref, scale):
    return np.linalg.norm(xs - ref, axis=-1) / np.linalg.norm(scale, axis=-1)


def run(solver, p, n_iters):
    return np.asarray(run_solver(solver, p.a, p.b, p.x0, n_iters))


# ----------------------------------------------------------------------------------------------------------
# Stand-in "learned" models: exact computations placed where the task reads the prediction


def exact_gradient_model(scale=1.0):
    """explicit_gradient tokens [x, 0], [a_i, b_i] -> scale * A^T (A x - b) / L at the last position."""

    def apply_fn(params, tokens):
        x, a, b = tokens[:, 0, :-1], tokens[:, 1:, :-1], tokens[:, 1:, -1]
        g = scale * least_squares_gradient(a, b, x)
        return jnp.zeros(tokens.shape[:2] + (x.shape[-1],), tokens.dtype).at[:, -1].set(g)

    return apply_fn


def exact_multistep_model(k, eta):
    """multistep_gd tokens [a_i, b_i], [x, 0] -> k GD steps at the last position."""

    def apply_fn(params, tokens):
        a, b, x = tokens[:, :-1, :-1], tokens[:, :-1, -1], tokens[:, -1, :-1]
        xk = gradient_descent(a, b, x, k, eta)
        return jnp.zeros(tokens.shape[:2] + (x.shape[-1],), tokens.dtype).at[:, -1].set(xk)

    return apply_fn


def small_experiment(task):
    return experiment_from_config({"task": {"name": task, "n_dims": 3, "n_points": 8},
                                   "model": {"n_embd": 8, "n_layer": 1}, "optim": {}, "train": {}})


def sized_plan(exp, sizes, *, constructions_only=False):
    """The report plan of `exp` with `sizes` and the key 0."""
    plan = make_report_plan(exp, constructions_only=constructions_only)
    return dataclasses.replace(plan, sizes=sizes, key=jax.random.key(0))
