"""Levenberg-Marquardt (LM) on a model's flattened parameters: the math, as pure jittable functions.

Conventions (theta = ``ravel_pytree(params)[0]``, P entries; a batch of N problems with K residuals each,
M = N K residuals; J = dr/dtheta is M x P and is never held whole)::

    loss(theta) = (1/M) sum_i r_i^2
    JtJ = J^T J / M,   Jtr = J^T r / M            (grad loss = 2 Jtr, Gauss-Newton Hessian = 2 JtJ)
    m(delta) = (1/M) ||r + J delta||^2 = loss + 2 Jtr.delta + delta^T JtJ delta     (linear model)
    step:  (JtJ + lam D) delta = -Jtr
    pred  = loss - m(delta) = -2 Jtr.delta - delta^T JtJ delta   (= delta^T JtJ delta + 2 lam delta^T D delta
            for an exact solve), and the gain ratio rho = (loss - loss(theta + step)) / pred.

Chunks: ``n_chunks`` = C must divide N, and chunk c holds the STRIDED problems c, c + C, c + 2C, ...; the
sums over chunks are carried by a ``lax.scan``.

Devices: with ``axis_name`` the functions run inside ``jax.shard_map`` over that mesh axis, `batch` is
this device's share of the problems and the chunks are this device's own (C divides its share). Each
device accumulates its own sums over all its chunks, and one ``lax.psum`` per sum combines them after the
loop: per iteration one reduction of J^T J's lower triangle (P (P + 1) / 2 entries), J^T r and r.r, and
per damped solve the trial loss (and J^T r'' with the geodesic acceleration), whatever the chunk count.
With Cholesky every device holds J^T J, and the retries' factorisations are spread over the devices
(:func:`_tries_over_devices`: device k factorises at the k-th damping the rejections would reach; per try
the acceleration, P entries, is summed from the device that factorised it); the
row-sharded path (:func:`lm_iteration_sharded`) builds each device's rows of J^T J alone from the chunks'
gathered Jacobians, and factorises the damped matrix by a block Cholesky over the devices. Where the valley
step is tried (:func:`valley_step`), the devices' (P + 1) x (P + 1) QR triangles are gathered once (with
the predictor by CG, each CG iteration sums a J^T J v instead, P entries) and each of its corrections sums a
J^T r (P entries). Without ``axis_name`` the functions are ordinary jittable code
on the whole batch.

One iteration, :func:`lm_iteration` (Cholesky), :func:`lm_iteration_sharded` or :func:`lm_iteration_cg`,
returns its step, the new state and its metrics; lsq_jax.optim.lm_transform makes it an Optax-style
transform.

J^T J is built from its lower block triangle alone (``GRAM_MIN_ROWS``): half the multiply-adds of the
full product, in products large enough to run at the machine's matmul rate; the diagonal blocks are kept
as their lower triangles, so the sums hold P (P + 1) / 2 entries of J^T J exactly.

The scaling D and the damping rule are lsq_jax.optim.lm_damping's. References: Moré, "The
Levenberg-Marquardt algorithm: implementation and theory" (1978); Transtrum & Sethna, "Improvements to the
Levenberg-Marquardt algorithm for nonlinear least-squares minimization" (arXiv:1201.5885) and their
geodesicLM code for the geodesic acceleration.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import cho_factor, cho_solve, solve_triangular

from lsq_jax.optim.lm_damping import update_damping, update_scaling

ResidualFn = Callable[[Any, Any], jax.Array]  # (params, batch_chunk) -> residuals (n, K)


@jax.tree_util.register_pytree_node_class
class Groups(tuple):
    """A batch in groups of problems that share no computation (one per row count:
    lsq_jax.train.step.lm_residual_fn), one pytree per group, all with the same leading axis. The residuals
    of a Groups batch are the groups' concatenated in order, and a group given as None adds none: the
    Jacobian is then built one group at a time (:func:`chunk_jacobian`)."""

    def tree_flatten(self):
        return tuple(self), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(children)


# J^T J's lower block triangle is split in halves down to blocks of at most this many rows: each split
# computes its off-diagonal block as one product and recurses on the two diagonal ones (P = 3,337: blocks
# of 417 rows, 1.9 s instead of 3.2 s for the full product on 2 cores; docs/performance.md).
GRAM_MIN_ROWS = 512


class LMState(NamedTuple):
    """LM state; every leaf is an array, so it jits and checkpoints.

    Attributes:
        damping: lam, the damping the next step uses (float scalar).
        nu: Nielsen's growth factor for consecutive rejections (float scalar, 2 after an accepted step).
        scaling: D, the (P,) diagonal scaling (lsq_jax.optim.lm_damping.update_scaling); zeros before the
            first LM iteration.
        iteration, accepted, rejected: int32 counts of steps tried, accepted and rejected.
    """

    damping: jax.Array
    nu: jax.Array
    scaling: jax.Array
    iteration: jax.Array
    accepted: jax.Array
    rejected: jax.Array


ValleyLMState = NamedTuple("ValleyLMState", [*LMState.__annotations__.items(), ("valley_wait", jax.Array),
                                              ("valley_damping", jax.Array)])
ValleyLMState.__doc__ = """:class:`LMState`'s fields, then the valley step's own (:func:`lm_iteration` with
    ``valley``): a type of its own, so that the checkpoints of LM without the valley step keep LMState's tree.

    Attributes:
        damping, nu, scaling, iteration, accepted, rejected: as in :class:`LMState`.
        valley_wait: int32, the iterations left before the valley step may be tried again (VALLEY_BACKOFF
            after a try that lost, 0 after one that won).
        valley_damping: the next try's predictor damping (float scalar, relative to the mean of diag(J^T J);
            VALLEY_DAMPING at first, then moved after each try by :func:`next_valley_damping`).
    """


def init_lm_state(num_params: int, dtype: Any = None, damping0: float = 1e-3,
                  valley: bool = False) -> LMState | ValleyLMState:
    """Initial state: lam = damping0, nu = 2, D = 0 (the first step's diag(JtJ) takes over), counts 0; with
    `valley` a :class:`ValleyLMState` whose wait is 0 and whose predictor damping is VALLEY_DAMPING."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    count = lambda: jnp.zeros([], jnp.int32)  # distinct arrays: a step that donates its state needs that
    state = LMState(jnp.asarray(damping0, dtype), jnp.asarray(2.0, dtype), jnp.zeros([num_params], dtype),
                    count(), count(), count())
    return ValleyLMState(*state, count(), jnp.asarray(VALLEY_DAMPING, dtype)) if valley else state


# --------------------------------------------------------------------------------------------------
# Chunked sums over the batch.


def _chunks(batch, n_chunks):
    def split(x):
        if x.shape[0] % n_chunks:
            raise ValueError(f"n_chunks={n_chunks} must divide the batch's leading axis {x.shape[0]}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n_chunks, n_chunks, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _chunk_sum(fn, batch, n_chunks, axis_name=None):
    """sum_c fn(chunk_c) over the strided chunks, accumulated in a ``lax.scan`` carry; with `axis_name`,
    then summed over the devices along it (one ``psum`` of the whole tree, after the loop)."""
    chunks = _chunks(batch, n_chunks)
    shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], chunks))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total = jax.lax.scan(lambda acc, c: (jax.tree.map(jnp.add, acc, fn(c)), None), init, chunks)[0]
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def _triangle(block: jax.Array) -> jax.Array:
    """The lower triangle of a square block, row by row, as a vector of n (n + 1) / 2 entries."""
    return block[jnp.tril_indices(block.shape[0])]


