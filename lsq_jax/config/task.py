"""What to learn (TaskConfig) and how its sizes grow (CurriculumConfig), validated on construction."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from lsq_jax.config.check import fail, is_int, is_real

PRIMITIVE_NAMES = ("identity", "square", "elementwise_multiply", "read", "linear")
LEAST_SQUARES_NAMES = ("least_squares", "least_squares_icl", "explicit_gradient", "multistep_gd")
TASK_NAMES = PRIMITIVE_NAMES + LEAST_SQUARES_NAMES
ROWS_RANGE_NAMES = ("explicit_gradient", "multistep_gd", "least_squares")  # one target per problem
TRAIN_LOSSES = ("mse", "relative")  # task.train_loss, the first being the default

# Tasks with a `setting`: the allowed values, the first being the default.
SETTINGS = {
    "explicit_gradient": ("last", "all"),
    "least_squares_icl": ("neighboring", "concat"),
}
DTYPES = ("float64", "float32")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What to learn, validated on construction.

    Attributes:
        name: one of TASK_NAMES (default explicit_gradient).
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
        n_points_min: training over a range of rows: None (default: L = n_points only) or L_min in
            [1, n_points]; each training batch then holds an equal share of problems of every L in
            [n_points_min, n_points] (explicit_gradient 'last', multistep_gd and least_squares only: one
            target per problem). The model's positions are sized by n_points.
        scale_cond_max: None (default: kappa = scale_cond) or kappa_max >= scale_cond: each problem's kappa
            is drawn log-uniform in [scale_cond, scale_cond_max].
        scale_target_max: None (default: scale_target) or a maximum >= scale_target: each problem's target
            scale is drawn log-uniform in [scale_target, scale_target_max].
        train_loss: what training minimises (Adam's loss and LM's residuals alike); the test MSE and the
            report stay the plain MSE. 'mse' (default): the mean squared error over every target entry of
            the batch, as the papers train. 'relative': each problem's squared error over its target's
            squared norm, averaged over problems, (1/B) sum_b ||y_pred_b - y_b||^2 / ||y_b||^2: the mean over
            entries of (y_pred - y)^2 / s_b, s_b the mean of y_b^2 over the problem's own entries, so LM's
            residuals are (y_pred - y) / sqrt(s_b). Why the target's norm: every least-squares target (x*,
            b, the gradient A^T (A x0 - b) / L, GD's iterates) is linear in (x*, x0), so scaling a problem's
            x*, x0 by c (or its A by c: the gradient by c^2) scales its target, and the prediction of a model
            that follows it, by the same factor, and its term is unchanged; under the plain MSE the
            gradients of a range of scales [0.1, 10] and kappas [1, 100] (A^T A up to kappa^2) differ by
            orders of magnitude and the largest decide the fit. For explicit_gradient the term is the square
            of the report's one-step error ||g_pred - g|| / ||g||. A denominator near 0: ||y_b|| = 0 has
            probability 0 for the drawn problems, but small targets weigh much: near 0, ||y||^2 behaves
            like a chi-square with D degrees of freedom (D the dimension the target varies in), so the mean
            weight E[1 / ||y||^2] is finite for D >= 3 and infinite for D <= 2, where a few problems can
            dominate a batch (with D = 1 one can). A target that is exactly 0 has s_b = 1 (its plain
            squared error).
        dtype: 'float64' (default) or 'float32', the dtype of every floating array a task returns.
    """

    name: str = "explicit_gradient"
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
    n_points_min: int | None = None
    scale_cond_max: float | None = None
    scale_target_max: float | None = None
    train_loss: str = "mse"
    dtype: str = "float64"

    def __post_init__(self):
        if self.name not in TASK_NAMES:
            fail("name", self.name, ", ".join(TASK_NAMES))
        for field in ("n_dims", "n_points"):
            value = getattr(self, field)
            if not is_int(value) or value <= 0:
                fail(field, value, "integers > 0")
        if self.name == "elementwise_multiply" and self.n_dims % 2:
            fail("n_dims", self.n_dims, "even integers for elementwise_multiply (y = x[:D/2] * x[D/2:])")
        if self.name in SETTINGS:
            allowed = SETTINGS[self.name]
            if self.setting is None:
                # Resolve the default here so that equal tasks have equal (and equally hashed) configs.
                object.__setattr__(self, "setting", allowed[0])
            elif self.setting not in allowed:
                fail("setting", self.setting, f"None or {' | '.join(map(repr, allowed))} for {self.name}")
        elif self.setting is not None:
            fail("setting", self.setting, f"None for {self.name} (only {', '.join(SETTINGS)} have one)")
        if not is_int(self.num_iters) or self.num_iters < 1:
            fail("num_iters", self.num_iters, "integers >= 1")
        if not is_real(self.eta) or self.eta <= 0:
            fail("eta", self.eta, "finite numbers > 0")
        if self.sparsity is not None:
            if self.name != "linear":
                fail("sparsity", self.sparsity, f"None for {self.name} (only linear has one)")
            if not is_int(self.sparsity) or not 1 <= self.sparsity <= self.n_dims:
                fail("sparsity", self.sparsity, f"None or integers in [1, n_dims={self.n_dims}]")
        if not is_int(self.task_seed):
            fail("task_seed", self.task_seed, "integers")
        for field in ("normalize", "normalize_a", "normalize_x"):
            if not isinstance(getattr(self, field), bool):
                fail(field, getattr(self, field), "True or False")
        for field in ("scale", "scale_target"):
            value = getattr(self, field)
            if not is_real(value) or value <= 0:
                fail(field, value, "finite numbers > 0")
        if not is_real(self.scale_cond) or self.scale_cond < 1:
            fail("scale_cond", self.scale_cond, "finite numbers >= 1 (1 = A unchanged)")
        small = min(self.n_points, self.n_dims) < 2
        if self.scale_cond != 1 and self.name in LEAST_SQUARES_NAMES and small:
            fail("scale_cond", self.scale_cond, "1 when min(n_points, n_dims) < 2")
        self._check_ranges()
        if self.train_loss not in TRAIN_LOSSES:
            fail("train_loss", self.train_loss, " | ".join(map(repr, TRAIN_LOSSES)))
        if self.dtype not in DTYPES:
            fail("dtype", self.dtype, " | ".join(map(repr, DTYPES)))

    def _check_ranges(self):
        lo = self.n_points_min
        if lo is not None:
            if not is_int(lo) or not 1 <= lo <= self.n_points:
                fail("n_points_min", lo, f"None or integers in [1, n_points={self.n_points}]")
            if self.name not in ROWS_RANGE_NAMES or self.setting == "all":
                fail("n_points_min", lo, f"None for {self.name}{' ' + repr(self.setting) if self.setting else ''} "
                     "(a range of rows: explicit_gradient 'last', multistep_gd, least_squares; with 'all' every "
                     "prefix is a target already)")
        for field, low in (("scale_cond_max", self.scale_cond), ("scale_target_max", self.scale_target)):
            value = getattr(self, field)
            if value is not None and (not is_real(value) or value < low):
                fail(field, value, f"None or finite numbers >= {field[:-4]}={low:g} (log-uniform in between)")
        if self.kappa_range()[1] != 1 and self.name in LEAST_SQUARES_NAMES:
            if self.n_dims >= 2 and lo is not None and lo < 2:
                fail("n_points_min", lo, "integers >= 2 when kappa is not 1 (with one row it is undefined)")
            if min(self.n_points, self.n_dims) < 2:
                fail("scale_cond_max", self.scale_cond_max, "None or 1 when min(n_points, n_dims) < 2")

    def rows(self) -> tuple[int, ...]:
        """The row counts L a training batch holds: [n_points_min, n_points], or (n_points,)."""
        lo = self.n_points if self.n_points_min is None else self.n_points_min
        return tuple(range(lo, self.n_points + 1))

    def kappa_range(self) -> tuple[float, float]:
        """[kappa_min, kappa_max] of the problems a run trains on."""
        return self.scale_cond, self.scale_cond if self.scale_cond_max is None else self.scale_cond_max

    def scale_range(self) -> tuple[float, float]:
        """[min, max] of the target scale of the problems a run trains on."""
        return self.scale_target, self.scale_target if self.scale_target_max is None else self.scale_target_max


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """Schedule of one curriculum variable (n_points or n_dims), validated on construction.

    Attributes:
        start: value at the first training iteration, >= 1.
        end: cap, >= start.
        inc: added at every multiple of `interval`, >= 0.
        interval: >= 1.
    """

    start: int
    end: int
    inc: int = 0
    interval: int = 1

    def __post_init__(self):
        if not is_int(self.start) or self.start < 1:
            fail("start", self.start, "integers >= 1")
        if not is_int(self.end) or self.end < self.start:
            fail("end", self.end, f"integers >= start={self.start}")
        if not is_int(self.inc) or self.inc < 0:
            fail("inc", self.inc, "integers >= 0")
        if not is_int(self.interval) or self.interval < 1:
            fail("interval", self.interval, "integers >= 1")

    @classmethod
    def constant(cls, value: int) -> CurriculumConfig:
        """No curriculum: `value` throughout."""
        return cls(start=value, end=value, inc=0, interval=1)


