"""Evaluation of learned and classical least-squares solvers in numerical-analysis units (SPEC §2, §4).

Every iterative method is a `Solver` ("baselines are models too"): exact GD, GD with the optimal step,
conjugate gradients on the normal equations (CGLS), the lstsq solution, a learned one-step model fed its
own output (explicit gradient or k GD steps), and the hand-built BaseConv / linear-attention GD
constructions. One harness, `run_solver`, iterates any of them on a batch of problems with `lax.scan`,
and one report turns the iterates into the quantities a numerical analyst reads, per problem and then as
the median and the 10th / 90th percentiles over problems:

    forward error       e_t = ||x_t - x*|| / ||x*||
    relative residual   ||A x_t - b|| / ||b||
    distance to GD      ||x_t - x^GD_{k t}|| / ||x*||     (k = GD steps that one iteration stands for)
    floor               median of e_t over the last 10% of the iterations, also / (kappa(A) eps)
    contraction         geometric mean of e_{t+1} / e_t over the window just before the floor, next to
                        the theory (GD: max_i |1 - eta lambda_i(A^T A / L)|)
    iterations to       the first t at which the median forward error is <= 1e-6, 1e-10, 1e-14

Single-step metrics (any task) are the test MSE on fresh data and, for the least-squares tasks, the
relative error of the one quantity the model predicts (gradient, k-step iterate, solution). The
out-of-distribution grid re-draws the problems with other condition numbers, target scales, fewer rows
and fewer dimensions and reports each error next to its in-distribution value (the generalisation gap),
for the learned model and for the BaseConv construction, whose gap is ~1 by construction.

Step size `eta`: a number, or 'auto' (the default): per problem eta = 1 / lambda_max(A^T A / L), so
that exact GD converges on every problem with contraction 1 - lambda_min / lambda_max.

Reports are plain dicts of floats, ints, strings, lists and None (None: never reached, undefined or not
finite), so `json.dumps(report, allow_nan=False)` works. This module does no file I/O.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lsq_jax.data import samplers, tasks
from lsq_jax.data.samplers import LeastSquaresSample, example_keys
from lsq_jax.data.tasks import explicit_gradient_inputs, least_squares_gradient, multistep_gd_inputs
from lsq_jax.models import construct
from lsq_jax.models.backbone import SequenceModel
from lsq_jax.models.gd_weights import explicit_gradient_params

__all__ = [
    "ITERATED_TASKS",
    "OOD_KAPPAS",
    "OOD_SCALES",
    "THRESHOLDS",
    "Solver",
    "auto_step_size",
    "cg_solver",
    "construction_solver",
    "evaluate_constructions",
    "evaluate_experiment",
    "format_table",
    "gd_solver",
    "iterated_report",
    "learned_gradient_solver",
    "learned_multistep_solver",
    "lstsq_solver",
    "ood_cells",
    "ood_report",
    "optimal_gd_solver",
    "report_times",
    "run_solver",
    "single_step_report",
    "singular_values",
    "trajectory_statistics",
]

THRESHOLDS = (1e-6, 1e-10, 1e-14)  # forward-error targets of "iterations to"
OOD_KAPPAS = (1.0, 2.0, 5.0, 10.0, 100.0)  # sampler scale_cond (1 = plain Gaussian A)
OOD_SCALES = (0.1, 1.0, 10.0)  # sampler scale_target
ITERATED_TASKS = ("explicit_gradient", "multistep_gd")  # tasks whose model is a one-step solver
TAIL_FRACTION = 0.1  # the floor is read over this last fraction of the iterations
SETTLE_MARGIN = 100.0  # a trajectory has reached its floor once e_t <= SETTLE_MARGIN * floor


def _threshold_key(threshold: float) -> str:
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


def _gram_extremes(a_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lambda_min, lambda_max) of A^T A / L per problem, lambda_min over the nonzero spectrum."""
    s, nonzero = singular_values(a_BxLxD)
    n = a_BxLxD.shape[-2]
    lam_max = s[..., 0] ** 2 / n
    lam_min = jnp.min(jnp.where(nonzero, s, jnp.inf), axis=-1) ** 2 / n
    return lam_min, lam_max


def auto_step_size(a_BxLxD: jax.Array) -> jax.Array:
    """eta = 1 / lambda_max(A^T A / L) per problem (B,): exact GD then contracts by 1 - lambda_min/lambda_max."""
    return 1.0 / _gram_extremes(a_BxLxD)[1]


def _check_eta(eta: Any) -> None:
    if isinstance(eta, str) and eta == "auto":
        return
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta={eta!r} is invalid: allowed values are 'auto' or finite numbers > 0")


def _eta_param(eta: Any) -> jax.Array | None:
    """The pytree form of eta: None for 'auto' (resolved per problem at init), else a scalar array."""
    _check_eta(eta)
    return None if isinstance(eta, str) else jnp.asarray(float(eta))


def _resolve_eta(eta: jax.Array | None, a_BxLxD: jax.Array) -> jax.Array:
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


def _x_of(state) -> jax.Array:
    return state.x


# -- exact GD ---------------------------------------------------------------------------------------


def _gd_init(params, a, b, x0):
    return ProblemState(x0, a, b, _resolve_eta(params["eta"], a))