def _square(triangle: jax.Array) -> jax.Array:
    """The symmetric block whose lower triangle is `triangle` (:func:`_triangle`'s inverse)."""
    n = (math.isqrt(8 * triangle.shape[0] + 1) - 1) // 2
    lower = jnp.zeros((n, n), triangle.dtype).at[jnp.tril_indices(n)].set(triangle)
    return lower + jnp.tril(lower, -1).T


def lower_gram(Jt: jax.Array, min_rows: int = GRAM_MIN_ROWS):
    """Jt Jt^T's lower triangle as a tree: a leaf is the lower triangle of a diagonal block Jt_i Jt_i^T (at
    most `min_rows` rows, as a vector: :func:`_triangle`), a node (top, Jt_b Jt_t^T, bottom) halves the rows.
    Trees of the same Jt shape add; their entries are (rows) (rows + 1) / 2."""
    if Jt.shape[0] <= min_rows:
        return _triangle(Jt @ Jt.T)
    h = Jt.shape[0] // 2
    return lower_gram(Jt[:h], min_rows), Jt[h:] @ Jt[:h].T, lower_gram(Jt[h:], min_rows)


def gram_depth(rows: int, min_rows: int = GRAM_MIN_ROWS) -> int:
    """How many times :func:`lower_gram` halves `rows` rows before every block has at most `min_rows`."""
    return 0 if rows <= min_rows else 1 + gram_depth(rows - rows // 2, min_rows)


def symmetric(tree) -> jax.Array:
    """The full symmetric matrix of a :func:`lower_gram` tree."""
    if not isinstance(tree, tuple):
        return _square(tree)
    top, off, bottom = tree
    return jnp.block([[symmetric(top), off.T], [off, symmetric(bottom)]])


def _flat(residual_fn, params, batch, axis_name=None):
    """theta, f(theta, chunk) -> flat residuals, and M (the residual count of the batch of every device)."""
    theta, unravel = ravel_pytree(params)
    f = lambda t, b: residual_fn(unravel(t), b).reshape(-1)
    return theta, f, jax.eval_shape(f, theta, batch).shape[0] * _device_count(axis_name)


def _device_count(axis_name) -> int:
    return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def chunk_jacobian(f, theta, chunk, per_problem):
    """(r, Jt) of one chunk: residuals (m,) and the TRANSPOSED Jacobian (P, m), by reverse mode.

    Reverse mode because P (up to ~50k) >> a chunk's residual count: a row of J costs one VJP whatever P,
    while forward mode needs P JVPs. With ``per_problem`` the residuals of problem i depend on problem i
    only, so its K x P block takes K VJPs through ONE problem instead of n K VJPs through the whole chunk.
    A chunk of :class:`Groups` has each group's problems differentiated one at a time with the other groups
    None, not one problem of every group at once (whose K VJPs per group would each run back through every
    group). J is built as (P, m) because XLA's CPU matmul runs Jt @ Jt.T (both operands contracted along
    their minor axis) about twice as fast as J.T @ J.
    """

    def jac(g, b):
        r, vjp = jax.vjp(lambda t: g(t, b), theta)
        return r, jax.vmap(vjp, out_axes=1)(jnp.eye(r.size, dtype=r.dtype))[0]

    def one_at_a_time(g, batch):
        r, Jt = jax.vmap(lambda b: jac(g, jax.tree.map(lambda x: x[None], b)), out_axes=(0, 1))(batch)
        return r.reshape(-1), Jt.reshape(Jt.shape[0], -1)

    if not per_problem:
        return jac(f, chunk)
    if not isinstance(chunk, Groups):
        return one_at_a_time(f, chunk)

    def alone(j):
        group_alone = lambda t, b: f(t, Groups(b if k == j else None for k in range(len(chunk))))
        return one_at_a_time(group_alone, chunk[j])

    parts = [alone(j) for j in range(len(chunk))]
    return jnp.concatenate([r for r, _ in parts]), jnp.concatenate([Jt for _, Jt in parts], axis=1)


def _loss(f, theta, batch, n_chunks, m, axis_name=None):
    return _chunk_sum(lambda c: jnp.sum(f(theta, c) ** 2), batch, n_chunks, axis_name) / m


def second_directional_derivative(g: Callable[[jax.Array], jax.Array], theta: jax.Array, v: jax.Array):
    """d^2/dt^2 g(theta + t v) at t = 0 (= v^T H v per output of g), exactly, by nested forward mode."""
    return jax.jvp(lambda t: jax.jvp(g, (t,), (v,))[1], (theta,), (v,))[1]


def normal_equations(residual_fn: ResidualFn, params, batch, n_chunks: int = 1, *, per_problem: bool = True,
                     axis_name: str | None = None):
    """JtJ = J^T J / M, Jtr = J^T r / M and loss = r.r / M, accumulated chunk by chunk.

    Args:
        residual_fn: ``(params, batch_chunk) -> (n, K)`` residuals of a chunk of n problems.
        params: the parameter pytree (flattened with ``ravel_pytree``; P entries).
        batch: pytree of arrays with leading axis N (divisible by ``n_chunks``).
        n_chunks: number of strided chunks; each holds a (N K / n_chunks) x P Jacobian at a time.
        per_problem: True when problem i's residuals depend on batch row i only (any model without
            cross-example ops such as batch norm): ``residual_fn`` is then called under ``vmap`` on one
            problem at a time (leaves with a leading axis of 1). False differentiates each chunk as a whole.
        axis_name: inside ``jax.shard_map``, the mesh axis the problems are split over (`batch` and
            `n_chunks` are then this device's): the sums of every device are added once, after the chunks.

    Returns:
        (JtJ (P, P), Jtr (P,), loss scalar), in the params' dtype, of the problems of every device.
    """
    theta, f, m = _flat(residual_fn, params, batch, axis_name)

    def terms(chunk):
        r, Jt = chunk_jacobian(f, theta, chunk, per_problem)
        return lower_gram(Jt), Jt @ r, r @ r

    JtJ, Jtr, ss = _chunk_sum(terms, batch, n_chunks, axis_name)
    return symmetric(JtJ) / m, Jtr / m, ss / m


def mean_squared_residual(residual_fn: ResidualFn, params, batch, n_chunks: int = 1,
                          axis_name: str | None = None) -> jax.Array:
    """loss = (1/M) sum r^2 over the batch, chunked (`axis_name` as in :func:`normal_equations`)."""
    theta, f, m = _flat(residual_fn, params, batch, axis_name)
    return _loss(f, theta, batch, n_chunks, m, axis_name)


# --------------------------------------------------------------------------------------------------
# The damped step, its scaling and the damping update.


def damped_solve(JtJ: jax.Array, Jtr: jax.Array, damping, scaling: jax.Array):
    """Solves (JtJ + lam diag(D)) delta = -Jtr by Cholesky.

    Returns:
        (delta, pred, ok, factor): the step, the linear model's predicted loss reduction
        pred = -2 Jtr.delta - delta^T JtJ delta, False when the factorisation failed (a non-finite step:
        JAX's Cholesky returns NaN for a matrix that is not positive definite), and the ``cho_factor`` of
        the damped matrix (the geodesic acceleration solves with it again).
    """
    factor = cho_factor(JtJ.at[jnp.diag_indices(JtJ.shape[0])].add(damping * scaling), lower=True)
    delta = -cho_solve(factor, Jtr)
    pred = -2.0 * (Jtr @ delta) - delta @ (JtJ @ delta)
    return delta, pred, jnp.all(jnp.isfinite(delta)) & jnp.isfinite(pred), factor


def _finish(state, step, loss, trial, pred, ok, scaling, rule, damping_min, damping_max):
    """Gain ratio, accept/reject (non-finite or non-decreasing = reject), damping, counts and metrics."""
    rho = (loss - trial) / pred
    accepted = ok & jnp.isfinite(trial) & (pred > 0) & (rho > 0)
    damping, nu = update_damping(rule, state.damping, state.nu, rho, accepted, damping_min, damping_max)
    new_state = LMState(damping, nu.astype(state.nu.dtype), scaling, state.iteration + 1,
                        state.accepted + accepted, state.rejected + (~accepted))
    metrics = dict(loss=loss, trial_loss=trial, gain_ratio=rho, predicted_reduction=pred,
                   damping=state.damping, accepted=accepted, step_norm=jnp.linalg.norm(step))
    return new_state, metrics


def lm_iteration(residual_fn: ResidualFn, params, batch, state: LMState, n_chunks: int = 1, *,
                 scaling: str = "isotropic", rule: str = "nielsen", geodesic: bool = False, alpha: float = 0.75,
                 per_problem: bool = True, max_tries: int = 1, damping_min: float = 1e-15,
                 damping_max: float = 1e15, rel_floor: float = 1e-10, valley: bool = False,
                 valley_cg: bool = False, axis_name: str | None = None):
    """One LM iteration with Cholesky on the chunk-accumulated normal equations (jittable as a whole).

    D <- update_scaling(scaling, D, diag JtJ); solve (JtJ + lam D) delta = -Jtr; evaluate the loss at
    theta + step on the SAME batch; accept iff the solve was finite, the trial loss is finite and rho > 0;
    update lam, nu by `rule` (lsq_jax.optim.lm_damping). A rejected step does not move theta. With
    ``max_tries`` > 1 a rejected step is retried at once with the raised lam, reusing JtJ and Jtr (the
    Jacobian, the expensive part, does not change until a step is accepted), up to max_tries solves.

    Geodesic acceleration (Transtrum & Sethna): with r'' = d^2/dt^2 r(theta + t delta) at t = 0 (exact, by
    nested ``jax.jvp``, chunked) the residual along the step is r + J delta + r''/2 + O(delta^3), so the
    second-order correction solves (JtJ + lam D) a = -J^T r'' / (2M) and the step is delta + a (their
    a_TS = 2a, step v + a_TS/2). It is kept only when 2 ||a||_D / ||delta||_D <= alpha (||x||_D^2 = x.Dx,
    as in geodesicLM); otherwise the whole step is rejected and lam raised, as in geodesicLM. The gain
    ratio uses the prediction of delta alone, also as in geodesicLM.

    Args:
        residual_fn, params, batch, n_chunks, per_problem, axis_name: as in :func:`normal_equations`.
        state: the :class:`LMState`; with `valley`, a :class:`ValleyLMState`.
        scaling: ``"isotropic"`` or ``"marquardt"`` (lsq_jax.optim.lm_damping).
        rule: the damping rule, ``"nielsen"`` or ``"delayed"`` (lsq_jax.optim.lm_damping).
        geodesic: add the geodesic acceleration.
        alpha: the acceleration-to-velocity bound (0.75).
        max_tries: damped solves per iteration (each rejection raises lam and solves again).
        damping_min, damping_max: clamp of lam after the update.
        rel_floor: floor of D relative to its mean (lsq_jax.optim.lm_damping.update_scaling).
        valley: after an accepted step that left more than VALLEY_WHEN of the loss, also try the valley
            step (:func:`valley_step`) at the state's predictor damping and take it where its loss is lower
            than the LM step's; after a try that lost, the next VALLEY_BACKOFF iterations try none; after
            every try the predictor damping moves (:func:`next_valley_damping`).
        valley_cg: with `valley`, the predictor by CG through the held Jacobian
            (:func:`valley_predictor_cg`) instead of QR of J (:func:`valley_predictor`).

    Returns:
        (step, new_state, metrics): the flat (P,) step of the last solve, which moves theta only when
        metrics["accepted"]; metrics loss, trial_loss, gain_ratio, predicted_reduction, damping (the lam
        of the last solve), accepted, step_norm (Euclidean, of the last proposed step), tries and, with
        geodesic, accel_ratio; with valley, valley_loss (NaN where not tried), valley_damping (the
        predictor damping of this iteration's try, or of the next where none) and valley_scale (0 where not
        taken; where taken, metrics["accepted"] is True, step_norm is the valley step's and the other
        figures stay the LM step's). The state counts every solve: iteration += tries, rejected += the
        rejected solves.
    """
    theta, f, m = _flat(residual_fn, params, batch, axis_name)
    JtJ, Jtr, loss = normal_equations(residual_fn, params, batch, n_chunks, per_problem=per_problem,
                                      axis_name=axis_name)
    D = update_scaling(scaling, state.scaling, jnp.diagonal(JtJ), rel_floor)

    def attempt(damping):
        delta, pred, ok, factor = damped_solve(JtJ, Jtr, damping, D)
        step, extra = delta, {}
        if geodesic:
            accel = -0.5 * cho_solve(factor, _geodesic_rhs(f, theta, delta, batch, n_chunks, m, axis_name))
            step, extra["accel_ratio"], ok = _accelerated(delta, accel, D, alpha, ok)
        return step, _loss(f, theta + step, batch, n_chunks, m, axis_name), pred, ok, extra

    lm_state = LMState(*state[:len(LMState._fields)])
    if _device_count(axis_name) > 1 and max_tries > 1:
        step, new_state, metrics = _tries_over_devices(JtJ, Jtr, f, theta, batch, n_chunks, m, lm_state, loss, D,
                                                       rule=rule, max_tries=max_tries, geodesic=geodesic,
                                                       alpha=alpha, damping_min=damping_min,
                                                       damping_max=damping_max, axis_name=axis_name)
    else:
        step, new_state, metrics = _tries(attempt, lm_state, theta, loss, D, rule=rule, max_tries=max_tries,
                                          damping_min=damping_min, damping_max=damping_max)
    if valley:
        step, metrics, wait, damping = _with_valley(step, metrics, state.valley_wait, state.valley_damping, f,
                                                    theta, batch, n_chunks, m, JtJ, Jtr, per_problem, axis_name,
                                                    cg=valley_cg)
        new_state = ValleyLMState(*new_state, wait, damping)
    return step, new_state, metrics


# --------------------------------------------------------------------------------------------------
# The valley step: for LM's slow phase, where the residual lies in directions J resolves only weakly.

# Where LM slows to a few percent per iteration, the residual lies in range(J) along directions whose
# squared singular values are 1e-14 of the largest and below: the formed J^T J holds them under its
# round-off (eps of the largest eigenvalue), and the residual is linear along them only over steps far
# shorter than the ones that remove it (a curved valley). The valley step moves along them anyway and
# follows the valley back: a predictor from QR of J itself at a damping that resolves them, scaled, then
# Gauss-Newton correctors at a damping that resolves only the well-determined directions, with J held fixed
# (chord steps). Both dampings are isotropic and relative to J^T J's current mean diagonal (LM's own D is
# held from the first iteration). The predictor damping that pays moves as the descent goes on, and each
# try says which way (:func:`next_valley_damping`). docs/performance.md has the measurements these
# constants come from.
VALLEY_DAMPING = 1e-14  # the predictor's first damping, relative to the mean of diag(J^T J) now
VALLEY_DAMPING_RANGE = (1e-16, 1e-12)  # the predictor damping's bounds
VALLEY_DAMPING_FACTOR = math.sqrt(10.0)  # its move after a try
VALLEY_CORRECTION_DAMPING = 1e-8  # the corrections' damping, relative to the same
VALLEY_SCALES = (2.0, 1.0, 0.7, 0.5, 0.3)  # multiples of the predictor tried; the lowest loss is kept
VALLEY_CORRECTIONS = 2  # chord steps after each scaled predictor
VALLEY_WHEN = 0.9  # tried in an iteration whose accepted LM step left more than this share of the loss
VALLEY_BACKOFF = 3  # iterations without a try after a try that lost
VALLEY_CG_ITERATIONS = 50  # conjugate-gradient iterations of the predictor by CG (valley_cg)
VALLEY_CG_PRECONDITIONER = 1e-12  # its preconditioner's damping, relative to the same mean


def held_jacobian(f, theta, batch, n_chunks: int = 1, per_problem: bool = True):
    """(r, Jt): this device's residuals (C, m) and transposed Jacobian (C, P, m) in its C chunks of m."""
    return jax.lax.map(lambda c: chunk_jacobian(f, theta, c, per_problem), _chunks(batch, n_chunks))


def jacobian_qr(f, theta, batch, n_chunks: int = 1, per_problem: bool = True, axis_name: str | None = None):
    """(R, Jt): R, the (P + 1) x (P + 1) upper triangle of a QR of [J r] over every device's problems, and
    this device's transposed Jacobian Jt (C, P, m) in its C chunks of m residuals.

    R^T R = [J r]^T [J r] without forming J^T J: R's first P columns are J's triangular factor and its
    last column holds Q^T r, so least-squares solves with R are as accurate as QR of J. Each device factors
    its own rows (padded with zero rows to at least P + 1), and the devices' R are stacked and factored
    once more (a tall-skinny QR)."""
    p = theta.size
    r, Jt = held_jacobian(f, theta, batch, n_chunks, per_problem)
    rows = jnp.concatenate([jnp.swapaxes(Jt, 1, 2).reshape(-1, p), r.reshape(-1, 1)], axis=1)
    rows = jnp.pad(rows, ((0, max(0, p + 1 - rows.shape[0])), (0, 0)))
    R = jnp.linalg.qr(rows, mode="r")
    if axis_name is not None:
        R = jnp.linalg.qr(jax.lax.all_gather(R, axis_name, tiled=True), mode="r")
    return R, Jt


def valley_predictor(R: jax.Array, damping, scaling: jax.Array, m: int) -> jax.Array:
    """-(J^T J / m + lam D)^-1 J^T r / m from :func:`jacobian_qr`'s R, by QR of [R; sqrt(m lam D)]: the
    damped step solved as a least-squares problem, accurate where the formed J^T J is not."""
    p = R.shape[1] - 1
    lower = jnp.concatenate([jnp.diag(jnp.sqrt(m * damping * scaling)), jnp.zeros((p, 1), R.dtype)], axis=1)
    R2 = jnp.linalg.qr(jnp.concatenate([R[:p], lower]), mode="r")
    return -solve_triangular(R2[:p, :p], R2[:p, p], lower=False)


def valley_predictor_cg(Jt: jax.Array, JtJ: jax.Array, Jtr: jax.Array, damping, scaling: jax.Array, m: int,
                        axis_name: str | None = None) -> jax.Array:
    """-(J^T J / m + lam D)^-1 J^T r / m by VALLEY_CG_ITERATIONS conjugate-gradient iterations from 0, each
    product J^T (J v) / m through the held Jacobian (`Jt`, this device's, as :func:`held_jacobian` gives
    it; summed over the devices), never through the formed J^T J; preconditioned by the Cholesky factor of
    the formed JtJ + VALLEY_CG_PRECONDITIONER D. The formed matrix resolves the directions above its
    round-off, so CG has only those below left to find, and no QR of J is needed."""
    factor = damped_solve(JtJ, Jtr, VALLEY_CG_PRECONDITIONER, scaling)[3]

    def matvec(v):
        product = jnp.einsum("cpm,cm->p", Jt, jnp.einsum("cpm,p->cm", Jt, v))
        return _total(product, axis_name) / m + damping * scaling * v

    return conjugate_gradients(matvec, -Jtr, 0.0, VALLEY_CG_ITERATIONS, M=lambda v: cho_solve(factor, v))[0]


def valley_step(f, theta, batch, n_chunks, m, Jt, predictor, factor, axis_name=None):
    """The best of the scaled predictors a v (VALLEY_SCALES), each followed by VALLEY_CORRECTIONS chord
    steps x <- x - (JtJ + mu)^-1 J^T r(x) / m (J at theta, `factor` the ``cho_factor`` of JtJ + mu):
    (step, its batch loss, its scale a); a non-finite loss counts as +inf."""
    chunks = _chunks(batch, n_chunks)

    def candidate(a):
        x = theta + a * predictor
        for _ in range(VALLEY_CORRECTIONS):
            r = jax.lax.map(lambda c: f(x, c), chunks)
            x = x - cho_solve(factor, _total(jnp.einsum("cpm,cm->p", Jt, r), axis_name) / m)
        loss = _loss(f, x, batch, n_chunks, m, axis_name)
        return x, jnp.where(jnp.isfinite(loss), loss, jnp.inf)

    scales = jnp.asarray(VALLEY_SCALES, theta.dtype)
    xs, losses = jax.lax.map(candidate, scales)
    best = jnp.argmin(losses)
    return xs[best] - theta, losses[best], scales[best]


def next_valley_damping(damping, loss, valley_loss, scale):
    """The predictor damping after a try from loss `loss` that ended at `valley_loss` (its best scale
    `scale`; 0 where the LM step was kept): the predictor was too short where the largest scale won, or
    where the try lost yet lowered the loss; too long where the smallest scale won, or where the try raised
    the loss. Too short divides the damping by VALLEY_DAMPING_FACTOR (a longer predictor), too long
    multiplies it, within VALLEY_DAMPING_RANGE."""
    taken = scale > 0
    short = jnp.where(taken, scale == max(VALLEY_SCALES), valley_loss < loss)
    long = jnp.where(taken, scale == min(VALLEY_SCALES), ~(valley_loss < loss))
    move = jnp.where(short, 1 / VALLEY_DAMPING_FACTOR, jnp.where(long, VALLEY_DAMPING_FACTOR, 1.0))
    return jnp.clip(damping * move, *VALLEY_DAMPING_RANGE).astype(damping.dtype)


def _with_valley(step, metrics, wait, damping, f, theta, batch, n_chunks, m, JtJ, Jtr, per_problem,
                 axis_name, cg=False):
    """The iteration's outcome with the valley step tried at predictor damping `damping` where the accepted
    LM step left more than VALLEY_WHEN of the loss and `wait` is 0, and taken where it ends lower: (step,
    metrics, the next wait, the next predictor damping); metrics gain valley_loss (NaN where not tried),
    valley_scale (0 where not taken) and valley_damping (`damping`). The predictor by QR of J
    (:func:`valley_predictor`), or with `cg` by :func:`valley_predictor_cg`."""
    def tried(_):
        mean = jnp.full_like(Jtr, jnp.mean(jnp.diagonal(JtJ)))
        if cg:
            Jt = held_jacobian(f, theta, batch, n_chunks, per_problem)[1]
            predictor = valley_predictor_cg(Jt, JtJ, Jtr, damping, mean, m, axis_name)
        else:
            R, Jt = jacobian_qr(f, theta, batch, n_chunks, per_problem, axis_name)
            predictor = valley_predictor(R, damping, mean, m)
        factor = damped_solve(JtJ, Jtr, VALLEY_CORRECTION_DAMPING, mean)[3]
        valley, loss, scale = valley_step(f, theta, batch, n_chunks, m, Jt, predictor, factor, axis_name)
        better = loss < metrics["trial_loss"]
        return jnp.where(better, valley, step), loss, jnp.where(better, scale, 0.0), better

    def skipped(_):
        return step, jnp.full([], jnp.nan, theta.dtype), jnp.zeros([], theta.dtype), jnp.zeros([], bool)

    due = metrics["accepted"] & (metrics["trial_loss"] > VALLEY_WHEN * metrics["loss"]) & (wait == 0)
    step, loss, scale, taken = jax.lax.cond(due, tried, skipped, None)
    wait = jnp.where(due, jnp.where(taken, 0, VALLEY_BACKOFF), jnp.maximum(wait - 1, 0)).astype(wait.dtype)
    moved = jnp.where(due, next_valley_damping(damping, metrics["loss"], loss, scale), damping)
    return step, {**metrics, "valley_loss": loss, "valley_scale": scale, "valley_damping": damping,
                  "step_norm": jnp.where(taken, jnp.linalg.norm(step), metrics["step_norm"])}, wait, moved


def _geodesic_rhs(f, theta, delta, batch, n_chunks, m, axis_name):
    """J^T r'' / M, r'' = d^2/dt^2 r(theta + t delta) at t = 0, chunk by chunk (:func:`lm_iteration`)."""
    def rhs(chunk):
        g = lambda t: f(t, chunk)
        return jax.vjp(g, theta)[1](second_directional_derivative(g, theta, delta))[0]

    return _chunk_sum(rhs, batch, n_chunks, axis_name) / m


def _accelerated(delta, accel, D, alpha, ok):
    """(delta + accel, 2 ||accel||_D / ||delta||_D, ok and the acceleration finite and within alpha)."""
    d_norm = lambda x: jnp.sqrt(x @ (D * x))
    accel_ratio = 2.0 * d_norm(accel) / d_norm(delta)
    return delta + accel, accel_ratio, ok & jnp.all(jnp.isfinite(accel)) & (accel_ratio <= alpha)


def _tries(attempt, state, theta, loss, D, *, rule, max_tries, damping_min, damping_max):
    """Damped solves until one is accepted or `max_tries` were made: ``attempt(lam) -> (step, trial loss,
    pred, ok, extra)``, each rejection raising lam by `rule`; `extra` is a dict of the solve's own figures
    (accel_ratio, cg_iterations), reported for the last solve. Returns (step, new_state, metrics) as
    :func:`lm_iteration` does."""
    def body(carry):
        s, _, _ = carry
        step, trial, pred, ok, extra = attempt(s.damping)
        new_s, metrics = _finish(s, step, loss, trial, pred, ok, D, rule, damping_min, damping_max)
        return new_s, step, {**metrics, **extra}

    empty = jax.eval_shape(body, (state, theta, None))[2]
    return _until_accepted(body, state, theta, empty, max_tries)


def _until_accepted(body, state, theta, metrics, max_tries):
    """Runs ``body((s, step, metrics)) -> (s, step, metrics)`` from `state` while no solve was accepted and
    fewer than `max_tries` were made (`metrics`: the shapes of the metrics body returns); adds "tries"."""
    def more(carry):
        s, _, metrics = carry
        return (s.iteration - state.iteration < max_tries) & ~metrics["accepted"]

    init = (state, jnp.zeros_like(theta), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), metrics))
    new_state, step, metrics = jax.lax.while_loop(more, body, init)
    metrics["tries"] = new_state.iteration - state.iteration
    return step, new_state, metrics