class TaskSizes(NamedTuple):
    seq_len: int  # tokens in one example
    in_dims: int  # width of a token
    out_dims: int  # model output width the task reads: its widest read channel, plus one


def task_sizes(cfg: TaskConfig, n_points: int | None = None) -> TaskSizes:
    """The token shapes of a task for L = n_points (default cfg.n_points): what sizes the model's read-in,
    read-out and positions.

    Primitives: L tokens x_i of width D. Least squares: tokens [a_i, b_i] of width D + 1, reading x (D
    channels; in-context regression reads b_i, 1 channel). explicit_gradient and multistep_gd add one token
    [x, 0]; in-context regression with setting 'neighboring' interleaves L - 1 answer tokens.
    """
    n = cfg.n_points if n_points is None else n_points
    d = cfg.n_dims
    if cfg.name in PRIMITIVE_NAMES:
        return TaskSizes(n, d, {"elementwise_multiply": d // 2, "linear": 1}.get(cfg.name, d))
    seq_len = {"least_squares": n, "explicit_gradient": n + 1, "multistep_gd": n + 1,
               "least_squares_icl": 2 * n - 1 if cfg.setting == "neighboring" else n}[cfg.name]
    return TaskSizes(seq_len, d + 1, 1 if cfg.name == "least_squares_icl" else d)