def _gd_step(params, s: ProblemState) -> ProblemState:
    return s._replace(x=s.x - s.eta[:, None] * least_squares_gradient(s.a, s.b, s.x))


def gd_solver(eta: Any = "auto", *, name: str = "gd") -> Solver:
    """Exact gradient descent x <- x - eta A^T (A x - b) / L (the task's GD, SPEC §2).

    Args:
        eta: a number, or 'auto' for eta = 1 / lambda_max(A^T A / L) per problem.
    """
    return Solver(name, _gd_init, _gd_step, _x_of, params={"eta": _eta_param(eta)}, follows="gd")


def _optimal_gd_init(params, a, b, x0):
    lam_min, lam_max = _gram_extremes(a)
    return ProblemState(x0, a, b, 2.0 / (lam_min + lam_max))


def optimal_gd_solver(*, name: str = "optimal_gd") -> Solver:
    """GD with the optimal constant step eta = 2 / (lambda_min + lambda_max) of A^T A / L, per problem.

    Contraction (lambda_max - lambda_min) / (lambda_max + lambda_min) = (kappa^2 - 1) / (kappa^2 + 1),
    kappa = cond(A); lambda_min is the smallest NONZERO eigenvalue (a dims-truncated A has zero columns,
    whose error components are zero and stay zero).
    """
    return Solver(name, _optimal_gd_init, _gd_step, _x_of, follows="optimal_gd")


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
    return Solver(name, _cg_init, _cg_step, _x_of, follows="cg")


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
    return Solver(name, _lstsq_init, _identity_step, _x_of)


# -- learned one-step models ---------------------------------------------------------------------------


