"""OptimConfig: the training recipe (Adam and its schedule, or Levenberg-Marquardt), validated on construction."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lsq_jax.config.check import (INT_LIMIT, check_choice, check_flag, check_int, check_optional_positive, check_real,
                                  is_int, require)

SCHEDULES = ("constant", "step", "adaptive")
OPTIMIZERS = ("adam", "adamw", "sgd", "lm")
# "auto": the run's plan picks one of the others from its memory figures (lsq_jax.plan.run).
LM_SOLVERS = ("auto", "cholesky", "sharded", "cg")
# The settings each LM solver reads, each with the value it takes under that solver when left None; a
# setting no solver of a run reads stays unset. CG's one try is what it ran before it read lm_tries.
SOLVER_SETTINGS = {"cholesky": {"lm_tries": 10, "lm_valley": False, "lm_valley_cg": False},
                   "sharded": {"lm_tries": 10}, "cg": {"lm_tries": 1, "lm_cg_iters": 100,
                                                        "lm_cg_forcing": True}}
LM_SCALINGS = ("isotropic", "marquardt")  # lsq_jax.optim.lm_damping says what each means
LM_RULES = ("nielsen", "delayed")


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
        lm_damping: LM's initial damping lambda, relative to the scaling D, > 0.
        lm_scaling: D of the damped system (J^T J + lambda D): ``"isotropic"`` (the mean of diag(J^T J) at
            the first LM iteration, times I, held) or ``"marquardt"`` (diag(J^T J), Moré's running maximum).
        lm_rule: how lambda moves after a step: ``"nielsen"`` (by the gain ratio, doubling growth on
            consecutive rejections) or ``"delayed"`` (/3 on accept, x2 on reject).
        lm_solver: ``"auto"`` (the plan picks the first of the next three whose memory fits a device),
            ``"cholesky"`` (dense J^T J, P x P, on every device), ``"sharded"`` (dense J^T J split by rows
            over the devices, built and factorised there without gathering it) or ``"cg"`` (matrix-free
            Gauss-Newton-CG).
        lm_cg_iters: conjugate-gradient iterations per damped solve of ``"cg"`` (unset: 100).
        lm_cg_forcing: ``"cg"`` stops each solve at the inexact-Newton forcing term, a residual of
            min(0.5, sqrt(||J^T r / M||)) of the right-hand side (lsq_jax.optim.lm.forcing_term), rather
            than 1e-10 of it (False); at most lm_cg_iters iterations either way (unset: True).
        lm_geodesic: add Transtrum-Sethna geodesic acceleration to each LM step.
        lm_tries: damped solves per LM iteration: a rejected step is solved again at once with the raised
            damping, reusing J^T J (or CG's linearisation) (unset: 10; 1 with ``"cg"``).
        lm_valley: after an accepted LM step that lowered the loss by less than 10%, also try the valley
            step (lsq_jax.optim.lm.valley_step: a predictor from QR of J at a small damping that each try
            moves, then chord corrections) and keep it where it ends lower; for LM's slow phase. Read by
            ``"cholesky"`` only (unset: False).
        lm_valley_cg: with lm_valley, the valley step's predictor by preconditioned conjugate gradients
            through the held Jacobian (lsq_jax.optim.lm.valley_predictor_cg) instead of QR of J. Read by
            ``"cholesky"`` only (unset: False).
        lm_chunk: problems per Jacobian chunk on each device (None: auto, at most 2^22 Jacobian entries per
            chunk); with a range of rows (task.n_points_min), problems of each row count per chunk.
        lm_restarts: starts from as many initialisations, each trained lm_restart_steps iterations; the one
            with the lowest training loss continues (1: no restarts).
        lm_restart_steps: iterations of each start, >= 1, needed when lm_restarts > 1; with lm_restarts=1 it
            is not read and is unset on construction (so `--config.optim.lm_restarts=1` turns a variant's
            restarts off).

    The fields named lm_* are Levenberg-Marquardt's: with any other optimizer they keep their defaults. With
    optimizer 'lm', the chosen solver's unset settings take their value on construction (so equal runs have
    equal configs); those it does not read stay unset. With lm_solver 'auto' every setting may be given and
    they resolve when the plan picks the solver (`with_solver`).
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
    clip_norm: float | None = 100.0
    skip_norm: float | None = None
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
    lm_scaling: str = "isotropic"
    lm_rule: str = "nielsen"
    lm_solver: str = "auto"
    lm_cg_iters: int | None = None
    lm_cg_forcing: bool | None = None
    lm_geodesic: bool = False
    lm_tries: int | None = None
    lm_valley: bool | None = None
    lm_valley_cg: bool | None = None
    lm_chunk: int | None = None
    lm_restarts: int = 1
    lm_restart_steps: int | None = None

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_real("lr", self.lr, 0.0, lo_open=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_int("step_rate", self.step_rate, 1)
        check_real("gamma", self.gamma, 0.0, 1.0, lo_open=True)
        check_real("lr_floor", self.lr_floor, 0.0)
        check_flag("initial_decay", self.initial_decay)
        check_real("metric_decay", self.metric_decay, 0.0, 1.0)
        check_real("metric_threshold", self.metric_threshold)
        check_int("no_increase_length", self.no_increase_length, 0)
        check_optional_positive("clip_norm", self.clip_norm)
        check_optional_positive("skip_norm", self.skip_norm)
        check_real("ema_alpha", self.ema_alpha, 0.0, 1.0)
        check_real("ema_lambda", self.ema_lambda, 0.0)
        check_real("b1", self.b1, 0.0, 1.0, hi_open=True)
        check_real("b2", self.b2, 0.0, 1.0, hi_open=True)
        check_real("eps", self.eps, 0.0)
        check_real("weight_decay", self.weight_decay, 0.0)
        if self.optimizer == "adam":
            require("weight_decay", self.weight_decay, self.weight_decay == 0,
                    "0 with optimizer='adam' (use 'adamw' for weight decay)")
        check_real("momentum", self.momentum, 0.0, 1.0)
        check_real("l1", self.l1, 0.0)
        check_int("lm_after", self.lm_after, 0)
        check_int("lm_refresh_every", self.lm_refresh_every, 0)
        check_real("lm_damping", self.lm_damping, 0.0, lo_open=True)
        check_choice("lm_scaling", self.lm_scaling, LM_SCALINGS)
        check_choice("lm_rule", self.lm_rule, LM_RULES)
        check_choice("lm_solver", self.lm_solver, LM_SOLVERS)
        for field in ("lm_cg_iters", "lm_tries", "lm_chunk", "lm_restart_steps"):
            value = getattr(self, field)
            require(field, value, value is None or (is_int(value) and 1 <= value < INT_LIMIT),
                    "None (unset) or integers >= 1 and < 2^63")
        check_flag("lm_geodesic", self.lm_geodesic)
        for field in ("lm_valley", "lm_valley_cg", "lm_cg_forcing"):
            value = getattr(self, field)
            require(field, value, value is None or isinstance(value, bool), "None (unset), True or False")
        require("lm_valley_cg", self.lm_valley_cg, not self.lm_valley_cg or self.lm_valley,
                "None (unset) or False unless lm_valley=True (it picks the valley step's predictor)")
        check_int("lm_restarts", self.lm_restarts, 1)
        if self.optimizer != "lm":
            _check_lm_unset(self)
        else:
            require("l1", self.l1, self.l1 == 0, "0 with optimizer='lm' (LM fits the squared residuals alone)")
            check_solver_settings(self.lm_solver, dataclasses.asdict(self))
            for name in solver_settings() if self.lm_solver in SOLVER_SETTINGS else ():  # "auto": with the plan
                if getattr(self, name) is False and name not in SOLVER_SETTINGS[self.lm_solver]:
                    object.__setattr__(self, name, None)  # a switch off, as the solver is: equal runs, equal configs
            for name, unset in SOLVER_SETTINGS.get(self.lm_solver, {}).items():
                if getattr(self, name) is None:  # resolved here so that equal runs have equal configs
                    object.__setattr__(self, name, unset)
        if self.lm_restarts > 1:
            require("lm_restart_steps", self.lm_restart_steps, self.lm_restart_steps is not None,
                    "integers >= 1 when lm_restarts > 1")
            require("lm_restarts", self.lm_restarts, self.lm_after == 0,
                    "1 unless optimizer='lm' with lm_after=0 (restarts compare LM's training loss)")
        else:  # not read without restarts: unset, so that equal runs have equal configs
            object.__setattr__(self, "lm_restart_steps", None)


def lm_defaults() -> dict[str, Any]:
    """The Levenberg-Marquardt settings (the fields named lm_*) and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(OptimConfig) if f.name.startswith("lm_")}


