"""Least-squares solvers behind one interface, and the harness that iterates them.

Every iterative method is a `Solver` ("baselines are models too"): exact GD, GD with the optimal step,
conjugate gradients on the normal equations (CGLS), the lstsq solution, and a learned one-step model fed
its own output (explicit gradient, or k GD steps). The hand-built BaseConv / linear-attention GD
constructions are Solvers too (lsq_jax.eval.constructions). One harness, `run_solver`, iterates any of
them on a batch of problems with `lax.scan`.

Step size `eta`: a number, or 'auto' (the default): per problem eta = 1 / lambda_max(A^T A / L), so
that exact GD converges on every problem with contraction 1 - lambda_min / lambda_max.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax.data.lsq import explicit_gradient_inputs, least_squares_gradient, multistep_gd_inputs
from lsq_jax.eval.stats import gram_extremes

__all__ = [
    "Solver",
    "auto_step_size",
    "canonical_eta",
    "cg_solver",
    "gd_solver",
    "learned_gradient_solver",
    "learned_multistep_solver",
    "lstsq_solver",
    "optimal_gd_solver",
    "run_solver",
]


# ---------------------------------------------------------------------------------------------------
# Step sizes


def auto_step_size(a_BxLxD: jax.Array) -> jax.Array:
    """eta = 1 / lambda_max(A^T A / L) per problem (B,): exact GD then contracts by 1 - lambda_min/lambda_max."""
    return 1.0 / gram_extremes(a_BxLxD)[1]


def check_eta(eta: Any) -> None:
    """Raise ValueError unless eta is 'auto' or a finite number > 0."""
    if isinstance(eta, str) and eta == "auto":
        return
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta={eta!r} is invalid: allowed values are 'auto' or finite numbers > 0")


def canonical_eta(eta: Any) -> str | float:
    """eta as reports record it and caches key on: 'auto' as it is, a number as a Python float."""
    return eta if isinstance(eta, str) else float(eta)


def eta_param(eta: Any) -> jax.Array | None:
    """The pytree form of eta: None for 'auto' (resolved per problem at init), else a scalar array."""
    check_eta(eta)
    return None if isinstance(eta, str) else jnp.asarray(float(eta))


def resolve_eta(eta: jax.Array | None, a_BxLxD: jax.Array) -> jax.Array:
    """Per-problem step sizes (B,) in A's dtype."""
    if eta is None:
        return auto_step_size(a_BxLxD)
    return jnp.broadcast_to(jnp.asarray(eta, a_BxLxD.dtype), a_BxLxD.shape[:1])


# ---------------------------------------------------------------------------------------------------
# The solver interface


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params"],
    meta_fields=["name", "init", "step", "iterate_of", "steps_per_iter", "follows"],
)
@dataclasses.dataclass(frozen=True)
class Solver:
    """An iterative least-squares method on a batch of problems: x_0 = iterate_of(init(...)),
    x_{t+1} = iterate_of(step(...)).

    `params` are the solver's weights or hyperparameters (a learned model's parameters, a step size);
    they are passed to `init` and `step` explicitly rather than closed over, so they stay traced
    arguments of the one compiled program (a new checkpoint does not recompile and its weights are not
    baked into the program as constants). A Solver is a pytree whose only leaves are `params`.

    Attributes:
        name: the method's name in reports.
        init: (params, a (B, L, D), b (B, L), x0 (B, D)) -> state (any pytree).
        step: (params, state) -> state, one iteration.
        iterate_of: state -> x (B, D).
        params: pytree (or None).
        steps_per_iter: GD steps one iteration stands for (k for a k-step model): its iterate t is
            compared with exact GD's iterate k t.
        follows: the classical iteration this method is meant to reproduce, which gives its theoretical
            contraction per iteration: 'gd' (max_i |1 - eta lambda_i|^k), 'optimal_gd'
            ((lambda_max - lambda_min) / (lambda_max + lambda_min)), 'cg' (the CG bound
            (kappa - 1) / (kappa + 1), kappa = cond(A)), or None.
    """

    name: str
    init: Callable
    step: Callable
    iterate_of: Callable
    params: Any = None
    steps_per_iter: int = 1
    follows: str | None = None