def learned_gradient_solver(apply_fn: Callable, params: Any, eta: Any = "auto", *, name: str = "learned"
                            ) -> Solver:
    """A learned explicit-gradient model used as GD: x_{t+1} = x_t - eta * model(A, b, x_t) (SPEC §2).

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

    return Solver(name, _gd_init, step, _x_of, params={"model": params, "eta": _eta_param(eta)}, follows="gd")


def learned_multistep_solver(apply_fn: Callable, params: Any, num_iters: int, *, name: str = "learned"
                             ) -> Solver:
    """A learned k-step model fed its own output: x_{t+1} = model(A, b, x_t) (SPEC §2, multistep_gd).

    The model sees the multistep_gd tokens [a_i, b_i], [x_t, 0] and its iterate is read at the last
    position, channels [:D]. One application stands for k = `num_iters` GD steps with the task's eta (baked
    into what the model learned), so its iterate t is compared with GD's iterate k t.
    """
    if isinstance(num_iters, bool) or not isinstance(num_iters, numbers.Integral) or num_iters < 1:
        raise ValueError(f"num_iters={num_iters!r} is invalid: allowed values are ints >= 1")

    def init(p, a, b, x0):
        return ProblemState(x0, a, b, jnp.zeros(a.shape[:1], a.dtype))

    def step(p, s: ProblemState) -> ProblemState:
        out = apply_fn(p, multistep_gd_inputs(s.a, s.b, s.x))
        return s._replace(x=out[:, -1, : s.x.shape[-1]].astype(s.x.dtype))

    return Solver(name, init, step, _x_of, params=params, steps_per_iter=int(num_iters), follows="gd")


# -- hand-built constructions ---------------------------------------------------------------------------

CONSTRUCTIONS = ("baseconv", "linear_attention")


class ConstructionState(NamedTuple):
    """x (B, D), the problem, and per-problem weights (a params pytree with a leading B axis) or None."""

    x: jax.Array
    a: jax.Array
    b: jax.Array
    weights: Any


def _construction_builder(kind: str, n_dims: int, n_points: int):
    if kind == "baseconv":
        cfg = construct.baseconv_gd_config(n_dims, n_points)
        return cfg, lambda eta: construct.baseconv_gd_params(cfg, n_dims, n_points, eta)
    if kind == "linear_attention":
        cfg = construct.linear_attention_gd_config(n_dims, n_points, 1)
        return cfg, lambda eta: construct.linear_attention_gd_params(cfg, n_dims, n_points, eta)
    raise ValueError(f"kind={kind!r} is invalid: allowed values are {', '.join(CONSTRUCTIONS)}")


def construction_solver(kind: str, n_dims: int, n_points: int, eta: Any = "auto", *, name: str | None = None
                        ) -> Solver:
    """A hand-built exact-GD model (lsq_jax.models.construct, SPEC §4) iterated through its tokens.

    Every iteration writes x_t into every token [a_i, b_i, x_t, 0...], applies the model, and reads
    x_{t+1} from the last token (`construct.make_token_step`), exactly as a learned one-step model is
    iterated. 'baseconv' is the 3-layer BaseConv construction, 'linear_attention' the one-layer linear
    attention construction; both are one GD step w - eta / L A^T (A w - b) per pass.

    The weights hold c = eta / L, so a construction is built for `n_points` rows and a scalar eta. With
    eta 'auto' every problem has its own eta, hence its own weights: they are affine in eta (one matrix
    entry, or one block, is -eta / L times a constant; checked when the solver is built), so the leaves
    that depend on eta are formed once per problem at init as W(0) + eta_b (W(1) - W(0)) and the model
    is applied with a vmap over those leaves (the others are shared).

    Args:
        kind: 'baseconv' or 'linear_attention'.
        n_dims: D. n_points: L, the number of rows the step is built for.
        eta: a number or 'auto'.
        name: defaults to '<kind>_gd'.
    """
    _check_eta(eta)
    solver = _construction_solver(kind, n_dims, n_points, eta if isinstance(eta, str) else float(eta))
    return solver if name is None else dataclasses.replace(solver, name=name)


# Built once per (kind, D, L, eta) per process: the same Solver (same step functions) hits the jit cache,
# so repeated evaluations and the OOD cells of one size compile once.
@functools.lru_cache(maxsize=64)
def _construction_solver(kind: str, n_dims: int, n_points: int, eta: Any) -> Solver:
    cfg, build = _construction_builder(kind, n_dims, n_points)
    model = SequenceModel(cfg)
    width = cfg.in_dims
    name = f"{kind}_gd"

    def apply_shared(p, tokens):
        return model.apply({"params": p}, tokens)

    if not isinstance(eta, str):
        def init(p, a, b, x0):
            return ConstructionState(x0, a, b, None)

        def step(p, s: ConstructionState) -> ConstructionState:
            x = construct.make_token_step(apply_shared, p, s.a, s.b, width)(s.x)
            return s._replace(x=x.astype(s.x.dtype))

        return Solver(name, init, step, _x_of, params=build(float(eta)), follows="gd")

    w0, w1 = build(0.0), build(1.0)
    slope = jax.tree.map(jnp.subtract, w1, w0)
    # The affine form is a property of both constructions; check it rather than assume it.
    half = jax.tree.map(lambda x, dx: x + 0.5 * dx, w0, slope)
    if not all(np.allclose(x, y, rtol=1e-14, atol=0) for x, y in zip(jax.tree.leaves(half),
                                                                      jax.tree.leaves(build(0.5)))):
        raise ValueError(f"kind={kind!r}: the construction's weights are not affine in eta; use a scalar eta")

    # Only the leaves that depend on eta get a per-problem copy; the rest stay shared, so the vmapped
    # model batches over problems exactly as the shared one does except in those few matrices.
    per_problem = jax.tree.map(lambda dx: bool(np.any(np.asarray(dx) != 0)), slope)
    axes = jax.tree.map(lambda batched: 0 if batched else None, per_problem)

    def init_auto(p, a, b, x0):
        eta_b = auto_step_size(a)

        def weight(x, dx, batched):
            if not batched:
                return x
            return x[None] + eta_b.reshape((-1,) + (1,) * x.ndim).astype(x.dtype) * dx[None]

        return ConstructionState(x0, a, b, jax.tree.map(weight, p["w0"], p["slope"], per_problem))

    def apply_per_problem(weights, tokens):
        one = lambda w, t: model.apply({"params": w}, t[None])[0]  # noqa: E731
        return jax.vmap(one, in_axes=(axes, 0))(weights, tokens)

    def step_auto(p, s: ConstructionState) -> ConstructionState:
        x = construct.make_token_step(apply_per_problem, s.weights, s.a, s.b, width)(s.x)
        return s._replace(x=x.astype(s.x.dtype))

    return Solver(name, init_auto, step_auto, _x_of, params={"w0": w0, "slope": slope}, follows="gd")


# ---------------------------------------------------------------------------------------------------
# Statistics of trajectories


def _as_error(e: jax.Array) -> jax.Array:
    # A diverged iterate (inf - inf = NaN) is infinitely wrong, not "missing".
    return jnp.where(jnp.isnan(e), jnp.inf, e)


def _relative_norm(diff: jax.Array, ref: jax.Array) -> jax.Array:
    return _as_error(jnp.linalg.norm(diff, axis=-1) / jnp.linalg.norm(ref, axis=-1))


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
    e = _as_error(errors_TxB)
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
# JSON helpers


def _num(x) -> float | None:
    """A float, or None when not finite (JSON has no NaN/inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _quantile_dict(v_B) -> dict[str, float | None]:
    """{'median', 'p10', 'p90'} over problems (NaN counts as +inf)."""
    v = np.asarray(_as_error(jnp.asarray(v_B)))
    with np.errstate(invalid="ignore"):  # inf - inf between two diverged problems: None below
        p10, med, p90 = np.percentile(v, [10, 50, 90]) if v.size else (np.nan,) * 3
    return {"median": _num(med), "p10": _num(p10), "p90": _num(p90)}


def _nanmedian(v_B) -> float | None:
    v = np.asarray(v_B, dtype=float)
    v = v[~np.isnan(v)]
    return _num(np.median(v)) if v.size else None


def _curves(quantiles_3xT, times) -> dict[str, list]:
    q = np.asarray(quantiles_3xT)[:, np.asarray(times)]
    return {"median": [_num(v) for v in q[1]], "p10": [_num(v) for v in q[0]], "p90": [_num(v) for v in q[2]]}


def report_times(n_iters: int, n_points: int | None = 64) -> list[int]:
    """The iterations kept in a report: t = 0, T and ~n_points log-spaced plus ~n_points evenly spaced
    (all t when n_points is None or T is small), so the curves read on a log or a linear axis."""
    if n_points is None or n_iters <= 2 * n_points:
        return list(range(n_iters + 1))
    log_t = np.round(np.logspace(0, math.log10(n_iters), n_points)).astype(int)
    lin_t = np.round(np.linspace(0, n_iters, n_points + 1)).astype(int)
    return sorted(set(log_t.tolist()) | set(lin_t.tolist()) | {0, n_iters})


# ---------------------------------------------------------------------------------------------------
# Iterated use


def _theory_b(follows: str | None, k: int, eta_b, lam_min, lam_max, kappa_b):
    """Theoretical contraction per iteration, per problem, or None."""
    if follows == "gd":
        return jnp.maximum(jnp.abs(1 - eta_b * lam_min), jnp.abs(1 - eta_b * lam_max)) ** k
    if follows == "optimal_gd":
        return (lam_max - lam_min) / (lam_max + lam_min)
    if follows == "cg":
        return (kappa_b - 1) / (kappa_b + 1)
    return None


@functools.partial(jax.jit, static_argnames=("k",))
def _trajectory_errors(xs, a, b, x_star, x_gd, *, k):
    """Forward error, relative residual and distance to GD (T + 1, B) of iterates xs (T + 1, B, D)."""
    n_t = xs.shape[0]
    gd_t = x_gd[: k * (n_t - 1) + 1 : k]
    residual = jnp.einsum("bld,tbd->tbl", a, xs) - b
    return {
        "forward_error": _relative_norm(xs - x_star, jnp.broadcast_to(x_star, xs.shape)),
        "residual": _relative_norm(residual, jnp.broadcast_to(b, residual.shape)),
        "distance_to_gd": _relative_norm(xs - gd_t, jnp.broadcast_to(x_star, xs.shape)),
    }


def iterated_report(solvers: Sequence[Solver], sample: LeastSquaresSample, n_iters: int, *,
                    eta: Any = "auto", n_report_points: int | None = 64) -> dict[str, Any]:
    """Iterate every solver on the same problems and report the numerical-analysis statistics.

    Every solver gets the same budget of G = k_max T GD-step equivalents, k_max the largest
    `steps_per_iter` (1 unless a k-step model is among the solvers): a solver standing for k steps runs
    G // k of its own iterations (so T is the number of applications of the k-step model, and every other
    method covers the same range of GD steps). Exact GD with `eta`, run G steps, is the reference of
    'distance_to_gd' (a k-step solver's iterate t against GD's iterate k t) and of the theoretical
    contractions. Iteration counts in a method's entry ('t', 'iters_to') are its own iterations.

    Args:
        solvers: Solvers with distinct names.
        sample: the problems (a (B, L, D), b (B, L), x_star (B, D), x0 (B, D)).
        n_iters: T >= 1.
        eta: the reference GD's step: a number or 'auto'.
        n_report_points: each curve is kept at `report_times(its iterations, n_report_points)` (None:
            every t).

    Returns:
        {'n_problems', 'n_iters' (T), 'n_gd_steps' (G), 'eta', 'eps', 'kappa' {median, p10, p90},
         'step_size' {...}, 'methods': {name: {'steps_per_iter', 'follows', 'n_iters', 't' [...],
         'forward_error' {median, p10, p90: lists over t}, 'residual' {...}, 'distance_to_gd' {...},
         'final_forward_error', 'floor',
         'floor_over_kappa_eps', 'settled_fraction', 'contraction', 'contraction_theory',
         'iters_to' {'1e-06', '1e-10', '1e-14': int or None}}}}; scalar statistics are medians over
        problems (see `trajectory_statistics`).
    """
    names = [s.name for s in solvers]
    if len(set(names)) != len(names):
        raise ValueError(f"solver names {names} are invalid: allowed are distinct names")
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 1:
        raise ValueError(f"n_iters={n_iters!r} is invalid: allowed values are ints >= 1")
    a, b, x_star, x0 = (jnp.asarray(v) for v in sample)
    eps = float(jnp.finfo(a.dtype).eps)
    k_max = max(s.steps_per_iter for s in solvers)
    n_gd_steps = n_iters * k_max
    x_gd = run_solver(gd_solver(eta), a, b, x0, n_gd_steps)

    s, nonzero = singular_values(a)
    kappa_b = s[:, 0] / jnp.min(jnp.where(nonzero, s, jnp.inf), axis=-1)
    lam_min, lam_max = _gram_extremes(a)
    eta_b = _resolve_eta(_eta_param(eta), a)

    methods = {}
    for solver in solvers:
        k = solver.steps_per_iter
        own_iters = n_gd_steps // k
        times = report_times(own_iters, n_report_points)
        xs = run_solver(solver, a, b, x0, own_iters)
        errors = _trajectory_errors(xs, a, b, x_star, x_gd, k=k)
        stats = trajectory_statistics(errors["forward_error"])
        theory = _theory_b(solver.follows, k, eta_b, lam_min, lam_max, kappa_b)
        iters_to = np.asarray(stats["iters_to"])
        methods[solver.name] = {
            "steps_per_iter": k,
            "follows": solver.follows,
            "n_iters": own_iters,
            "t": times,
            **{key: _curves(stats["quantiles"] if key == "forward_error"
                            else jnp.quantile(val, jnp.asarray([0.1, 0.5, 0.9], val.dtype), axis=1), times)
               for key, val in errors.items()},
            "final_forward_error": _num(np.asarray(stats["quantiles"])[1, -1]),
            "floor": _num(np.median(np.asarray(stats["floor_b"]))),
            "floor_over_kappa_eps": _num(np.median(np.asarray(stats["floor_b"] / (kappa_b * eps)))),
            "settled_fraction": float(np.mean(np.asarray(stats["settled_b"]))),
            "contraction": _nanmedian(stats["contraction_b"]),
            "contraction_theory": None if theory is None else _nanmedian(theory),
            "iters_to": {_threshold_key(thr): (int(it) if it >= 0 else None)
                         for thr, it in zip(THRESHOLDS, iters_to)},
        }
    return {
        "n_problems": int(a.shape[0]),
        "n_iters": int(n_iters),
        "n_gd_steps": int(n_gd_steps),
        "eta": eta if isinstance(eta, str) else float(eta),
        "eps": eps,
        "kappa": _quantile_dict(kappa_b),
        "step_size": _quantile_dict(eta_b),
        "methods": methods,
    }


# ---------------------------------------------------------------------------------------------------
# Single-step metrics


def _relative_error_b(pred, target, scale):
    return jnp.linalg.norm(pred - target, axis=-1) / jnp.linalg.norm(scale, axis=-1)


def single_step_report(task: tasks.Task, apply_fn: Callable, params: Any, key: jax.Array,
                       n_problems: int = 256) -> dict[str, Any]:
    """Test metrics of one model application on fresh problems drawn with the task's sampler.

    Always 'test_mse' (and the task's other eval metrics, e.g. the primitives' 'test_rel', 'test_rel_l2').
    Least-squares tasks add, per problem, quantiles of the relative error of what the model predicts:
    explicit_gradient 'relative_gradient_error' ||g_pred - g|| / ||g|| (full gradient, last position);
    multistep_gd 'relative_step_error' ||x_pred - x_k|| / ||x_k - x0||; least_squares 'forward_error'
    ||x_pred - x*|| / ||x*||.

    Args:
        task: a Task (make_task). apply_fn: apply_fn(params, inputs) -> outputs (B, T, width).
        params: the model's parameters. key: data key; problem i uses fold_in(fold_in(key, 0), i).
        n_problems: number of fresh problems.
    """
    batch = task.sample(example_keys(key, 0, 0, n_problems))
    pred = jax.jit(apply_fn)(params, batch.inputs)
    report: dict[str, Any] = {"n_problems": int(n_problems)}
    report.update({f"test_{k}": _num(v) for k, v in task.eval_metrics(pred, batch.targets).items()})
    read = task.read(pred)
    if task.name == "explicit_gradient":
        g_pred, g = read[:, -1], batch.targets[:, -1]
        report["relative_gradient_error"] = _quantile_dict(_relative_error_b(g_pred, g, g))
    elif task.name == "multistep_gd":
        x_pred, x_k = read[:, -1], batch.targets[:, -1]
        report["relative_step_error"] = _quantile_dict(_relative_error_b(x_pred, x_k, x_k - batch.raw.x0))
    elif task.name == "least_squares":
        x_pred, x_star = read[:, -1], batch.targets[:, -1]
        report["forward_error"] = _quantile_dict(_relative_error_b(x_pred, x_star, x_star))
    return report


# ---------------------------------------------------------------------------------------------------
# Out-of-distribution grid


def ood_cells(n_dims: int, n_points: int, *, kappa: float = 1.0, scale_target: float = 1.0,
              kappas: Sequence[float] = OOD_KAPPAS, scales: Sequence[float] = OOD_SCALES,
              rows: Sequence[int] | None = None, dims: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The cells of the out-of-distribution grid around the in-distribution cell (kappa, scale_target, L, D).

    * axis 'kappa_scale': every (kappa', scale') in kappas x scales (plus the in-distribution pair), at L
      rows and D dims;
    * axis 'rows': L' rows (default ceil(L/2) and ceil(3L/4), kept if D <= L' < L: fewer rows than the model
      was trained on, still an overdetermined problem), at (kappa, scale_target);
    * axis 'dims': n_dims_truncated (default ceil(D/2) and D - 1, kept if 1 <= D' < D), at (kappa,
      scale_target).

    The first cell is the in-distribution one. Each cell: {'axis', 'kappa', 'scale_target', 'n_points',
    'n_dims'} ('n_dims' = the dims kept, D when none is zeroed).
    """
    if rows is None:
        rows = (math.ceil(n_points / 2), math.ceil(3 * n_points / 4))
    if dims is None:
        dims = (math.ceil(n_dims / 2), n_dims - 1)
    rows = sorted({int(r) for r in rows if n_dims <= r < n_points})
    dims = sorted({int(d) for d in dims if 1 <= d < n_dims})
    base = {"kappa": float(kappa), "scale_target": float(scale_target), "n_points": n_points, "n_dims": n_dims}
    cells = [{"axis": "kappa_scale", **base}]
    for kp in kappas:
        for sc in scales:
            if (float(kp), float(sc)) != (base["kappa"], base["scale_target"]):
                cells.append({"axis": "kappa_scale", **base, "kappa": float(kp), "scale_target": float(sc)})
    cells += [{"axis": "rows", **base, "n_points": r} for r in rows]
    cells += [{"axis": "dims", **base, "n_dims": d} for d in dims]
    return cells


def _draw_cell(key, cell, n_problems, n_dims, *, normalize_a=False, normalize_x=False, dtype=jnp.float64):
    truncated = None if cell["n_dims"] == n_dims else cell["n_dims"]
    return samplers.least_squares(example_keys(key, 0, 0, n_problems), cell["n_points"], n_dims,
                                  normalize_a=normalize_a, scale_cond=cell["kappa"], normalize_x=normalize_x,
                                  scale_target=cell["scale_target"], n_dims_truncated=truncated, dtype=dtype)


def ood_report(make_solvers: Callable[[int], Sequence[Solver]], draw: Callable[[dict], LeastSquaresSample],
               cells: Sequence[dict[str, Any]], n_iters: int, *, eta: Any = "auto") -> dict[str, Any]:
    """Single-step and iterated errors of some solvers on every cell, and their generalisation gaps.

    For each cell and each solver: 'step_error' = ||x_1 - x^GD_k|| / ||x^GD_k - x_0|| (one application
    against k exact GD steps with `eta`; for a learned explicit-gradient model this is exactly
    ||g_pred - g|| / ||g||), 'final_forward_error' = ||x_T - x*|| / ||x*||, and 'final_vs_gd' = the
    median over problems of its final error / GD's final error after the same k T steps (~1 for a
    method that is GD). The gaps are the cell's median over the in-distribution cell's median (cells[0]):
    'step_error_gap', 'final_error_gap'. GD itself is listed as 'gd' (final error after T steps).

    Args:
        make_solvers: n_points -> the solvers for problems of that many rows (a construction's weights
            depend on L; a learned model does not change).
        draw: cell -> the problems of that cell (drawn from one key, so the cells share their randomness).
        cells: from `ood_cells`; cells[0] is the in-distribution reference.
        n_iters: T >= 1 iterations per solver.
        eta: the GD step (a number or 'auto').
    """
    results = []
    for cell in cells:
        a, b, x_star, x0 = draw(cell)
        solvers = list(make_solvers(cell["n_points"]))
        k_max = max([1] + [s.steps_per_iter for s in solvers])
        x_gd = run_solver(gd_solver(eta), a, b, x0, n_iters * k_max)
        entry = {**cell, "cond": _quantile_dict(_cond(a)), "methods": {}}
        for solver in solvers:
            k = solver.steps_per_iter
            xs = run_solver(solver, a, b, x0, n_iters)
            step_b = _relative_error_b(xs[1], x_gd[k], x_gd[k] - x0)
            final_b = _relative_error_b(xs[-1], x_star, x_star)
            gd_final_b = _relative_error_b(x_gd[k * n_iters], x_star, x_star)
            entry["methods"][solver.name] = {
                "step_error": _quantile_dict(step_b),
                "final_forward_error": _quantile_dict(final_b),
                "final_vs_gd": _quantile_dict(_error_ratio(final_b, gd_final_b)),
            }
        entry["methods"]["gd"] = {"final_forward_error": _quantile_dict(_relative_error_b(x_gd[n_iters], x_star,
                                                                                          x_star))}
        results.append(entry)
    base = results[0]["methods"]
    for entry in results:
        for name, m in entry["methods"].items():
            for key, gap in (("step_error", "step_error_gap"), ("final_forward_error", "final_error_gap")):
                if key in m:
                    m[gap] = _ratio(m[key]["median"], base[name][key]["median"])
    return {"n_iters": int(n_iters), "eta": eta if isinstance(eta, str) else float(eta),
            "in_distribution": dict(cells[0]), "cells": results}


def _error_ratio(num_b, den_b):
    # Both exactly zero (small problems can land on x* bit for bit): equal, not 0 / 0.
    num_b, den_b = _as_error(num_b), _as_error(den_b)
    both_zero = (num_b == 0) & (den_b == 0)
    return jnp.where(both_zero, 1.0, num_b / jnp.where(both_zero, 1.0, den_b))


def _ratio(num, den) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return _num(num / den)


def _cond(a):
    s, nonzero = singular_values(a)
    return s[:, 0] / jnp.min(jnp.where(nonzero, s, jnp.inf), axis=-1)


# ---------------------------------------------------------------------------------------------------
# Top-level reports


def _classical_solvers(eta: Any) -> list[Solver]:
    return [gd_solver(eta), optimal_gd_solver(), cg_solver(), lstsq_solver()]


def _construction_solvers(n_dims: int, eta: Any, cache: dict) -> Callable[[int], list[Solver]]:
    """n_points -> [BaseConv, linear attention] constructions, built once per n_points."""

    def make(n_points: int) -> list[Solver]:
        if n_points not in cache:
            cache[n_points] = [construction_solver(kind, n_dims, n_points, eta) for kind in CONSTRUCTIONS]
        return cache[n_points]

    return make


def evaluate_experiment(exp, params: Any, key: jax.Array, *, n_problems: int = 256, n_iters: int = 1000,
                        eta: Any = "auto", ood: bool = True, n_ood_problems: int | None = None,
                        n_ood_iters: int | None = None, ood_kappas: Sequence[float] = OOD_KAPPAS,
                        ood_scales: Sequence[float] = OOD_SCALES, n_report_points: int | None = 64,
                        apply_fn: Callable | None = None) -> dict[str, Any]:
    """The evaluation report of a trained model (the CLI's --mode=eval).

    Single-step metrics on fresh problems for every task; for explicit_gradient and multistep_gd also
    iterated use of the learned model next to both constructions, GD, optimal GD, CG and lstsq
    (`iterated_report`), and the out-of-distribution grid (`ood_report`) for the learned model and the
    BaseConv construction. For multistep_gd the step size is the task's eta (the model learned k steps
    of GD with it) whatever `eta` says, and the model's iterate t stands for k t GD steps.

    Args:
        exp: an Experiment (lsq_jax.experiment): its task and model configs are used.
        params: the model's parameters (the 'params' collection).
        key: the evaluation key (e.g. train.run_keys(seed)['eval']); single-step, iterated and OOD
            problems come from fold_in(key, 0), fold_in(key, 1), fold_in(key, 2).
        n_problems: problems for single-step metrics and iterated use.
        n_iters: iterations T of iterated use (multistep_gd: T applications of the model, and the other
            methods get the same k T GD-step equivalents).
        eta: 'auto' or a number (explicit_gradient).
        ood: compute the out-of-distribution grid.
        n_ood_problems, n_ood_iters: sizes per OOD cell (default min(n_problems, 64) and min(n_iters, 250):
            the grid has ~20 cells).
        ood_kappas, ood_scales: the kappa x scale_target axes of the grid (`ood_cells`).
        n_report_points: curves kept at ~2x this many t (None: every t).
        apply_fn: apply_fn(params, inputs) -> outputs; default SequenceModel(exp.model).apply.

    Returns:
        {'kind': 'experiment', 'config': {...}, 'single_step': {...}[, 'iterated': {...}, 'ood': {...}]}.
    """
    task = exp.make_task()
    if apply_fn is None:
        model = SequenceModel(exp.model)

        def apply_fn(p, inputs):
            return model.apply({"params": p}, inputs)

    cfg = exp.task
    report: dict[str, Any] = {
        "kind": "experiment",
        "config": {"name": getattr(exp, "name", None), "task": cfg.name, "n_dims": cfg.n_dims,
                   "n_points": cfg.n_points, "dtype": cfg.dtype, "mixer": exp.model.mixer,
                   "n_layer": exp.model.n_layer, "n_embd": exp.model.n_embd},
        "single_step": single_step_report(task, apply_fn, params, jax.random.fold_in(key, 0), n_problems),
    }
    if cfg.name not in ITERATED_TASKS:
        return report

    if cfg.name == "multistep_gd":
        eta = float(cfg.eta)
        learned = learned_multistep_solver(apply_fn, params, cfg.num_iters)
    else:
        learned = learned_gradient_solver(apply_fn, params, eta)
    report["config"]["eta"] = eta if isinstance(eta, str) else float(eta)
    cache: dict = {}
    constructions = _construction_solvers(cfg.n_dims, eta, cache)
    sample = task.sample(example_keys(jax.random.fold_in(key, 1), 0, 0, n_problems)).raw
    solvers = [learned, *_exact_weights_solver(exp, apply_fn, eta), *constructions(cfg.n_points),
               *_classical_solvers(eta)]
    report["iterated"] = iterated_report(solvers, sample, n_iters, eta=eta, n_report_points=n_report_points)
    if ood:
        n_ood = min(n_problems, 64) if n_ood_problems is None else n_ood_problems
        cells = ood_cells(cfg.n_dims, cfg.n_points, kappa=cfg.scale_cond, scale_target=cfg.scale_target,
                          kappas=ood_kappas, scales=ood_scales)
        draw = functools.partial(_draw_cell, jax.random.fold_in(key, 2), n_problems=n_ood, n_dims=cfg.n_dims,
                                 normalize_a=cfg.normalize_a, normalize_x=cfg.normalize_x, dtype=task.dtype)
        report["ood"] = ood_report(lambda n: [learned, constructions(n)[0]], draw, cells,
                                   min(n_iters, 250) if n_ood_iters is None else n_ood_iters, eta=eta)
    return report


def _exact_weights_solver(exp, apply_fn: Callable, eta: Any) -> list[Solver]:
    """[the trained architecture with its exact explicit-gradient weights (lsq_jax.models.gd_weights)]
    when the experiment's model admits them (explicit_gradient task, BaseConv of width >= D(D+5)/2 ...);
    [] otherwise. It shows what the learned model's own form reaches."""
    if exp.task.name != "explicit_gradient":
        return []
    try:
        exact = explicit_gradient_params(exp.model, exp.task.n_dims, exp.task.n_points)
    except ValueError:
        return []
    return [learned_gradient_solver(apply_fn, exact, eta, name="exact_weights")]


