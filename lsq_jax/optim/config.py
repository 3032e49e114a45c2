"""The optimizer section of a run's settings, :class:`OptimConfig`, and the checks that validate it.

Every hyperparameter is checked up front, with the field, the value and the allowed range in the message
(a ``ValueError``). The transforms of :mod:`lsq_jax.optim` use the same checks on their own arguments.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

__all__ = [
    "SCHEDULES",
    "OPTIMIZERS",
    "LM_SOLVERS",
    "OptimConfig",
    "require",
    "check_real",
    "check_int",
    "check_choice",
    "check_optional_positive",
]

SCHEDULES = ("constant", "step", "adaptive")
OPTIMIZERS = ("adam", "adamw", "sgd", "lm")
LM_SOLVERS = ("cholesky", "cg")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require(owner: str, field: str, value: Any, ok: bool, allowed: str) -> None:
    """Raises ``ValueError("{owner}{field} = {value!r} is not allowed; allowed: {allowed}")`` unless ok."""
    if not ok:
        raise ValueError(f"{owner}{field} = {value!r} is not allowed; allowed: {allowed}")


def check_real(owner, field, value, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """A finite real (not a bool) in [lo, hi], each end open when asked."""
    ok = _is_real(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    allowed = f"a finite real in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    require(owner, field, value, ok, allowed)


def check_int(owner, field, value, lo):
    """An integer (not a bool) >= lo."""
    require(owner, field, value, _is_int(value) and value >= lo, f"an integer >= {lo}")


def check_choice(owner, field, value, choices):
    """One of ``choices``."""
    require(owner, field, value, value in choices, f"one of {choices}")


def check_optional_positive(owner, field, value):
    """None, or a finite real > 0."""
    ok = value is None or (_is_real(value) and value > 0)
    require(owner, field, value, ok, "None or a finite real > 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer half of a run's settings, validated on construction.

    Attributes:
        optimizer: ``"adam"`` (torch Adam, eps 1e-16), ``"adamw"`` (decoupled weight decay) or ``"sgd"``
            (heavy-ball momentum, torch convention: buf <- momentum * buf + g, first buf = g).
        lr: initial learning rate lr0 > 0.
        schedule: ``"constant"``, ``"step"`` (step-threshold) or ``"adaptive"``.
        step_rate: the schedule's period in applied steps (reference ``scheduler_steprate``), >= 1.
        gamma: the schedule's factor in (0, 1] (1 makes "step" constant).
        lr_floor: lower bound for decay (reference 1e-10); growth is uncapped.
        initial_decay: adaptive only: start at lr0 * gamma like the reference (True) or at lr0.
        metric_decay: EMA decay of the gradient-cosine metric, in [0, 1].
        metric_threshold: adaptive grows while the metric EMA is below this.
        no_increase_length: adaptive never grows before more than this many applied steps.
        clip_norm: global-norm clipping threshold (100), or None for none.
        skip_norm: optional pre-clip global norm above which a step is skipped; None = reference.
        ema_alpha: EMA filter decay, in [0, 1].
        ema_lambda: EMA filter weight, >= 0; 0 turns the filter off.
        b1, b2: Adam decay rates, in [0, 1).
        eps: Adam epsilon added to sqrt(v_hat), >= 0 (1e-16, not 1e-8).
        weight_decay: >= 0; AdamW's decoupled decay, or SGD's L2 term (torch's ``weight_decay``, added
            to the gradient after the EMA filter); must be 0 for plain Adam.
        momentum: SGD momentum in [0, 1] (0 = plain SGD).
        l1: L1 regularisation weight >= 0, used by the loss (lambda * sum |p|), only carried here.
        lm_after: with optimizer ``"lm"``: iterations of the Adam recipe (the fields above) before
            Levenberg-Marquardt takes over (0: LM from the start).
        lm_refresh_every: LM fits the residuals of one batch of train.batch_size problems; a new batch
            every this many LM iterations (0: the same batch throughout).
        lm_damping: LM's initial damping lambda, relative to Marquardt's diagonal scaling, > 0.
        lm_solver: ``"cholesky"`` (dense J^T J, P x P) or ``"cg"`` (matrix-free Gauss-Newton-CG).
        lm_cg_iters: conjugate-gradient iterations per LM step with ``"cg"``.
        lm_geodesic: add Transtrum-Sethna geodesic acceleration to each LM step.
        lm_tries: damped solves per LM iteration: a rejected step is solved again at once with the raised
            damping, reusing J^T J (Cholesky path).
        lm_chunk: problems per Jacobian chunk (0: auto, about 2^20 Jacobian entries per chunk).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "step"
    step_rate: int = 10_000
    gamma: float = 0.9
    lr_floor: float = 1e-10
    initial_decay: bool = True
    metric_decay: float = 0.9
    metric_threshold: float = 0.9
    no_increase_length: int = 1000
    clip_norm: Optional[float] = 100.0
    skip_norm: Optional[float] = None
    ema_alpha: float = 0.98
    ema_lambda: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-16
    weight_decay: float = 0.0
    momentum: float = 0.9
    l1: float = 0.0
    lm_after: int = 0
    lm_refresh_every: int = 0
    lm_damping: float = 1e-3
    lm_solver: str = "cholesky"
    lm_cg_iters: int = 100
    lm_geodesic: bool = False
    lm_tries: int = 10
    lm_chunk: int = 0

    def __post_init__(self):
        owner = "OptimConfig."
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        check_real(owner, "lr", self.lr, 0.0, lo_open=True)
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        check_int(owner, "step_rate", self.step_rate, 1)
        check_real(owner, "gamma", self.gamma, 0.0, 1.0, lo_open=True)
        check_real(owner, "lr_floor", self.lr_floor, 0.0)
        require(owner, "initial_decay", self.initial_decay, isinstance(self.initial_decay, bool),
                "True or False")
        check_real(owner, "metric_decay", self.metric_decay, 0.0, 1.0)
        check_real(owner, "metric_threshold", self.metric_threshold)
        check_int(owner, "no_increase_length", self.no_increase_length, 0)
        check_optional_positive(owner, "clip_norm", self.clip_norm)
        check_optional_positive(owner, "skip_norm", self.skip_norm)
        check_real(owner, "ema_alpha", self.ema_alpha, 0.0, 1.0)
        check_real(owner, "ema_lambda", self.ema_lambda, 0.0)
        check_real(owner, "b1", self.b1, 0.0, 1.0, hi_open=True)
        check_real(owner, "b2", self.b2, 0.0, 1.0, hi_open=True)
        check_real(owner, "eps", self.eps, 0.0)
        check_real(owner, "weight_decay", self.weight_decay, 0.0)
        if self.optimizer == "adam":
            require(owner, "weight_decay", self.weight_decay, self.weight_decay == 0,
                    "0 with optimizer='adam' (use 'adamw' for weight decay)")
        check_real(owner, "momentum", self.momentum, 0.0, 1.0)
        check_real(owner, "l1", self.l1, 0.0)
        check_int(owner, "lm_after", self.lm_after, 0)
        check_int(owner, "lm_refresh_every", self.lm_refresh_every, 0)
        check_real(owner, "lm_damping", self.lm_damping, 0.0, lo_open=True)
        check_choice(owner, "lm_solver", self.lm_solver, LM_SOLVERS)
        check_int(owner, "lm_cg_iters", self.lm_cg_iters, 1)
        require(owner, "lm_geodesic", self.lm_geodesic, isinstance(self.lm_geodesic, bool), "True or False")
        check_int(owner, "lm_tries", self.lm_tries, 1)
        check_int(owner, "lm_chunk", self.lm_chunk, 0)
