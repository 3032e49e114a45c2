"""The base of every task: sizes, sampling, reading the prediction, the loss and metrics.

A task is built once on the host from a validated `TaskConfig` by `lsq_jax.data.tasks.make_task`. It is a
frozen, hashable dataclass (its fixed random choices, the `read` pair and the `linear` coefficients, are
stored as Python tuples), so it can be closed over or passed as a static argument to `jax.jit`. Its
methods are pure:

    batch = task.sample(keys)                       # draw raw data (samplers.py) then build
    inputs, targets = task.build(raw)               # pure on a raw sample: x, or a LeastSquaresSample
    pred = model(inputs)                            # (B, seq_len, >= out_dims)
    loss = task.loss(pred, targets)                 # mean squared error on task.read(pred)
    loss = task.train_loss(pred, targets)           # what training minimises: that, or the relative error

Shapes: inputs (B, seq_len(L), in_dims); targets (B, P, C) with P = len(target_positions(L)) and
read(pred).shape == targets.shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from lsq_jax.config.check import fail, is_int
from lsq_jax.config.task import TaskConfig, task_sizes


class TaskBatch(NamedTuple):
    """A drawn batch: model `inputs`, `targets`, and the `raw` sample they were built from."""

    inputs: jax.Array
    targets: jax.Array
    raw: Any


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
    """Base of every task: sampling, reading the prediction and the metrics.

    Subclasses define `target_positions`, `_draw`, `_build`, `_read`; the shapes (`seq_len`, `in_dims`,
    `out_dims`) come from `lsq_jax.config.task.task_sizes`, which sizes the model too.
    The metric is the squared error on `read(pred)`; the training loss is its mean (the reference's
    `get_metric` / `get_training_metric`), or with config.train_loss='relative' the mean over problems of
    each one's squared error over its target's squared norm (`train_loss`).

    Attributes:
        predicts: the least-squares vector the last target holds, so what read(pred)[:, -1] estimates:
            'gradient' (A^T (A x0 - b) / L), 'iterate' (GD's iterate after `steps_per_iter` steps of
            `learned_eta` from x0), 'solution' (x*), or None (the primitives, in-context regression).
        is_one_step_solver: whether the model, fed its own output, is an iterative least-squares solver
            (it predicts a gradient or an iterate).
    """

    config: TaskConfig
    predicts: ClassVar[str | None] = None
    is_one_step_solver: ClassVar[bool] = False

    # -- the model as a least-squares solver ----------------------------------------------------------
    @property
    def steps_per_iter(self) -> int:
        """GD steps one application of the model stands for: multistep_gd's k, 1 for every other task."""
        return 1

    @property
    def learned_eta(self) -> float | None:
        """The GD step size the model has learned (multistep_gd's eta); None where the caller picks it (a
        predicted gradient is a GD step with any eta) or the model is no GD step."""
        return None

    def normalize(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the tokens with the problem at unit scale, the factor that scales the prediction back): the
        target's homogeneity, for a scale-equivariant model (model.scale_equivariant). Only explicit_gradient
        'last' has one."""
        raise NotImplementedError(f"task {self.name!r} has no scale normalisation")

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
        return task_sizes(self.config).in_dims

    @property
    def out_dims(self) -> int:
        """Model output width the task needs: the widest output channel it reads, plus one."""
        return task_sizes(self.config).out_dims

    def seq_len(self, n_points: int | None = None) -> int:
        """Length of the input sequence for L = n_points (default the config's)."""
        return task_sizes(self.config, self._n_points(n_points)).seq_len

    def example_bytes(self, n_points: int | None = None) -> int:
        """A lower bound of the bytes one drawn example holds at once: the (L, D) array it is drawn from and
        its input tokens (what the memory checks count per problem)."""
        n = self._n_points(n_points)
        return (n * self.n_dims + self.seq_len(n) * self.in_dims) * self.dtype.itemsize

    def target_positions(self, n_points: int | None = None) -> tuple[int, ...]:
        """The input/output positions whose prediction is compared with the targets, in order."""
        raise NotImplementedError

    def _n_points(self, n_points: int | None) -> int:
        n_points = self.config.n_points if n_points is None else n_points
        if not is_int(n_points) or n_points <= 0:
            fail("n_points", n_points, "ints > 0")
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
    def error_scale(self, targets: jax.Array) -> jax.Array:
        """s_b, (B,): what task.train_loss='relative' divides problem b's squared errors by, the mean of its
        targets' squares over its P x C entries, so that the mean of (y_pred - y)^2 / s_b over the
        problem's entries is ||y_pred_b - y_b||^2 / ||y_b||^2 (TaskConfig.train_loss says why). A target
        that is exactly 0 gets s_b = 1: its plain squared error, not 0 / 0."""
        s = jnp.mean(jnp.square(targets), axis=tuple(range(1, targets.ndim)))
        return jnp.where(s > 0, s, jnp.ones((), s.dtype))

    @_jitted
    def train_loss(self, pred: jax.Array, targets: jax.Array) -> jax.Array:
        """What training minimises (TaskConfig.train_loss): 'mse', the plain `loss` (the same computation,
        so the same bits); 'relative', the mean square of `train_residuals`, i.e. the mean over problems of
        ||y_pred_b - y_b||^2 / ||y_b||^2 (`error_scale`)."""
        if self.config.train_loss == "mse":
            return self.loss(pred, targets)
        return jnp.mean(jnp.square(self.train_residuals(pred, targets)))

    @_jitted
    def train_residuals(self, pred: jax.Array, targets: jax.Array) -> jax.Array:
        """(B, K) residuals whose mean square is `train_loss` (what LM fits): read(pred) - targets per
        problem, each problem's divided by sqrt(s_b) with train_loss='relative' (`error_scale`)."""
        residuals = (self.read(pred) - targets).reshape(targets.shape[0], -1)
        if self.config.train_loss == "mse":
            return residuals
        return residuals / jnp.sqrt(self.error_scale(targets))[:, None]

    @_jitted
    def eval_metrics(self, pred: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        """{'mse'} for every task; the primitives add 'rel' and 'rel_l2' (`primitive_metrics`)."""
        self.pointwise_error(pred, targets)  # checks the shapes
        return self._eval_metrics(self.read(pred), targets)

    def _eval_metrics(self, y_pred: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        return {"mse": jnp.mean(jnp.square(y_pred - y))}