def evaluate_constructions(n_dims: int, n_points: int, key: jax.Array, *, n_problems: int = 256,
                           n_iters: int = 1000, eta: Any = "auto", scale_cond: float = 1.0,
                           scale_target: float = 1.0, ood: bool = True, n_ood_problems: int | None = None,
                           n_ood_iters: int | None = None, ood_kappas: Sequence[float] = OOD_KAPPAS,
                           ood_scales: Sequence[float] = OOD_SCALES, n_report_points: int | None = 64,
                           dtype: Any = jnp.float64) -> dict[str, Any]:
    """The report of the hand-built GD models (the CLI's --mode=construct).

    Both constructions (BaseConv, linear attention) next to GD, optimal GD, CG and lstsq in one
    `iterated_report` on least-squares problems (A Gaussian with singular values mapped onto
    [1, scale_cond], x*, x0 times scale_target); the single-step part is each construction's relative
    step error against one exact GD step; the OOD grid (kappa x scale, fewer rows, fewer dims) holds the
    BaseConv construction. Problems: iterated from fold_in(key, 1), OOD from fold_in(key, 2). Sizes and
    OOD axes as in `evaluate_experiment`.

    Returns:
        {'kind': 'constructions', 'config': {...}, 'single_step': {...}, 'iterated': {...}[, 'ood': {...}]}.
    """
    _check_eta(eta)
    cache: dict = {}
    constructions = _construction_solvers(n_dims, eta, cache)
    sample = samplers.least_squares(example_keys(jax.random.fold_in(key, 1), 0, 0, n_problems), n_points,
                                    n_dims, scale_cond=scale_cond, scale_target=scale_target, dtype=dtype)
    solvers = [*constructions(n_points), *_classical_solvers(eta)]
    iterated = iterated_report(solvers, sample, n_iters, eta=eta, n_report_points=n_report_points)
    x_gd1 = run_solver(gd_solver(eta), sample.a, sample.b, sample.x0, 1)[1]
    single = {"n_problems": int(n_problems)}
    for solver in constructions(n_points):
        x1 = run_solver(solver, sample.a, sample.b, sample.x0, 1)[1]
        single[f"{solver.name}_relative_step_error"] = _quantile_dict(
            _relative_error_b(x1, x_gd1, x_gd1 - sample.x0))
    report = {
        "kind": "constructions",
        "config": {"n_dims": n_dims, "n_points": n_points, "eta": eta if isinstance(eta, str) else float(eta),
                   "scale_cond": float(scale_cond), "scale_target": float(scale_target),
                   "dtype": jnp.dtype(dtype).name},
        "single_step": single,
        "iterated": iterated,
    }
    if ood:
        n_ood = min(n_problems, 64) if n_ood_problems is None else n_ood_problems
        cells = ood_cells(n_dims, n_points, kappa=scale_cond, scale_target=scale_target, kappas=ood_kappas,
                          scales=ood_scales)
        draw = functools.partial(_draw_cell, jax.random.fold_in(key, 2), n_problems=n_ood, n_dims=n_dims,
                                 dtype=dtype)
        report["ood"] = ood_report(lambda n: constructions(n)[:1], draw, cells,
                                   min(n_iters, 250) if n_ood_iters is None else n_ood_iters, eta=eta)
    return report