def rejected_dampings(state, n: int, rule: str, damping_min: float, damping_max: float) -> jax.Array:
    """The dampings of `n` consecutive solves from `state` that are all rejected: (n,), the first
    state.damping. A rejection moves lam and nu by `rule` alone, whatever the step was, so these are the
    dampings sequential tries would solve at."""
    lam, nu, out = state.damping, state.nu, []
    for _ in range(n):
        out.append(lam)
        lam, nu = update_damping(rule, lam, nu, jnp.zeros_like(lam), False, damping_min, damping_max)
    return jnp.stack(out)


def _tries_over_devices(JtJ, Jtr, f, theta, batch, n_chunks, m, state, loss, D, *, rule, max_tries, geodesic,
                        alpha, damping_min, damping_max, axis_name):
    """:func:`_tries` of the Cholesky path with its factorisations spread over the n devices: in each round
    of n tries device k factorises the system at the k-th damping the rejections would reach
    (:func:`rejected_dampings`), the steps are gathered, and the tries are then evaluated in order (the
    geodesic acceleration from device j's factor, the trial loss summed over the devices) until one is
    accepted. The same solves, acceptances and state as :func:`_tries`, with one factorisation per device
    per round where the replicated solve made one per try on every device."""
    n, k = _device_count(axis_name), _own_index(axis_name)

    def round_(carry):
        lam = rejected_dampings(carry[0], n, rule, damping_min, damping_max)[k]
        delta, pred, ok, factor = damped_solve(JtJ, Jtr, lam, D)
        deltas, preds, oks = jax.lax.all_gather((delta, pred, ok), axis_name)

        def attempt(j):
            step, ok, extra = deltas[j], oks[j], {}
            if geodesic:
                rhs = _geodesic_rhs(f, theta, step, batch, n_chunks, m, axis_name)
                accel = jax.lax.psum(jnp.where(k == j, -0.5 * cho_solve(factor, rhs), 0.0), axis_name)
                step, extra["accel_ratio"], ok = _accelerated(step, accel, D, alpha, ok)
            return step, _loss(f, theta + step, batch, n_chunks, m, axis_name), preds[j], ok, extra

        def body(inner):
            (s, _, _), j = inner
            step, trial, pred, ok, extra = attempt(j)
            new_s, metrics = _finish(s, step, loss, trial, pred, ok, D, rule, damping_min, damping_max)
            return (new_s, step, {**metrics, **extra}), j + 1

        def more(inner):
            (s, _, metrics), j = inner
            return (j < n) & (s.iteration - state.iteration < max_tries) & ~metrics["accepted"]

        return jax.lax.while_loop(more, body, (carry, jnp.int32(0)))[0]

    def shapes():
        metrics = _finish(state, theta, loss, loss, loss, True, D, rule, damping_min, damping_max)[1]
        return {**metrics, **({"accel_ratio": loss} if geodesic else {})}

    return _until_accepted(round_, state, theta, jax.eval_shape(shapes), max_tries)