def run_solver(solver: Solver, a: jax.Array, b: jax.Array, x0: jax.Array, n_iters: int) -> jax.Array:
    """The iterates x_0, ..., x_T of `solver` on every problem, by `lax.scan`: (T + 1, B, D).

    Args:
        solver: any Solver.
        a: (B, L, D). b: (B, L). x0: (B, D) starting points (the lstsq solver ignores them).
        n_iters: T >= 0 (static).
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 0:
        raise ValueError(f"n_iters={n_iters!r} is invalid: allowed values are ints >= 0")
    a, b, x0 = jnp.asarray(a), jnp.asarray(b), jnp.asarray(x0)
    if a.ndim != 3 or b.shape != a.shape[:2] or x0.shape != (a.shape[0], a.shape[2]):
        raise ValueError(
            f"shapes a {a.shape}, b {b.shape}, x0 {x0.shape} are invalid: allowed are (B, L, D), (B, L), (B, D)"
        )
    return _run_solver(solver, a, b, x0, n_iters=int(n_iters))


@functools.partial(jax.jit, static_argnames=("n_iters",))
def _run_solver(solver, a, b, x0, *, n_iters):
    state = solver.init(solver.params, a, b, x0)
    first = solver.iterate_of(state)

    def body(state, _):
        state = solver.step(solver.params, state)
        return state, solver.iterate_of(state).astype(first.dtype)

    _, rest = jax.lax.scan(body, state, None, length=n_iters)
    return jnp.concatenate([first[None], rest], axis=0)


class ProblemState(NamedTuple):
    """State of the one-vector methods: the iterate x (B, D), the problem (a, b), step sizes eta (B,)."""

    x: jax.Array
    a: jax.Array
    b: jax.Array
    eta: jax.Array


def x_of(state) -> jax.Array:
    """The iterate of a state that holds it as `x`."""
    return state.x


# -- exact GD ---------------------------------------------------------------------------------------


def _gd_init(params, a, b, x0):
    return ProblemState(x0, a, b, resolve_eta(params["eta"], a))


def _gd_step(params, s: ProblemState) -> ProblemState:
    return s._replace(x=s.x - s.eta[:, None] * least_squares_gradient(s.a, s.b, s.x))


def gd_solver(eta: Any = "auto", *, name: str = "gd") -> Solver:
    """Exact gradient descent x <- x - eta A^T (A x - b) / L (the task's GD).

    Args:
        eta: a number, or 'auto' for eta = 1 / lambda_max(A^T A / L) per problem.
    """
    return Solver(name, _gd_init, _gd_step, x_of, params={"eta": eta_param(eta)}, follows="gd")


def _optimal_gd_init(params, a, b, x0):
    lam_min, lam_max = gram_extremes(a)
    return ProblemState(x0, a, b, 2.0 / (lam_min + lam_max))


def optimal_gd_solver(*, name: str = "optimal_gd") -> Solver:
    """GD with the optimal constant step eta = 2 / (lambda_min + lambda_max) of A^T A / L, per problem.

    Contraction (lambda_max - lambda_min) / (lambda_max + lambda_min) = (kappa^2 - 1) / (kappa^2 + 1),
    kappa = cond(A); lambda_min is the smallest NONZERO eigenvalue (a dims-truncated A has zero columns,
    whose error components are zero and stay zero).
    """
    return Solver(name, _optimal_gd_init, _gd_step, x_of, follows="optimal_gd")


# -- conjugate gradients on the normal equations ------------------------------------------------------


class CgState(NamedTuple):
    """CGLS state: iterate x, residual r = b - A x, s = A^T r, direction p, gamma = ||s||^2, the
    problem, ||A||_F, and `done` (B,): the stopping rule has fired and x is held."""

    x: jax.Array
    r: jax.Array
    s: jax.Array
    p: jax.Array
    gamma: jax.Array
    a: jax.Array
    b: jax.Array
    a_norm: jax.Array
    done: jax.Array


def _cg_converged(gamma, x, b, a_norm):
    """||A^T r|| <= eps ||A||_F (||A||_F ||x|| + ||b||): the normal-equation residual is at round-off."""
    eps = jnp.finfo(x.dtype).eps
    tol = eps * a_norm * (a_norm * jnp.linalg.norm(x, axis=-1) + jnp.linalg.norm(b, axis=-1))
    return gamma <= tol * tol


def _cg_init(params, a, b, x0):
    r = b - jnp.einsum("bld,bd->bl", a, x0)
    s = jnp.einsum("bld,bl->bd", a, r)
    gamma = jnp.sum(s * s, axis=-1)
    a_norm = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1)))
    return CgState(x0, r, s, s, gamma, a, b, a_norm, _cg_converged(gamma, x0, b, a_norm))


def _safe_ratio(num, den):
    # 0 where den == 0: a problem that has converged exactly stops instead of producing 0/0.
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _cg_step(params, st: CgState) -> CgState:
    q = jnp.einsum("bld,bd->bl", st.a, st.p)
    alpha = jnp.where(st.done, 0, _safe_ratio(st.gamma, jnp.sum(q * q, axis=-1)))
    x = st.x + alpha[:, None] * st.p
    r = st.r - alpha[:, None] * q
    s = jnp.einsum("bld,bl->bd", st.a, r)
    gamma = jnp.sum(s * s, axis=-1)
    p = s + _safe_ratio(gamma, st.gamma)[:, None] * st.p
    done = st.done | _cg_converged(gamma, x, st.b, st.a_norm)
    return CgState(x, r, s, p, gamma, st.a, st.b, st.a_norm, done)


def cg_solver(*, name: str = "cg") -> Solver:
    """Conjugate gradients on the normal equations A^T A x = A^T b, in the CGLS form (never forms A^T A).

    Per problem, from r = b - A x0, s = A^T r, p = s, gamma = ||s||^2:
        q = A p,  alpha = gamma / ||q||^2,  x += alpha p,  r -= alpha q,  s = A^T r,
        gamma' = ||s||^2,  p = s + (gamma' / gamma) p,
    with the usual stopping rule: once ||s|| <= eps ||A||_F (||A||_F ||x|| + ||b||) (the normal-equation
    residual is at round-off) the iterate is held. Without it CG would keep iterating on rounding noise,
    where gamma stagnates, beta = gamma' / gamma >= 1 lets p grow, and some problems drift off and
    diverge. In exact arithmetic it solves the problem in rank(A) iterations. Bound on the error in the
    A^T A norm: 2 ((kappa - 1) / (kappa + 1))^t, kappa = cond(A).
    """
    return Solver(name, _cg_init, _cg_step, x_of, follows="cg")


# -- lstsq --------------------------------------------------------------------------------------------


def _lstsq_init(params, a, b, x0):
    # SVD-based least squares with numpy's default cut-off (eps * max(L, D)): backward stable, and the
    # minimum-norm solution when A is rank-deficient (e.g. dims-truncated).
    x = jax.vmap(lambda ai, bi: jnp.linalg.lstsq(ai, bi)[0])(a, b)
    return ProblemState(x, a, b, jnp.zeros(a.shape[:1], a.dtype))


def _identity_step(params, s):
    return s


def lstsq_solver(*, name: str = "lstsq") -> Solver:
    """The least-squares solution argmin ||A x - b|| (SVD, minimum norm) as a constant iterate."""
    return Solver(name, _lstsq_init, _identity_step, x_of)


# -- learned one-step models ---------------------------------------------------------------------------


def learned_gradient_solver(apply_fn: Callable, params: Any, eta: Any = "auto", *, name: str = "learned"
                            ) -> Solver:
    """A learned explicit-gradient model used as GD: x_{t+1} = x_t - eta * model(A, b, x_t).

    The model sees the explicit_gradient tokens [x_t, 0], [a_i, b_i] and its gradient is read at the LAST
    position, channels [:D] (for the 'all' setting that position holds the full gradient too).

    Args:
        apply_fn: apply_fn(params, inputs (B, L + 1, D + 1)) -> outputs (B, L + 1, >= D).
        params: the model's parameters.
        eta: a number, or 'auto' (1 / lambda_max(A^T A / L) per problem).
    """

    def step(p, s: ProblemState) -> ProblemState:
        out = apply_fn(p["model"], explicit_gradient_inputs(s.a, s.b, s.x))
        g = out[:, -1, : s.x.shape[-1]].astype(s.x.dtype)
        return s._replace(x=s.x - s.eta[:, None] * g)

    return Solver(name, _gd_init, step, x_of, params={"model": params, "eta": eta_param(eta)}, follows="gd")


def learned_multistep_solver(apply_fn: Callable, params: Any, n_iters: int, *, name: str = "learned"
                             ) -> Solver:
    """A learned k-step model fed its own output: x_{t+1} = model(A, b, x_t) (the multistep_gd task).

    The model sees the multistep_gd tokens [a_i, b_i], [x_t, 0] and its iterate is read at the last
    position, channels [:D]. One application stands for k = `n_iters` GD steps with the task's eta (baked
    into what the model learned), so its iterate t is compared with GD's iterate k t.
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 1:
        raise ValueError(f"n_iters={n_iters!r} is invalid: allowed values are ints >= 1")

    def init(p, a, b, x0):
        return ProblemState(x0, a, b, jnp.zeros(a.shape[:1], a.dtype))

    def step(p, s: ProblemState) -> ProblemState:
        out = apply_fn(p, multistep_gd_inputs(s.a, s.b, s.x))
        return s._replace(x=out[:, -1, : s.x.shape[-1]].astype(s.x.dtype))

    return Solver(name, init, step, x_of, params=params, steps_per_iter=int(n_iters), follows="gd")