# ---------------------------------------------------------------------------------------------------
# Terminal table


def _fmt(x, spec: str = ".1e") -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return format(x, spec)


def format_table(report: dict[str, Any]) -> str:
    """A short terminal table: one row per method of the iterated report (GD steps per iteration k, its
    iterations, final forward error, floor, floor / (kappa eps), iterations to 1e-6 / 1e-10 / 1e-14,
    contraction and its theory), then the single-step metrics and the OOD cells with their gaps."""
    lines = []
    cfg = report.get("config", {})
    if cfg:
        lines.append("  ".join(f"{k}={v}" for k, v in cfg.items()))
    it = report.get("iterated")
    if it:
        lines.append(f"iterated use: {it['n_problems']} problems, {it['n_gd_steps']} GD steps' worth per method "
                     f"(k per iteration), eta = {it['eta']}, "
                     f"median kappa(A) = {_fmt(it['kappa']['median'], '.3g')}, eps = {it['eps']:.2e}")
        thr = [_threshold_key(t) for t in THRESHOLDS]
        header = ["method", "k", "iters", "final err", "floor", "floor/(kappa eps)", *(f"to {t}" for t in thr),
                  "contraction", "theory"]
        rows = [header]
        for name, m in it["methods"].items():
            rows.append([name, str(m["steps_per_iter"]), str(m["n_iters"]), _fmt(m["final_forward_error"]),
                         _fmt(m["floor"]), _fmt(m["floor_over_kappa_eps"], ".3g"),
                         *(_fmt(m["iters_to"][t]) for t in thr),
                         _fmt(m["contraction"], ".4g"), _fmt(m["contraction_theory"], ".4g")])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            lines.append("  ".join(cells))
    single = report.get("single_step", {})
    parts = []
    for k, v in single.items():
        if isinstance(v, dict):
            parts.append(f"{k} {_fmt(v['median'])} [{_fmt(v['p10'])}, {_fmt(v['p90'])}]")
        elif k != "n_problems":
            parts.append(f"{k} {_fmt(v)}")
    if parts:
        lines.append("single step: " + " | ".join(parts))
    ood = report.get("ood")
    if ood:
        for cell in ood["cells"]:
            desc = (f"ood {cell['axis']:<11} kappa={cell['kappa']:<5g} scale={cell['scale_target']:<4g} "
                    f"L={cell['n_points']:<3} D={cell['n_dims']:<3}")
            cols = []
            for name, m in cell["methods"].items():
                if "step_error" in m:
                    cols.append(f"{name}: step {_fmt(m['step_error']['median'])}"
                                f" (gap {_fmt(m['step_error_gap'], '.3g')})"
                                f" final {_fmt(m['final_forward_error']['median'])}"
                                f" (gap {_fmt(m['final_error_gap'], '.3g')},"
                                f" vs gd {_fmt(m['final_vs_gd']['median'], '.3g')})")
            lines.append(desc + " | " + " | ".join(cols))
    return "\n".join(lines)