# --------------------------------------------------------------------------------------------------
# Dense J^T J split by rows over the devices, for when one device cannot hold the Cholesky solve.

def _total(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _own_index(axis_name) -> jax.Array:
    """This device's index along `axis_name` (0 without one)."""
    return jnp.zeros([], jnp.int32) if axis_name is None else jax.lax.axis_index(axis_name)


def padded_size(n_params: int, n_devices: int) -> int:
    """P', the rows of J^T J padded to a multiple of the device count (each device holds P' / n rows)."""
    return -(-n_params // n_devices) * n_devices


def row_sharded_normal_equations(residual_fn: ResidualFn, params, batch, n_chunks: int = 1, *,
                                 per_problem: bool = True, axis_name: str | None = None):
    """:func:`normal_equations` with J^T J built and kept split by rows over the devices along `axis_name`.

    Device k owns rows k P'/n .. (k + 1) P'/n of J^T J, P' = :func:`padded_size` (J^T J padded by zero rows
    and columns). For each chunk every device all-gathers the chunks' transposed Jacobians of all devices
    (P x n m) and multiplies its own rows of it by the whole, accumulating its row block over the chunks.
    No device ever holds more of J^T J than its P'/n x P' rows, so the dense system grows with the device
    count; the price is the all-gathers, P M entries per iteration for M residuals in all (a reduction of
    J^T J moves P^2), and full rows instead of the lower triangle: twice the Cholesky path's multiply-adds.

    Returns:
        (rows (P'/n, P'), Jtr (P,), loss): this device's rows of JtJ = J^T J / M, and J^T r / M and r.r / M
        of the problems of every device.
    """
    theta, f, m = _flat(residual_fn, params, batch, axis_name)
    n = _device_count(axis_name)
    size = padded_size(theta.size, n)
    first = _own_index(axis_name) * (size // n)

    def terms(chunk):
        r, Jt = chunk_jacobian(f, theta, chunk, per_problem)
        every = Jt if axis_name is None else jax.lax.all_gather(Jt, axis_name, axis=1, tiled=True)
        every = jnp.pad(every, ((0, size - theta.size), (0, 0)))
        own = jax.lax.dynamic_slice_in_dim(every, first, size // n, axis=0)
        return own @ every.T, Jt @ r, r @ r

    rows, Jtr, ss = _chunk_sum(terms, batch, n_chunks)
    Jtr, ss = _total((Jtr, ss), axis_name)
    return rows / m, Jtr / m, ss / m


def _gathered(rows_part: jax.Array, axis_name) -> jax.Array:
    """Every device's `rows_part` (P'/n,) in device order (P',)."""
    return rows_part if axis_name is None else jax.lax.all_gather(rows_part, axis_name, tiled=True)


def row_sharded_matvec(rows: jax.Array, axis_name: str | None = None):
    """v (P,) -> JtJ v (P,) from each device's `rows` of JtJ (:func:`row_sharded_normal_equations`): the
    device's rows times v, then one all-gather of the P' / n results."""
    def matvec(v):
        return _gathered(rows @ jnp.pad(v, (0, rows.shape[1] - v.size)), axis_name)[:v.size]

    return matvec


def row_sharded_diagonal(rows: jax.Array, n_params: int, axis_name: str | None = None) -> jax.Array:
    """diag(JtJ) (P,) from each device's `rows`: the diagonal of its own square block, gathered."""
    own = jax.lax.dynamic_slice_in_dim(rows, _own_index(axis_name) * rows.shape[0], rows.shape[0], axis=1)
    return _gathered(jnp.diagonal(own), axis_name)[:n_params]


def _from_device(x: jax.Array, j, axis_name) -> jax.Array:
    """Device j's `x`, on every device along `axis_name` (a masked ``psum``)."""
    return x if axis_name is None else jax.lax.psum(jnp.where(_own_index(axis_name) == j, x, 0), axis_name)


def sharded_cholesky(rows: jax.Array, axis_name: str | None = None) -> jax.Array:
    """The lower Cholesky factor of a symmetric positive definite matrix held by rows over the devices.

    Device k holds rows k b .. (k + 1) b of the P' x P' matrix (`rows`, b x P', b = P'/n) and gets the same
    rows of its factor L (zero right of the diagonal). A right-looking block Cholesky, one block column j at
    a time: device j factors its diagonal block, every device receives that b x b factor, computes its block
    L_kj = A_kj L_jj^-T of the column and all-gathers the column (P' x b), then subtracts L_kj times the
    column's transpose from its rows right of column j. Per device n (b^3 + b^2 P') multiply-adds, P'^3 / n
    in all; the devices exchange P' (P' + b) numbers. Entries above the diagonal are garbage until the end,
    when they are zeroed. A matrix that is not positive definite gives NaN, as ``jnp.linalg.cholesky``.
    """
    b, size = rows.shape
    n, k = size // b, _own_index(axis_name)

    def column(j, a):
        akj = jax.lax.dynamic_slice_in_dim(a, j * b, b, axis=1)  # on device j, the diagonal block
        ljj = _from_device(jnp.linalg.cholesky(akj), j, axis_name)
        lkj = solve_triangular(ljj, akj.T, lower=True).T
        lkj = jnp.where(k > j, lkj, jnp.where(k == j, ljj, 0.0))
        panel = lkj if axis_name is None else jax.lax.all_gather(lkj, axis_name, tiled=True)
        right = jnp.arange(size) >= (j + 1) * b
        a = a - jnp.where(right, lkj @ panel.T, 0.0)
        return jax.lax.dynamic_update_slice_in_dim(a, lkj, j * b, axis=1)

    factor = jax.lax.fori_loop(0, n, column, rows)
    return jnp.where(jnp.arange(size) < (k + 1) * b, factor, 0.0)


def sharded_cho_solve(factor: jax.Array, rhs: jax.Array, axis_name: str | None = None) -> jax.Array:
    """A^-1 rhs, replicated (P',), from each device's rows of A's Cholesky factor (:func:`sharded_cholesky`):
    forward substitution L y = rhs, then backward L^T x = y, one device's block of b unknowns at a time
    (the forward pass exchanges b numbers per block, the backward 2 b)."""
    b, size = factor.shape
    n, k = size // b, _own_index(axis_name)
    own = jax.lax.dynamic_slice_in_dim(factor, k * b, b, axis=1)

    def forward(j, y):  # device j's row: L_jj y_j = rhs_j - L_j,<j y_<j (y is zero from block j on)
        yj = solve_triangular(own, jax.lax.dynamic_slice_in_dim(rhs, k * b, b) - factor @ y, lower=True)
        return jax.lax.dynamic_update_slice_in_dim(y, _from_device(yj, j, axis_name), j * b, axis=0)

    def backward(t, x):  # L_jj^T x_j = y_j - sum_{i > j} L_ij^T x_i (x is zero up to block j)
        j = n - 1 - t
        lkj = jax.lax.dynamic_slice_in_dim(factor, j * b, b, axis=1)
        later = _total(jnp.where(k > j, lkj.T @ jax.lax.dynamic_slice_in_dim(x, k * b, b), 0.0), axis_name)
        xj = solve_triangular(own, jax.lax.dynamic_slice_in_dim(y, j * b, b) - later, lower=True, trans="T")
        return jax.lax.dynamic_update_slice_in_dim(x, _from_device(xj, j, axis_name), j * b, axis=0)

    y = jax.lax.fori_loop(0, n, forward, jnp.zeros_like(rhs))
    return jax.lax.fori_loop(0, n, backward, jnp.zeros_like(rhs))


def damped_rows(rows: jax.Array, damping, scaling: jax.Array, axis_name: str | None = None) -> jax.Array:
    """This device's rows of JtJ + lam diag(D) (padded: the padding's diagonal is 1, so the matrix stays
    positive definite and the padded unknowns 0)."""
    b, size = rows.shape
    first = _own_index(axis_name) * b
    diagonal = jnp.pad(damping * scaling, (0, size - scaling.size), constant_values=1.0)
    return rows.at[jnp.arange(b), first + jnp.arange(b)].add(jax.lax.dynamic_slice_in_dim(diagonal, first, b))


def lm_iteration_sharded(residual_fn: ResidualFn, params, batch, state: LMState, n_chunks: int = 1, *,
                         scaling: str = "isotropic", rule: str = "nielsen", geodesic: bool = False,
                         alpha: float = 0.75, per_problem: bool = True, max_tries: int = 1,
                         damping_min: float = 1e-15, damping_max: float = 1e15, rel_floor: float = 1e-10,
                         axis_name: str | None = None):
    """:func:`lm_iteration` with J^T J split by rows over the devices, factorised there.

    Each device builds its row block of J^T J once per iteration (:func:`row_sharded_normal_equations`) and
    each damped system is factorised by the block Cholesky over the devices (:func:`sharded_cholesky`),
    whose factor solves the step and the geodesic acceleration's system (:func:`sharded_cho_solve`); no
    device holds more than its rows of either. The scaling D, the acceptance, damping, retries and geodesic
    acceleration are :func:`lm_iteration`'s, and the step is the Cholesky one to round-off.

    Args:
        As in :func:`lm_iteration`.

    Returns:
        (step, new_state, metrics) as in :func:`lm_iteration`.
    """
    theta, f, m = _flat(residual_fn, params, batch, axis_name)
    rows, Jtr, loss = row_sharded_normal_equations(residual_fn, params, batch, n_chunks, per_problem=per_problem,
                                                   axis_name=axis_name)
    D = update_scaling(scaling, state.scaling, row_sharded_diagonal(rows, theta.size, axis_name), rel_floor)
    padded = lambda v: jnp.pad(v, (0, rows.shape[1] - v.size))

    def attempt(damping):
        factor = sharded_cholesky(damped_rows(rows, damping, D, axis_name), axis_name)
        solve = lambda v: sharded_cho_solve(factor, padded(v), axis_name)[:theta.size]
        delta = -solve(Jtr)
        pred = -2.0 * (Jtr @ delta) - delta @ row_sharded_matvec(rows, axis_name)(delta)
        ok = jnp.all(jnp.isfinite(delta)) & jnp.isfinite(pred)
        step, extra = delta, {}
        if geodesic:
            accel = -0.5 * solve(_geodesic_rhs(f, theta, delta, batch, n_chunks, m, axis_name))
            step, extra["accel_ratio"], ok = _accelerated(delta, accel, D, alpha, ok)
        return step, _loss(f, theta + step, batch, n_chunks, m, axis_name), pred, ok, extra

    return _tries(attempt, state, theta, loss, D, rule=rule, max_tries=max_tries,
                  damping_min=damping_min, damping_max=damping_max)


# --------------------------------------------------------------------------------------------------
# Matrix-free Gauss-Newton-CG, for when JtJ does not fit in memory.

def linearise(f: Callable[[jax.Array, Any], jax.Array], theta: jax.Array, batch, n_chunks: int = 1):
    """The residuals of the batch at theta and their linearisation, computed once.

    Args:
        f: the flat residual function ``(theta, batch_chunk) -> (m,)``.
        theta, batch, n_chunks: the flat parameters, and the batch in `n_chunks` strided chunks.

    Returns:
        (r, jvp, vjp): r is (n_chunks, m), chunk c's residuals in row c; ``jvp(v)`` = J v (shaped as r) and
        ``vjp(u)`` = J^T u (P,). Both replay the linearisation chunk by chunk (the residuals are computed by
        a ``lax.map`` over the chunks, so its linearisation is a scan): a product holds one chunk's
        tangents, next to the primal values every chunk saved, and never runs the model forward again.
    """
    chunks = _chunks(batch, n_chunks)
    r, jvp = jax.linearize(lambda t: jax.lax.map(lambda c: f(t, c), chunks), theta)
    transpose = jax.linear_transpose(jvp, theta)
    return r, jvp, lambda u: transpose(u)[0]


CG_FORCING_MAX = 0.5  # the cap of the forcing term (lm_iteration_cg with forcing)


def forcing_term(Jtr: jax.Array) -> jax.Array:
    """The inexact Newton-CG forcing term min(0.5, sqrt(||J^T r / M||)) (Nocedal & Wright, Numerical
    Optimization, 2nd ed., Algorithm 7.1): CG stops at a residual of this share of the right-hand side, loose
    far from a minimum and tightening as the gradient vanishes (superlinear convergence near a solution)."""
    return jnp.minimum(CG_FORCING_MAX, jnp.sqrt(jnp.linalg.norm(Jtr)))


def conjugate_gradients(A: Callable[[jax.Array], jax.Array], b: jax.Array, tol, maxiter: int,
                        M: Callable[[jax.Array], jax.Array] | None = None):
    """x ~ A^-1 b by CG from 0 (A symmetric positive definite, given as a function), preconditioned by `M`
    (a function applying an approximation of A^-1; None: none), stopping when ||b - A x|| <= tol ||b|| (tol
    may be traced; 0 runs all `maxiter` iterations) or after `maxiter` iterations.

    Returns:
        (x, iterations): the last iterate and the CG iterations (products with A) it took.
    """
    precondition = (lambda v: v) if M is None else M
    bb = b @ b

    def more(carry):
        _, r, _, _, k = carry
        return (r @ r > tol * tol * bb) & (k < maxiter)

    def body(carry):
        x, r, p, gamma, k = carry
        Ap = A(p)
        alpha = gamma / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        z = precondition(r)
        gamma_next = r @ z
        return x, r, z + (gamma_next / gamma) * p, gamma_next, k + 1

    z = precondition(b)
    x, *_, k = jax.lax.while_loop(more, body, (jnp.zeros_like(b), b, z, b @ z, jnp.int32(0)))
    return x, k


def damped_cg_solve(matvec: Callable[[jax.Array], jax.Array], Jtr: jax.Array, damping, scaling: jax.Array,
                    *, tol=1e-10, maxiter: int = 100):
    """Solves (JtJ + lam diag(D)) delta = -Jtr by CG (:func:`conjugate_gradients`).

    ``matvec(v)`` = JtJ v. CG starts from 0 and stops when the residual norm is <= tol ||Jtr|| or after
    ``maxiter`` iterations; every CG iterate is a descent direction of the damped model, so a truncated
    solve is still usable. pred is computed with one more matvec, so it is exact for an inexact solve.

    Returns:
        (delta, pred, ok, iterations): as in :func:`damped_solve` (no factor), ok False for a non-finite
        step, and the CG iterations taken.
    """
    delta, iterations = _damped_cg(matvec, Jtr, damping, scaling, tol, maxiter)
    delta = -delta
    pred = -2.0 * (Jtr @ delta) - delta @ matvec(delta)
    return delta, pred, jnp.all(jnp.isfinite(delta)) & jnp.isfinite(pred), iterations


def _damped_cg(matvec, b, damping, scaling, tol, maxiter):
    """((JtJ + lam diag(D))^-1 b, CG iterations) by CG from 0, unpreconditioned."""
    return conjugate_gradients(lambda x: matvec(x) + damping * scaling * x, b, tol, maxiter)


def lm_iteration_cg(residual_fn: ResidualFn, params, batch, state: LMState, n_chunks: int = 1, *,
                    scaling: str = "isotropic", rule: str = "nielsen", tol: float = 1e-10, maxiter: int = 100,
                    forcing: bool = False,
                    n_probes: int = 4, geodesic: bool = False, alpha: float = 0.75, max_tries: int = 1,
                    damping_min: float = 1e-15,
                    damping_max: float = 1e15, axis_name: str | None = None):
    """One LM iteration solved matrix-free by CG; same acceptance, damping, retries and geodesic acceleration
    as :func:`lm_iteration`.

    The residuals are linearised once per iteration (:func:`linearise`, in `n_chunks` chunks): J^T r, every
    CG product J^T J v = J^T (J v) / M and, with geodesic, J^T r'' replay that linearisation. CG is not
    preconditioned: on the BaseConv model a truncated Jacobi-preconditioned CG came out further from the
    exact step than plain CG with the same iterations (docs/performance.md). Retries reuse the
    linearisation.

    D = s I, with s from `scaling` applied to an estimate of mean(diag(JtJ)) = tr(JtJ) / P (isotropic:
    the first iteration's estimate, held; marquardt: its running maximum), the estimate by
    Hutchinson's estimator tr(JtJ) ~ (1/S) sum_k ||J z_k||^2 / M over S = ``n_probes`` Rademacher
    vectors z_k (keyed by the iteration count, so a run is reproducible), which makes lam comparable to the
    Cholesky path's lam.

    Args:
        tol, maxiter: CG stopping rule (see :func:`damped_cg_solve`).
        forcing: stop each CG solve at the relative residual :func:`forcing_term` of this iteration's
            J^T r / M instead of `tol` (still at most `maxiter` iterations).
        n_probes: S, the Hutchinson probes per iteration.
        Others: as in :func:`lm_iteration` (the acceleration's system is solved by CG too).

    Returns:
        (step, new_state, metrics) as in :func:`lm_iteration`, with metrics cg_iterations: the CG
        iterations of the last solve (its acceleration's included).
    """
    theta, f, m = _flat(residual_fn, params, batch, axis_name)
    total = (lambda x: x) if axis_name is None else (lambda x: jax.lax.psum(x, axis_name))
    probes = jax.random.rademacher(jax.random.fold_in(jax.random.key(0), state.iteration),
                                   (n_probes, theta.size), theta.dtype)
    r, jvp, vjp = linearise(f, theta, batch, n_chunks)
    Jtr, loss, probed = total((vjp(r), jnp.sum(r * r), jnp.sum(jax.vmap(jvp)(probes) ** 2)))
    Jtr, loss = Jtr / m, loss / m
    mean_diag = jnp.maximum(probed / (m * n_probes * theta.size), jnp.finfo(theta.dtype).tiny)
    D = update_scaling(scaling, state.scaling, jnp.full_like(state.scaling, mean_diag))
    matvec = lambda v: total(vjp(jvp(v))) / m

    tol = forcing_term(Jtr) if forcing else tol

    def attempt(damping):
        delta, pred, ok, iterations = damped_cg_solve(matvec, Jtr, damping, D, tol=tol, maxiter=maxiter)
        step, extra = delta, {}
        if geodesic:
            chunks = _chunks(batch, n_chunks)
            rvv = jax.lax.map(lambda c: second_directional_derivative(lambda t: f(t, c), theta, delta), chunks)
            accel, more = _damped_cg(matvec, total(vjp(rvv)) / m, damping, D, tol, maxiter)
            step, extra["accel_ratio"], ok = _accelerated(delta, -0.5 * accel, D, alpha, ok)
            iterations = iterations + more
        extra["cg_iterations"] = iterations
        return step, _loss(f, theta + step, batch, n_chunks, m, axis_name), pred, ok, extra

    return _tries(attempt, state, theta, loss, D, rule=rule, max_tries=max_tries,
                  damping_min=damping_min, damping_max=damping_max)
