"""The least-squares tasks, on a LeastSquaresSample (A, b, x*, x0): solve, in context, one gradient, k GD steps."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lsq_jax.data import samplers
from lsq_jax.data.base import Task
from lsq_jax.data.lsq import (
    explicit_gradient_inputs,
    explicit_gradient_normalization,
    gradient_descent,
    least_squares_gradient,
    multistep_gd_inputs,
    prefix_gradients,
)
from lsq_jax.data.samplers import LeastSquaresSample


@dataclasses.dataclass(frozen=True)
class LeastSquaresFamilyTask(Task):
    """A task on least-squares samples (A, b, x*, x0); tokens have width D + 1."""

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
            scale_cond_max=cfg.scale_cond_max,
            scale_target_max=cfg.scale_target_max,
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

    predicts = "solution"

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
    [:D]. `all` (ours,: target at position j = 1..L is the gradient over the first j rows,
    A_j^T (A_j x0 - b_j) / j, (B, L, D), read from positions [1, L+1), channels [:D]. This is the causally
    consistent reading: input position j holds row j, so a causal model has seen exactly rows 1..j there.
    The reference compares its row j (mean over rows 0..j, 0-based) with output position j, one row
    ahead of what a causal model has seen; its targets are the same numbers, read one position earlier.
    """

    predicts = "gradient"
    is_one_step_solver = True

    def target_positions(self, n_points=None):
        n = self._n_points(n_points)
        return (n,) if self.config.setting == "last" else tuple(range(1, n + 1))

    def _build(self, sample):
        s = self._unpack(sample)
        inputs = explicit_gradient_inputs(s.a, s.b, s.x0)
        if self.config.setting == "last":
            return inputs, least_squares_gradient(s.a, s.b, s.x0)[:, None, :]
        return inputs, prefix_gradients(s.a, s.b, s.x0)

    def normalize(self, tokens):
        return explicit_gradient_normalization(tokens)

    def _read(self, pred):
        if self.config.setting == "last":
            return self._read_last(pred)
        return pred[:, 1:, : self.n_dims]


@dataclasses.dataclass(frozen=True)
class MultistepGdTask(LeastSquaresFamilyTask):
    """k GD iterates: tokens 0..L-1 = [a_i, b_i], token L = [x0, 0] (x0 last); target x_k (B, 1, D)
    after k = num_iters steps of x <- x - eta A^T (A x - b) / L, read at the last position, channels [:D].
    """

    predicts = "iterate"
    is_one_step_solver = True

    @property
    def steps_per_iter(self) -> int:
        return self.config.num_iters

    @property
    def learned_eta(self) -> float:
        return float(self.config.eta)

    def target_positions(self, n_points=None):
        return (self._n_points(n_points),)

    def _build(self, sample):
        s = self._unpack(sample)
        inputs = multistep_gd_inputs(s.a, s.b, s.x0)
        x_k = gradient_descent(s.a, s.b, s.x0, self.config.num_iters, self.config.eta)
        return inputs, x_k[:, None, :]

    def _read(self, pred):
        return self._read_last(pred)
