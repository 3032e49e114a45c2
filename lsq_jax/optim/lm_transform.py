"""Levenberg-Marquardt as an Optax-style transform, and the hybrid that runs the Adam recipe first.

LM's objective arrives as extra arguments of ``update``, as ``optax.lbfgs`` takes ``value_fn``: the
residual function, the batch it fits and the number of Jacobian chunks. LM reads no gradient, so the
``updates`` argument is ignored (pass None)::

    tx = levenberg_marquardt("cholesky", geodesic=True)
    state = tx.init(params)                                    # an lm.LMState
    updates, state, metrics = tx.update(None, state, params, residual_fn=residuals, batch=batch,
                                        n_chunks=4)
    params = optax.apply_updates(params, updates)

The one departure from Optax's signature: LM's ``update`` also returns the iteration's metrics (loss,
trial_loss, gain_ratio, damping, accepted, ...; :func:`lsq_jax.optim.lm.lm_iteration`). Optax keeps such
values in the state, but the LMState is what checkpoints hold, and a new leaf would stop earlier
checkpoints from restoring. Hence :class:`LMTransformation` is its own type, not an
``optax.GradientTransformationExtraArgs``: ``optax.chain`` expects two return values, and LM computes the
whole step, so there is nothing to chain it with.

The hybrid (:func:`adam_then_lm`) keeps the state ``{"adam": <the Adam recipe's state>, "lm": LMState}``
and is two transforms on it, each with one return shape: ``hybrid.adam``, an Optax transform (it chains),
and ``hybrid.lm``, an :class:`LMTransformation`; ``hybrid.phase(lm)`` picks one. The phase is static, so
each is a jitted function of its own: an LM step never computes Adam's gradient, nor an Adam step J^T J.
The state cannot make that choice: under ``jax.jit`` its values are traced, so a switch on them would
compile both phases into one ``lax.cond`` (and the caller would still have to compute Adam's gradient
before calling), and reading them on the host would stall the train loop's asynchronous dispatch every
step. The train loop already knows the step on the host, and with it the phase (optim.lm_after).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from lsq_jax.config.optim import LM_RULES, LM_SCALINGS, SOLVER_SETTINGS, OptimConfig, check_solver_settings
from lsq_jax.optim import lm, recipe

TRANSFORM_SOLVERS = tuple(SOLVER_SETTINGS)  # every LM solver but the config's "auto"


class LMTransformation(NamedTuple):
    """An Optax-style transform whose LM update also returns the iteration's metrics.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(updates, state, params, *, residual_fn, batch, n_chunks=1, axis_name=None,
            **extra_args) -> (updates, state, metrics)``.
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple]


