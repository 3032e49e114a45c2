"""The primitive tasks, on gaussian x (B, L, D), read at every position, and their metrics."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lsq_jax.data import samplers
from lsq_jax.data.base import Task


def mean_relative_error(y_pred: jax.Array, y: jax.Array) -> jax.Array:
    """Relative error mean|y_pred - y| / mean|y| over all entries (primitives)."""
    return jnp.mean(jnp.abs(y_pred - y)) / jnp.mean(jnp.abs(y))


def relative_l2_error(y_pred: jax.Array, y: jax.Array) -> jax.Array:
    """Relative L2 error ||y_pred - y||_2 / ||y||_2 over all entries (primitives).

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


@dataclasses.dataclass(frozen=True)
class PrimitiveTask(Task):
    """A primitive: input x itself, target y(x) at every position, read from channels [:out_dims]."""

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

    def _target(self, x):
        c = jnp.asarray(self.coef, self.dtype)
        return (x @ c)[..., None]
