"""The hand-built exact-GD models (lsq_jax.models.gd_weights) as Solvers, iterated through their tokens.

'baseconv' is the 3-layer BaseConv construction, 'linear_attention' the one-layer linear attention
construction; both are one GD step w - eta / L A^T (A w - b) per pass, so their iterates are exact GD's.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lsq_jax.eval.solvers import Solver, auto_step_size, canonical_eta, check_eta, x_of
from lsq_jax.models import gd_weights
from lsq_jax.models.backbone import SequenceModel

__all__ = ["CONSTRUCTIONS", "construction_solver", "construction_solvers"]

CONSTRUCTIONS = ("baseconv", "linear_attention")


class ConstructionState(NamedTuple):
    """x (B, D), the problem, and per-problem weights (a params pytree with a leading B axis) or None."""

    x: jax.Array
    a: jax.Array
    b: jax.Array
    weights: Any


def _construction_builder(kind: str, n_dims: int, n_points: int):
    if kind == "baseconv":
        cfg = gd_weights.baseconv_gd_config(n_dims, n_points)
        return cfg, lambda eta: gd_weights.baseconv_gd_params(cfg, n_dims, n_points, eta)
    if kind == "linear_attention":
        cfg = gd_weights.linear_attention_gd_config(n_dims, n_points, 1)
        return cfg, lambda eta: gd_weights.linear_attention_gd_params(cfg, n_dims, n_points, eta)
    raise ValueError(f"kind={kind!r} is invalid: allowed values are {', '.join(CONSTRUCTIONS)}")


def construction_solver(kind: str, n_dims: int, n_points: int, eta: Any = "auto", *, name: str | None = None
                        ) -> Solver:
    """A hand-built exact-GD model (lsq_jax.models.gd_weights) iterated through its tokens.

    Every iteration writes x_t into every token [a_i, b_i, x_t, 0...], applies the model, and reads
    x_{t+1} from the last token (`gd_weights.make_token_step`), exactly as a learned one-step model is
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
    check_eta(eta)
    solver = _construction_solver(kind, n_dims, n_points, canonical_eta(eta))
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
            x = gd_weights.make_token_step(apply_shared, p, s.a, s.b, width)(s.x)
            return s._replace(x=x.astype(s.x.dtype))

        return Solver(name, init, step, x_of, params=build(float(eta)), follows="gd")

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
        def one(w, t):
            return model.apply({"params": w}, t[None])[0]

        return jax.vmap(one, in_axes=(axes, 0))(weights, tokens)

    def step_auto(p, s: ConstructionState) -> ConstructionState:
        x = gd_weights.make_token_step(apply_per_problem, s.weights, s.a, s.b, width)(s.x)
        return s._replace(x=x.astype(s.x.dtype))

    return Solver(name, init_auto, step_auto, x_of, params={"w0": w0, "slope": slope}, follows="gd")


def construction_solvers(n_dims: int, eta: Any) -> Callable[[int], list[Solver]]:
    """n_points -> [BaseConv, linear attention] constructions (each built once per process: `construction_solver`)."""

    def make(n_points: int) -> list[Solver]:
        return [construction_solver(kind, n_dims, n_points, eta) for kind in CONSTRUCTIONS]

    return make