def levenberg_marquardt(solver: str = "cholesky", *, scaling: str = "isotropic", rule: str = "nielsen",
                        damping0: float = 1e-3, geodesic: bool = False, alpha: float = 0.75,
                        max_tries: int | None = None, valley: bool | None = None, valley_cg: bool | None = None,
                        per_problem: bool = True,
                        rel_floor: float = 1e-10,
                        cg_iters: int | None = None, cg_tol: float | None = None, cg_forcing: bool | None = None,
                        n_probes: int = 4,
                        damping_min: float = 1e-15, damping_max: float = 1e15) -> LMTransformation:
    """One Levenberg-Marquardt iteration per update, on the flattened parameters (lsq_jax.optim.lm).

    ``update(updates, state, params, *, residual_fn, batch, n_chunks=1, axis_name=None, **extra_args)``:
    `updates` is ignored; ``residual_fn(params, batch_chunk) -> (n, K)`` residuals, `batch` the problems LM
    fits (leading axis N), `n_chunks` the strided chunks the Jacobian is built in (a Python int dividing N);
    inside ``jax.shard_map``, `axis_name` the mesh axis the problems are split over (`batch` and `n_chunks`
    are then one device's; lsq_jax.optim.lm); other extra arguments are ignored. Returns (updates, state,
    metrics): ``optax.apply_updates(params, updates)`` is theta + step where the step was accepted and
    theta otherwise, bit for bit.

    Args:
        solver: ``"cholesky"`` (:func:`lsq_jax.optim.lm.lm_iteration`, dense J^T J), ``"sharded"``
            (:func:`lsq_jax.optim.lm.lm_iteration_sharded`, dense J^T J split by rows over `axis_name`,
            factorised there) or ``"cg"`` (:func:`lsq_jax.optim.lm.lm_iteration_cg`, matrix-free). The
            config's ``"auto"`` is resolved by the run's plan before a transform is made.
        scaling, rule: the scaling D and the damping rule (lsq_jax.optim.lm_damping).
        damping0: the initial damping lam, > 0.
        geodesic, alpha, per_problem: the geodesic acceleration and its bound, per-problem Jacobians (the
            dense solvers').
        max_tries: damped solves per iteration; rel_floor: D's floor (the dense solvers').
        valley: the valley step in the slow phase ("cholesky" only; lsq_jax.optim.lm.lm_iteration).
        valley_cg: with `valley`, its predictor by CG through the held Jacobian (lsq_jax.optim.lm).
        cg_iters, cg_tol: CG's iterations and tolerance per damped solve ("cg"); cg_tol left None is 1e-10.
        cg_forcing: CG's tolerance from the forcing term instead of cg_tol ("cg"; lsq_jax.optim.lm).
        n_probes: the Hutchinson probes of "cg".
        max_tries, cg_iters and cg_forcing left None take the value OptimConfig gives them under `solver`
            (lsq_jax.config.optim.SOLVER_SETTINGS).
        damping_min, damping_max: clamp of lam after each update.

    Returns:
        An :class:`LMTransformation` whose state is an :class:`lsq_jax.optim.lm.LMState` (with `valley`, a
        :class:`lsq_jax.optim.lm.ValleyLMState`) with P = ``ravel_pytree(params)[0].size`` and its dtype.

    Raises:
        ValueError: an unknown solver, scaling or rule, damping0 <= 0, a count < 1, or a setting `solver`
            does not read (a ConfigError, lsq_jax.config.optim.check_solver_settings).
    """
    for name, value, allowed in (("solver", solver, TRANSFORM_SOLVERS), ("scaling", scaling, LM_SCALINGS),
                                 ("rule", rule, LM_RULES)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not allowed: must be one of {', '.join(allowed)}")
    if not damping0 > 0:
        raise ValueError(f"damping0={damping0!r} is not allowed: must be > 0")
    check_solver_settings(solver, {"lm_tries": max_tries, "lm_cg_iters": cg_iters, "lm_valley": valley,
                                   "lm_valley_cg": valley_cg, "lm_cg_forcing": cg_forcing},
                          names={"lm_tries": "max_tries", "lm_cg_iters": "cg_iters", "lm_valley": "valley",
                                 "lm_valley_cg": "valley_cg", "lm_cg_forcing": "cg_forcing"})
    if valley_cg and not valley:
        raise ValueError(f"valley_cg={valley_cg!r} is not allowed without valley=True: it picks the valley step's "
                         "predictor")
    unset = SOLVER_SETTINGS[solver]
    max_tries = unset["lm_tries"] if max_tries is None else max_tries
    cg_iters = unset.get("lm_cg_iters", 1) if cg_iters is None else cg_iters
    cg_forcing = unset.get("lm_cg_forcing", False) if cg_forcing is None else cg_forcing
    for name, value in (("max_tries", max_tries), ("cg_iters", cg_iters), ("n_probes", n_probes)):
        if value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: must be >= 1")
    damping = dict(scaling=scaling, rule=rule, damping_min=damping_min, damping_max=damping_max,
                   geodesic=geodesic, alpha=alpha, max_tries=max_tries)
    if solver == "cg":
        iterate = functools.partial(lm.lm_iteration_cg, tol=1e-10 if cg_tol is None else cg_tol, maxiter=cg_iters,
                                    forcing=cg_forcing, n_probes=n_probes, **damping)
    elif solver == "sharded":
        iterate = functools.partial(lm.lm_iteration_sharded, per_problem=per_problem, rel_floor=rel_floor,
                                    **damping)
    else:
        iterate = functools.partial(lm.lm_iteration, per_problem=per_problem, rel_floor=rel_floor,
                                    valley=bool(valley), valley_cg=bool(valley_cg), **damping)

    def init_fn(params):
        theta = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
        return lm.init_lm_state(theta.size, theta.dtype, damping0, valley=bool(valley))

    def update_fn(updates, state, params, *, residual_fn, batch, n_chunks: int = 1, axis_name=None,
                  **extra_args):
        del updates, extra_args
        step, state, metrics = iterate(residual_fn, params, batch, state, n_chunks, axis_name=axis_name)
        unravel = ravel_pytree(params)[1]
        # A rejected step adds -0.0, not 0.0: p + (-0.0) is p bit for bit, p = -0.0 included.
        return unravel(jnp.where(metrics["accepted"], step, -0.0)), state, metrics

    return LMTransformation(init_fn, update_fn)


class Hybrid(NamedTuple):
    """The Adam recipe, then Levenberg-Marquardt: two transforms on one state ``{"adam": ..., "lm": LMState}``.

    Attributes:
        adam: an ``optax.GradientTransformationExtraArgs``: the recipe on the "adam" part,
            ``update(updates, state, params, **extra_args) -> (updates, state)``.
        lm: an :class:`LMTransformation`: the LM iteration on the "lm" part, ``update(...) -> (updates,
            state, metrics)``.
    Each leaves the other part as it was; both ``init`` the whole state.
    """

    adam: optax.GradientTransformationExtraArgs
    lm: LMTransformation

    @property
    def init(self) -> Callable[[Any], Any]:
        return self.adam.init

    def phase(self, lm: bool):
        """The transform of the phase: `lm` (an LM iteration) or the recipe's."""
        return self.lm if lm else self.adam


def adam_then_lm(adam: optax.GradientTransformation, lm_tx: LMTransformation) -> Hybrid:
    """The hybrid of `adam` (the recipe) and `lm_tx`, on the state ``{"adam": adam.init(params), "lm":
    lm_tx.init(params)}``; the caller picks the phase (see the module docstring)."""
    adam = optax.with_extra_args_support(adam)

    def init_fn(params):
        return {"adam": adam.init(params), "lm": lm_tx.init(params)}

    def adam_update(updates, state, params=None, **extra_args):
        updates, adam_state = adam.update(updates, state["adam"], params, **extra_args)
        return updates, {**state, "adam": adam_state}

    def lm_update(updates, state, params, **extra_args):
        updates, lm_state, metrics = lm_tx.update(updates, state["lm"], params, **extra_args)
        return updates, {**state, "lm": lm_state}, metrics

    return Hybrid(optax.GradientTransformationExtraArgs(init_fn, adam_update), LMTransformation(init_fn, lm_update))


def make_lm_optimizer(cfg: OptimConfig) -> Hybrid:
    """optimizer 'lm': ``adam_then_lm(recipe.make_optimizer(cfg), levenberg_marquardt(<cfg.lm_*>))``.

    The config's solver is a concrete one (the plan resolves 'auto'); it leaves the settings its solver
    does not read unset (lsq_jax.config.optim.SOLVER_SETTINGS).
    """
    if cfg.optimizer != "lm":
        raise ValueError(f"make_lm_optimizer needs optimizer='lm', not {cfg.optimizer!r}")
    if cfg.lm_solver == "auto":
        raise ValueError("lm_solver='auto' is picked by the run's plan (lsq_jax.plan.run.make_plan): make the "
                         "optimizer from the plan's exp, or name the solver")
    lm_tx = levenberg_marquardt(cfg.lm_solver, scaling=cfg.lm_scaling, rule=cfg.lm_rule, damping0=cfg.lm_damping,
                                geodesic=cfg.lm_geodesic, max_tries=cfg.lm_tries, valley=cfg.lm_valley,
                                valley_cg=cfg.lm_valley_cg, cg_iters=cfg.lm_cg_iters, cg_forcing=cfg.lm_cg_forcing)
    return adam_then_lm(recipe.make_optimizer(cfg), lm_tx)