def _check_lm_unset(cfg: OptimConfig) -> None:
    """Every LM setting of a config whose optimizer is not 'lm' keeps its default (it would be ignored)."""
    for name, default in lm_defaults().items():
        require(name, getattr(cfg, name), getattr(cfg, name) == default,
                f"{default!r} unless optimizer='lm' (a Levenberg-Marquardt setting)")


def solver_settings() -> tuple[str, ...]:
    """The settings some LM solver reads (SOLVER_SETTINGS), in OptimConfig's field order."""
    return tuple(f for f in lm_defaults() if any(f in owned for owned in SOLVER_SETTINGS.values()))


def check_solver_settings(solver: str, settings: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """Each of `settings` (keyed by OptimConfig's field names) that `solver` does not read is unset (its
    default: None) or, for a switch, off (False). `names` gives the caller's own names for the error. With
    'auto' any may be given."""
    if solver == "auto":
        return
    defaults = lm_defaults()
    for field in solver_settings():
        if field in settings and field not in SOLVER_SETTINGS[solver]:
            readers = [repr(s) for s, owned in SOLVER_SETTINGS.items() if field in owned]
            verb = "reads" if len(readers) == 1 else "read"
            switch = any(isinstance(owned.get(field), bool) for owned in SOLVER_SETTINGS.values())
            off = " or False" if switch else ""
            require((names or {}).get(field, field), settings[field],
                    settings[field] is defaults[field] or (off and settings[field] is False),
                    f"{defaults[field]!r}{off} with lm_solver={solver!r} (only {', '.join(readers)} {verb} it)")


def with_solver(cfg: OptimConfig, solver: str) -> OptimConfig:
    """`cfg` (optimizer 'lm') with lm_solver `solver`: the settings `solver` does not read unset, and those
    it reads that were unset at their value under it. `cfg` unchanged when its solver is already `solver`."""
    if cfg.lm_solver == solver:
        return cfg
    unread = {f: None for f in solver_settings() if f not in SOLVER_SETTINGS[solver]}
    return dataclasses.replace(cfg, lm_solver=solver, **unread)
