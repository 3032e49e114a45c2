"""Tasks: (raw sample) -> (model input, target), where the prediction is read, the metric (SPEC section 2).

A task is built once on the host from a validated `TaskConfig` by `make_task`. It is a frozen, hashable
dataclass (its fixed random choices, the `read` pair and the `linear` coefficients, are stored as Python
tuples), so it can be closed over or passed as a static argument to `jax.jit`. Its methods are pure:

    batch = task.sample(keys)                       # draw raw data (samplers.py) then build
    inputs, targets = task.build(raw)               # pure on a raw sample: x, or a LeastSquaresSample
    pred = model(inputs)                            # (B, seq_len, >= out_dims)
    loss = task.loss(pred, targets)                 # mean squared error on task.read(pred)

Shapes: inputs (B, seq_len(L), in_dims); targets (B, P, C) with P = len(target_positions(L)) and
read(pred).shape == targets.shape. The module also has the curriculum (SPEC section 2, last item).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax.data import samplers
from lsq_jax.data.samplers import LeastSquaresSample

__all__ = [
    "CurriculumConfig",
    "ElementwiseMultiplyTask",
    "ExplicitGradientTask",
    "IdentityTask",
    "LeastSquaresIclTask",
    "LeastSquaresTask",
    "LinearTask",
    "MultistepGdTask",
    "ReadTask",
    "SquareTask",
    "TASK_NAMES",
    "Task",
    "TaskBatch",
    "TaskConfig",
    "curriculum_value",
    "explicit_gradient_inputs",
    "gradient_descent",
    "least_squares_gradient",
    "make_task",
    "mean_relative_error",
    "multistep_gd_inputs",
    "prefix_gradients",
    "primitive_metrics",
    "relative_l2_error",
]

PRIMITIVE_NAMES = ("identity", "square", "elementwise_multiply", "read", "linear")
LEAST_SQUARES_NAMES = ("least_squares", "least_squares_icl", "explicit_gradient", "multistep_gd")
TASK_NAMES = PRIMITIVE_NAMES + LEAST_SQUARES_NAMES

# Tasks with a `setting`: the allowed values, the first being the default.
_SETTINGS = {
    "explicit_gradient": ("last", "all"),
    "least_squares_icl": ("neighboring", "concat"),
}
_DTYPES = ("float64", "float32")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: allowed values are {allowed}")


def _is_int(value: Any) -> bool:
    # numbers.Integral also admits numpy ints (e.g. read from a saved config); bool is not a size.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What to learn, validated on construction (SPEC section 2).

    Attributes:
        name: one of TASK_NAMES.
        n_dims: D > 0, the problem dimension (default 5, as in the published least-squares runs).
        n_points: L > 0, points per example (default 20); the length `sample` draws unless told, and the
            range [0, L) of the `read` pair (with a points curriculum, give the curriculum's START here,
            as the reference does, so the pair exists at every length).
        setting: explicit_gradient 'last' (default) | 'all'; least_squares_icl 'neighboring' (default) |
            'concat'; must be None for every other task. None selects the default.
        num_iters: k >= 1, gradient steps of multistep_gd (default 4, published).
        eta: step size > 0 of multistep_gd (default 0.5, published).
        sparsity: linear only: None (all D coefficients) or the NUMBER of nonzero coefficients, 1..D.
        task_seed: int seed of the task's fixed random choices (read's pair, linear's c); default 0.
        normalize, scale: gaussian sampler options for the primitives (unit rows; multiply by scale > 0).
        normalize_a, scale_cond, normalize_x, scale_target: least-squares sampler options (unit rows of
            A; condition number kappa >= 1; unit x*, x0; multiply x*, x0 by scale_target > 0).
            Sampler options of the other family are validated but unused.
        dtype: 'float64' (default) or 'float32', the dtype of every floating array a task returns.
    """

    name: str
    n_dims: int = 5
    n_points: int = 20
    setting: str | None = None
    num_iters: int = 4
    eta: float = 0.5
    sparsity: int | None = None
    task_seed: int = 0
    normalize: bool = False
    scale: float = 1.0
    normalize_a: bool = False
    scale_cond: float = 1.0
    normalize_x: bool = False
    scale_target: float = 1.0
    dtype: str = "float64"

    def __post_init__(self):
        if self.name not in TASK_NAMES:
            _fail("name", self.name, ", ".join(TASK_NAMES))
        for field in ("n_dims", "n_points"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                _fail(field, value, "ints > 0")
        if self.name == "elementwise_multiply" and self.n_dims % 2:
            _fail("n_dims", self.n_dims, "even ints for elementwise_multiply (y = x[:D/2] * x[D/2:])")
        if self.name in _SETTINGS:
            allowed = _SETTINGS[self.name]
            if self.setting is None:
                # Resolve the default here so that equal tasks have equal (and equally hashed) configs.
                object.__setattr__(self, "setting", allowed[0])
            elif self.setting not in allowed:
                _fail("setting", self.setting, f"None or {' | '.join(map(repr, allowed))} for {self.name}")
        elif self.setting is not None:
            _fail("setting", self.setting, f"None for {self.name} (only {', '.join(_SETTINGS)} have one)")
        if not _is_int(self.num_iters) or self.num_iters < 1:
            _fail("num_iters", self.num_iters, "ints >= 1")
        if not _is_number(self.eta) or self.eta <= 0:
            _fail("eta", self.eta, "finite numbers > 0")
        if self.sparsity is not None:
            if self.name != "linear":
                _fail("sparsity", self.sparsity, f"None for {self.name} (only linear has one)")
            if not _is_int(self.sparsity) or not 1 <= self.sparsity <= self.n_dims:
                _fail("sparsity", self.sparsity, f"None or ints in [1, n_dims={self.n_dims}]")
        if not _is_int(self.task_seed):
            _fail("task_seed", self.task_seed, "ints")
        for field in ("normalize", "normalize_a", "normalize_x"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, getattr(self, field), "True or False")
        for field in ("scale", "scale_target"):
            value = getattr(self, field)
            if not _is_number(value) or value <= 0:
                _fail(field, value, "finite numbers > 0")
        if not _is_number(self.scale_cond) or self.scale_cond < 1:
            _fail("scale_cond", self.scale_cond, "finite numbers >= 1 (1 = A unchanged)")
        small = min(self.n_points, self.n_dims) < 2
        if self.scale_cond != 1 and self.name in LEAST_SQUARES_NAMES and small:
            _fail("scale_cond", self.scale_cond, "1 when min(n_points, n_dims) < 2")
        if self.dtype not in _DTYPES:
            _fail("dtype", self.dtype, " | ".join(map(repr, _DTYPES)))


class TaskBatch(NamedTuple):
    """A drawn batch: model `inputs`, `targets`, and the `raw` sample they were built from."""

    inputs: jax.Array
    targets: jax.Array
    raw: Any


# ---------------------------------------------------------------------------------------------------
# Metrics


def mean_relative_error(y_pred: jax.Array, y: jax.Array) -> jax.Array:
    """Relative error mean|y_pred - y| / mean|y| over all entries (SPEC section 2, primitives)."""
    return jnp.mean(jnp.abs(y_pred - y)) / jnp.mean(jnp.abs(y))


def relative_l2_error(y_pred: jax.Array, y: jax.Array) -> jax.Array:
    """Relative L2 error ||y_pred - y||_2 / ||y||_2 over all entries (SPEC section 2, primitives).

    This is the numerical-analysis definition. The reference's `mean_relative_l2_error` divides the
    root-mean-square error by mean|y| instead; the two differ by the factor rms(y) / mean|y|.
    """
    return jnp.sqrt(jnp.sum(jnp.square(y_pred - y)) / jnp.sum(jnp.square(y)))


def primitive_metrics(y_pred: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Evaluation metrics of the primitives on the read slice: {'mse', 'rel', 'rel_l2'}."""
    return {
        "mse": jnp.mean(jnp.square(y_pred - y)),
        "rel": mean_relative_error(y_pred, y),
        "rel_l2": relative_l2_error(y_pred, y),
    }


# ---------------------------------------------------------------------------------------------------
# Least-squares building blocks: plain functions, batched over any leading axes, for evaluation code.


def least_squares_gradient(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    """g = A^T (A x - b) / L, the explicit_gradient target (SPEC section 2; no factor 2).

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


def gradient_descent(a: jax.Array, b: jax.Array, x0: jax.Array, num_iters: int, eta: float) -> jax.Array:
    """x_k after k steps of x <- x - eta A^T (A x - b) / L from x0 (SPEC section 2, multistep_gd).

    Args:
        a: (..., L, D). b: (..., L). x0: (..., D). num_iters: k >= 0 (static). eta: step size.

    Returns:
        x_k, (..., D).
    """
    eta = jnp.asarray(eta, x0.dtype)
    return jax.lax.fori_loop(0, num_iters, lambda _, x: x - eta * least_squares_gradient(a, b, x), x0)


def explicit_gradient_inputs(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    """Tokens of explicit_gradient: token 0 = [x, 0], tokens 1..L = [a_i, b_i] (SPEC section 2).

    Evaluation rebuilds the input of a learned one-step model from (A, b, x_t) with this.

    Args:
        a: (..., L, D). b: (..., L). x: (..., D).

    Returns:
        (..., L + 1, D + 1).
    """
    first = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], axis=-1)
    rows = jnp.concatenate([a, b[..., None]], axis=-1)
    return jnp.concatenate([first[..., None, :], rows], axis=-2)


def multistep_gd_inputs(a: jax.Array, b: jax.Array, x0: jax.Array) -> jax.Array:
    """Tokens of multistep_gd: tokens 0..L-1 = [a_i, b_i], token L = [x0, 0] (x0 LAST; SPEC section 2).

    Args:
        a: (..., L, D). b: (..., L). x0: (..., D).

    Returns:
        (..., L + 1, D + 1).
    """
    rows = jnp.concatenate([a, b[..., None]], axis=-1)
    last = jnp.concatenate([x0, jnp.zeros_like(x0[..., :1])], axis=-1)
    return jnp.concatenate([rows, last[..., None, :]], axis=-2)


# ---------------------------------------------------------------------------------------------------
# Tasks


def _jitted(method):
    """Run a pure Task method as one jitted program per (task, argument shapes), the task static.

    Eager callers (evaluation, tests) then compile once instead of dispatching op by op; under an outer
    jit the call is inlined. Tasks are frozen and hashable, hence valid static arguments.
    """
    jitted = jax.jit(method, static_argnums=0)

    @functools.wraps(method)
    def wrapper(self, *args):
        return jitted(self, *args)

    return wrapper


@dataclasses.dataclass(frozen=True)
class Task:
    """Base of every task: sampling, reading the prediction and the metrics (SPEC section 2).

    Subclasses define `in_dims`, `out_dims`, `seq_len`, `target_positions`, `_draw`, `_build`, `_read`.
    The metric is the squared error on `read(pred)`; the training loss is its mean (the reference's
    `get_metric` / `get_training_metric`).
    """

    config: TaskConfig

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def n_dims(self) -> int:
        return self.config.n_dims

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.config.dtype)

    @property
    def in_dims(self) -> int:
        """Width of an input token."""
        raise NotImplementedError

    @property
    def out_dims(self) -> int:
        """Model output width the task needs: the widest output channel it reads, plus one."""
        raise NotImplementedError

    def seq_len(self, n_points: int | None = None) -> int:
        """Length of the input sequence for L = n_points (default the config's)."""
        raise NotImplementedError

    def target_positions(self, n_points: int | None = None) -> tuple[int, ...]:
        """The input/output positions whose prediction is compared with the targets, in order."""
        raise NotImplementedError

    def _n_points(self, n_points: int | None) -> int:
        n_points = self.config.n_points if n_points is None else n_points
        if not _is_int(n_points) or n_points <= 0:
            _fail("n_points", n_points, "ints > 0")
        return n_points

    # -- data --------------------------------------------------------------------------------------
    def _draw(self, keys: jax.Array, n_points: int, n_dims_truncated: Any) -> Any:
        raise NotImplementedError

    @_jitted
    def build(self, sample: Any) -> tuple[jax.Array, jax.Array]:
        """(inputs, targets) from a raw sample; pure, so saved or rebuilt samples can be fed in.

        Args:
            sample: gaussian x (B, L, D) for the primitives; a LeastSquaresSample (a (B, L, D), b (B, L),
                x_star (B, D), x0 (B, D)) for the least-squares family. Cast to the task dtype.

        Returns:
            inputs (B, seq_len(L), in_dims) and targets (B, P, C), both of the task dtype.
        """
        return self._build(sample)

    def _build(self, sample: Any) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def sample(
        self, keys: jax.Array, *, n_points: int | None = None, n_dims_truncated: Any = None
    ) -> TaskBatch:
        """Draw one example per key, then build it.

        Args:
            keys: (B,) PRNG keys, one per example (`samplers.example_keys`).
            n_points: L (static), default the config's; the curriculum's points.
            n_dims_truncated: None (default, no truncation) or the curriculum's dims: coordinates >= it
                are zeroed (model width unchanged).

        Returns:
            TaskBatch(inputs, targets, raw).
        """
        raw = self._draw(keys, self._n_points(n_points), n_dims_truncated)
        inputs, targets = self.build(raw)
        return TaskBatch(inputs=inputs, targets=targets, raw=raw)

    # -- prediction and metrics ----------------------------------------------------------------------
    @_jitted
    def read(self, pred: jax.Array) -> jax.Array:
        """The slice of the model output (B, seq_len, width) compared with the targets."""
        if pred.ndim != 3 or pred.shape[-1] < self.out_dims:
            raise ValueError(
                f"pred with shape {pred.shape} is invalid for {self.name}: allowed are (B, T, width) "
                f"with width >= out_dims={self.out_dims}"
            )
        return self._read(pred)

    def _read(self, pred: jax.Array) -> jax.Array:
        raise NotImplementedError

    @_jitted
    def pointwise_error(self, pred: jax.Array, targets: jax.Array) -> jax.Array:
        """Squared error (read(pred) - targets)**2 per entry, of targets' shape (reference `get_metric`)."""
        y_pred = self.read(pred)
        if y_pred.shape != targets.shape:
            raise ValueError(
                f"pred with shape {pred.shape} is invalid for {self.name}: read(pred) has shape "
                f"{y_pred.shape}, the targets {targets.shape}"
            )
        return jnp.square(y_pred - targets)

    @_jitted
    def per_position_loss(self, pred: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean squared error per target position, (P,): the reference's logged pointwise loss."""
        return jnp.mean(self.pointwise_error(pred, targets), axis=(0, 2))

    @_jitted
    def loss(self, pred: jax.Array, targets: jax.Array) -> jax.Array:
        """Training metric: mean squared error on read(pred) (reference `get_training_metric`)."""
        return jnp.mean(self.pointwise_error(pred, targets))

    @_jitted
    def eval_metrics(self, pred: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        """{'mse'} for every task; the primitives add 'rel' and 'rel_l2' (`primitive_metrics`)."""
        self.pointwise_error(pred, targets)  # checks the shapes
        return self._eval_metrics(self.read(pred), targets)

    def _eval_metrics(self, y_pred: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        return {"mse": jnp.mean(jnp.square(y_pred - y))}


# -- primitives (SPEC section 2, on gaussian x (B, L, D), read at every position) -------------------


@dataclasses.dataclass(frozen=True)
class PrimitiveTask(Task):
    """A primitive: input x itself, target y(x) at every position, read from channels [:out_dims]."""

    @property
    def in_dims(self) -> int:
        return self.n_dims

    @property
    def out_dims(self) -> int:
        return self.n_dims

    def seq_len(self, n_points: int | None = None) -> int:
        return self._n_points(n_points)

    def target_positions(self, n_points: int | None = None) -> tuple[int, ...]:
        return tuple(range(self._n_points(n_points)))

    def _draw(self, keys, n_points, n_dims_truncated):
        cfg = self.config
        return samplers.gaussian(
            keys,
            n_points,
            cfg.n_dims,
            normalize=cfg.normalize,
            scale=cfg.scale,
            n_dims_truncated=n_dims_truncated,
            dtype=self.dtype,
        )

    def _target(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _build(self, sample: jax.Array) -> tuple[jax.Array, jax.Array]:
        # (x, y(x)) from gaussian x (B, L, D).
        x = jnp.asarray(sample, self.dtype)
        if x.ndim != 3 or x.shape[-1] != self.n_dims:
            raise ValueError(f"x with shape {x.shape} is invalid: allowed is (B, L, n_dims={self.n_dims})")
        return x, self._target(x)

    def _read(self, pred):
        return pred[..., : self.out_dims]

    def _eval_metrics(self, y_pred, y):
        return primitive_metrics(y_pred, y)


@dataclasses.dataclass(frozen=True)
class IdentityTask(PrimitiveTask):
    """y = x."""

    def _target(self, x):
        return x


@dataclasses.dataclass(frozen=True)
class SquareTask(PrimitiveTask):
    """y = x**2 elementwise."""

    def _target(self, x):
        return jnp.square(x)


@dataclasses.dataclass(frozen=True)
class ElementwiseMultiplyTask(PrimitiveTask):
    """y = x[..., :D/2] * x[..., D/2:] (D even), read from output channels [:D/2]."""

    @property
    def out_dims(self) -> int:
        return self.n_dims // 2

    def _target(self, x):
        half = self.n_dims // 2
        return x[..., :half] * x[..., half:]


@dataclasses.dataclass(frozen=True)
class ReadTask(PrimitiveTask):
    """y = x except y[:, j] = x[:, i], for the task's fixed pair (i, j), i <= j (i == j possible).

    Attributes:
        pair: (i, j), drawn once from [0, n_points) with the task seed by `make_task`.
    """

    pair: tuple[int, int] = (0, 0)

    def _target(self, x):
        i, j = self.pair
        if j >= x.shape[1]:
            raise ValueError(
                f"n_points={x.shape[1]} is invalid for read with pair (i, j)={self.pair}: allowed are "
                f"n_points > j (draw the pair with TaskConfig.n_points = the smallest length used)"
            )
        return x.at[:, j].set(x[:, i])


@dataclasses.dataclass(frozen=True)
class LinearTask(PrimitiveTask):
    """y = x @ c (B, L, 1), read from output channel 0.

    Attributes:
        coef: c = 3 N(0, I_D) drawn once from the task seed by `make_task`, with all but `sparsity`
            entries zeroed; Python floats so the task stays hashable.
    """

    coef: tuple[float, ...] = ()

    @property
    def out_dims(self) -> int:
        return 1

    def _target(self, x):
        c = jnp.asarray(self.coef, self.dtype)
        return (x @ c)[..., None]


# -- least-squares family (SPEC section 2, on LeastSquaresSample) ----------------------------------


@dataclasses.dataclass(frozen=True)
class LeastSquaresFamilyTask(Task):
    """A task on least-squares samples (A, b, x*, x0); tokens have width D + 1."""

    @property
    def in_dims(self) -> int:
        return self.n_dims + 1

    @property
    def out_dims(self) -> int:
        return self.n_dims

    def _draw(self, keys, n_points, n_dims_truncated):
        cfg = self.config
        return samplers.least_squares(
            keys,
            n_points,
            cfg.n_dims,
            normalize_a=cfg.normalize_a,
            scale_cond=cfg.scale_cond,
            normalize_x=cfg.normalize_x,
            scale_target=cfg.scale_target,
            n_dims_truncated=n_dims_truncated,
            dtype=self.dtype,
        )

    def _unpack(self, sample: LeastSquaresSample) -> LeastSquaresSample:
        """The sample in the task dtype, with shapes checked."""
        s = LeastSquaresSample(*(jnp.asarray(v, self.dtype) for v in sample))
        batch, n_points, n_dims = s.a.shape if s.a.ndim == 3 else (None, None, None)
        expected = {"a": (batch, n_points, self.n_dims), "b": (batch, n_points),
                    "x_star": (batch, self.n_dims), "x0": (batch, self.n_dims)}
        for field, shape in expected.items():
            if getattr(s, field).shape != shape:
                raise ValueError(
                    f"sample.{field} with shape {getattr(s, field).shape} is invalid: allowed is "
                    f"(B, L, D), (B, L), (B, D), (B, D) for a, b, x_star, x0 with D = n_dims = "
                    f"{self.n_dims}"
                )
        return s

    def _read_last(self, pred: jax.Array) -> jax.Array:
        """The last position, channels [:D]."""
        return pred[:, -1:, : self.n_dims]


@dataclasses.dataclass(frozen=True)
class LeastSquaresTask(LeastSquaresFamilyTask):
    """Direct solve: tokens [a_i, b_i] (B, L, D+1); target x* (B, 1, D), read at the last position."""

    def seq_len(self, n_points=None):
        return self._n_points(n_points)

    def target_positions(self, n_points=None):
        return (self._n_points(n_points) - 1,)

    def _build(self, sample):
        s = self._unpack(sample)
        inputs = jnp.concatenate([s.a, s.b[..., None]], axis=-1)
        return inputs, s.x_star[:, None, :]

    def _read(self, pred):
        return self._read_last(pred)


@dataclasses.dataclass(frozen=True)
class LeastSquaresIclTask(LeastSquaresFamilyTask):
    """In-context regression, read from the LAST output channel (out_dims = 1).

    `neighboring`: 2L - 1 tokens alternating [a_i, 0] and [0, b_i] (the last b omitted); target b_i
    (B, L, 1) at every a-token position 0, 2, ..., 2L - 2. `concat`: L tokens [a_i, b_i] with the last b
    zeroed; target b_L (B, 1, 1) at the last position.
    """

    @property
    def out_dims(self) -> int:
        return 1

    def seq_len(self, n_points=None):
        n = self._n_points(n_points)
        return 2 * n - 1 if self.config.setting == "neighboring" else n

    def target_positions(self, n_points=None):
        n = self._n_points(n_points)
        return tuple(range(0, 2 * n - 1, 2)) if self.config.setting == "neighboring" else (n - 1,)

    def _build(self, sample):
        s = self._unpack(sample)
        batch, n_points, n_dims = s.a.shape
        if self.config.setting == "neighboring":
            inputs = jnp.zeros((batch, 2 * n_points - 1, n_dims + 1), self.dtype)
            inputs = inputs.at[:, ::2, :n_dims].set(s.a)
            inputs = inputs.at[:, 1::2, n_dims].set(s.b[:, :-1])
            return inputs, s.b[..., None]
        b_shown = s.b.at[:, -1].set(0)
        inputs = jnp.concatenate([s.a, b_shown[..., None]], axis=-1)
        return inputs, s.b[:, -1:, None]

    def _read(self, pred):
        if self.config.setting == "neighboring":
            return pred[:, ::2, -1:]
        return pred[:, -1:, -1:]


@dataclasses.dataclass(frozen=True)
class ExplicitGradientTask(LeastSquaresFamilyTask):
    """The learned GD update: token 0 = [x0, 0], tokens 1..L = [a_i, b_i]; input (B, L+1, D+1).

    `last`: target g = A^T (A x0 - b) / L (no factor 2), (B, 1, D), read at the last position, channels
    [:D]. `all` (ours, SPEC section 2): target at position j = 1..L is the gradient over the first j rows,
    A_j^T (A_j x0 - b_j) / j, (B, L, D), read from positions [1, L+1), channels [:D]. This is the causally
    consistent reading: input position j holds row j, so a causal model has seen exactly rows 1..j there.
    The reference compares its row j (mean over rows 0..j, 0-based) with output position j, one row
    ahead of what a causal model has seen; its targets are the same numbers, read one position earlier.
    """

    def seq_len(self, n_points=None):
        return self._n_points(n_points) + 1

    def target_positions(self, n_points=None):
        n = self._n_points(n_points)
        return (n,) if self.config.setting == "last" else tuple(range(1, n + 1))

    def _build(self, sample):
        s = self._unpack(sample)
        inputs = explicit_gradient_inputs(s.a, s.b, s.x0)
        if self.config.setting == "last":
            return inputs, least_squares_gradient(s.a, s.b, s.x0)[:, None, :]
        return inputs, prefix_gradients(s.a, s.b, s.x0)

    def _read(self, pred):
        if self.config.setting == "last":
            return self._read_last(pred)
        return pred[:, 1:, : self.n_dims]


@dataclasses.dataclass(frozen=True)
class MultistepGdTask(LeastSquaresFamilyTask):
    """k GD iterates: tokens 0..L-1 = [a_i, b_i], token L = [x0, 0] (x0 LAST); target x_k (B, 1, D)
    after k = num_iters steps of x <- x - eta A^T (A x - b) / L, read at the last position, channels [:D].
    """

    def seq_len(self, n_points=None):
        return self._n_points(n_points) + 1

    def target_positions(self, n_points=None):
        return (self._n_points(n_points),)

    def _build(self, sample):
        s = self._unpack(sample)
        inputs = multistep_gd_inputs(s.a, s.b, s.x0)
        x_k = gradient_descent(s.a, s.b, s.x0, self.config.num_iters, self.config.eta)
        return inputs, x_k[:, None, :]

    def _read(self, pred):
        return self._read_last(pred)


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
    """(i, j) = sorted randint(0, L, 2) from the task seed; i == j possible (SPEC section 2, read).

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
    """The task of `cfg` (SPEC section 2). Call on the host, not under `jit` (it draws the fixed choices).

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
        _fail("read_pair", read_pair, f"None for {cfg.name} (only read has a pair)")
    if linear_coef is not None and cfg.name != "linear":
        _fail("linear_coef", linear_coef, f"None for {cfg.name} (only linear has coefficients)")
    if cfg.name == "read":
        if read_pair is None:
            pair = _draw_read_pair(cfg)
        else:
            pair = tuple(int(v) for v in read_pair)
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1] < cfg.n_points:
                _fail("read_pair", read_pair, f"(i, j) with 0 <= i <= j < n_points={cfg.n_points}")
        return ReadTask(cfg, pair=pair)
    if cfg.name == "linear":
        if linear_coef is None:
            coef = _draw_linear_coef(cfg)
        else:
            coef = tuple(float(v) for v in linear_coef)
            if len(coef) != cfg.n_dims or not all(math.isfinite(v) for v in coef):
                _fail("linear_coef", linear_coef, f"{cfg.n_dims} finite numbers (n_dims)")
        return LinearTask(cfg, coef=coef)
    return _TASK_CLASSES[cfg.name](cfg)


# ---------------------------------------------------------------------------------------------------
# Curriculum


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """Schedule of one curriculum variable (n_points or n_dims), validated (SPEC section 2).

    Attributes:
        start: value at the first training iteration, >= 1.
        end: cap, >= start.
        inc: added at every multiple of `interval`, >= 0.
        interval: >= 1.
    """

    start: int
    end: int
    inc: int
    interval: int

    def __post_init__(self):
        if not _is_int(self.start) or self.start < 1:
            _fail("start", self.start, "ints >= 1")
        if not _is_int(self.end) or self.end < self.start:
            _fail("end", self.end, f"ints >= start={self.start}")
        if not _is_int(self.inc) or self.inc < 0:
            _fail("inc", self.inc, "ints >= 0")
        if not _is_int(self.interval) or self.interval < 1:
            _fail("interval", self.interval, "ints >= 1")

    @classmethod
    def constant(cls, value: int) -> CurriculumConfig:
        """No curriculum: `value` throughout."""
        return cls(start=value, end=value, inc=0, interval=1)


def curriculum_value(cfg: CurriculumConfig, counter: Any) -> Any:
    """The curriculum's value after `counter` increments: min(start + inc * floor(counter / interval), end).

    SPEC section 2: a counter is incremented every training iteration (skipped steps included), and
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
    if not _is_int(counter) or counter < 0:
        _fail("counter", counter, "ints >= 0 or an integer jax array")
    return min(cfg.start + cfg.inc * (counter // cfg.interval), cfg.end)
