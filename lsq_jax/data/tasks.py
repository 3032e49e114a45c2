"""make_task: the Task of a TaskConfig (drawing its fixed random choices), and the curriculum's value."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lsq_jax.config.check import fail, is_int
from lsq_jax.config.task import CurriculumConfig, TaskConfig
from lsq_jax.data.base import Task
from lsq_jax.data.least_squares import ExplicitGradientTask, LeastSquaresIclTask, LeastSquaresTask, MultistepGdTask
from lsq_jax.data.primitives import ElementwiseMultiplyTask, IdentityTask, LinearTask, ReadTask, SquareTask

_TASK_CLASSES = {
    "identity": IdentityTask,
    "square": SquareTask,
    "elementwise_multiply": ElementwiseMultiplyTask,
    "read": ReadTask,
    "linear": LinearTask,
    "least_squares": LeastSquaresTask,
    "least_squares_icl": LeastSquaresIclTask,
    "explicit_gradient": ExplicitGradientTask,
    "multistep_gd": MultistepGdTask,
}


def _draw_read_pair(cfg: TaskConfig) -> tuple[int, int]:
    """(i, j) = sorted randint(0, L, 2) from the task seed; i == j possible (read).

    Evaluated eagerly even when make_task is called while tracing (inside a jitted train step).
    """
    with jax.ensure_compile_time_eval():
        ij = jax.random.randint(jax.random.key(cfg.task_seed), (2,), 0, cfg.n_points)
        i, j = sorted(int(v) for v in ij)
    return i, j


def _draw_linear_coef(cfg: TaskConfig) -> tuple[float, ...]:
    """c = 3 N(0, I_D) from the task seed; with `sparsity` s, a random D - s of the entries are zeroed."""
    # eager even while tracing; drawn in the widest float available, then rounded to the task dtype at
    # use, so float32 and float64 runs with one seed learn the same c
    with jax.ensure_compile_time_eval():
        key_c, key_perm = jax.random.split(jax.random.key(cfg.task_seed))
        c = 3 * jax.random.normal(key_c, (cfg.n_dims,), jax.dtypes.canonicalize_dtype(jnp.float64))
        if cfg.sparsity is not None and cfg.sparsity < cfg.n_dims:
            zeroed = jax.random.permutation(key_perm, cfg.n_dims)[: cfg.n_dims - cfg.sparsity]
            c = c.at[zeroed].set(0)
        return tuple(float(v) for v in c)


def make_task(
    cfg: TaskConfig,
    *,
    read_pair: Sequence[int] | None = None,
    linear_coef: Sequence[float] | None = None,
) -> Task:
    """The task of `cfg`. Call on the host, not under `jit` (it draws the fixed choices).

    Args:
        cfg: a validated TaskConfig.
        read_pair: read only: an explicit (i, j) with 0 <= i <= j < n_points instead of the one drawn
            from the task seed (e.g. the reference's saved pair).
        linear_coef: linear only: explicit coefficients c (D,), used as given (sparsity not applied),
            instead of the ones drawn from the task seed.

    Returns:
        A frozen, hashable Task.
    """
    if not isinstance(cfg, TaskConfig):
        raise ValueError(f"cfg={cfg!r} is invalid: allowed is a TaskConfig")
    if read_pair is not None and cfg.name != "read":
        fail("read_pair", read_pair, f"None for {cfg.name} (only read has a pair)")
    if linear_coef is not None and cfg.name != "linear":
        fail("linear_coef", linear_coef, f"None for {cfg.name} (only linear has coefficients)")
    if cfg.name == "read":
        if read_pair is None:
            pair = _draw_read_pair(cfg)
        else:
            pair = tuple(int(v) for v in read_pair)
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1] < cfg.n_points:
                fail("read_pair", read_pair, f"(i, j) with 0 <= i <= j < n_points={cfg.n_points}")
        return ReadTask(cfg, pair=pair)
    if cfg.name == "linear":
        if linear_coef is None:
            coef = _draw_linear_coef(cfg)
        else:
            coef = tuple(float(v) for v in linear_coef)
            if len(coef) != cfg.n_dims or not all(math.isfinite(v) for v in coef):
                fail("linear_coef", linear_coef, f"{cfg.n_dims} finite numbers (n_dims)")
        return LinearTask(cfg, coef=coef)
    return _TASK_CLASSES[cfg.name](cfg)


def curriculum_value(cfg: CurriculumConfig, counter: Any) -> Any:
    """The curriculum's value after `counter` increments: min(start + inc * floor(counter / interval), end).

   : a counter is incremented every training iteration (skipped steps included), and
    whenever it is a multiple of `interval`, `inc` is added, capped at `end`. The counter starts at 0 and
    is incremented at the END of an iteration (as in the reference loop), so the iteration with 0-based
    index t uses counter = t: iteration 0 uses `start` (the initial 0 is not reached by an increment, so
    adds nothing), and `inc` is first added for iteration `interval`.

    Args:
        cfg: the schedule.
        counter: training iterations completed so far (>= 0); a Python int (the driver, choosing static
            shapes on the host) gives a Python int, an integer jax array gives an array.

    Returns:
        The value, same kind as `counter`.
    """
    if isinstance(counter, jax.Array):
        return jnp.minimum(cfg.start + cfg.inc * (counter // cfg.interval), cfg.end)
    if not is_int(counter) or counter < 0:
        fail("counter", counter, "integers >= 0 or an integer jax array")
    return min(cfg.start + cfg.inc * (counter // cfg.interval), cfg.end)
