"""OptimConfig (lsq_jax.config.optim): every field's range, checked on construction."""
import dataclasses
import math
import re

import pytest

from lsq_jax.config.optim import OptimConfig, with_solver


@pytest.mark.parametrize("field, value", [
    ("optimizer", "rmsprop"), ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", "0.1"),
    ("schedule", "cosine"), ("step_rate", 0), ("step_rate", 2.5), ("step_rate", True),
    ("gamma", 0.0), ("gamma", 1.5), ("lr_floor", -1e-10), ("initial_decay", 1), ("metric_decay", 1.5),
    ("metric_threshold", math.inf), ("no_increase_length", -1), ("clip_norm", 0.0), ("skip_norm", -1.0),
    ("ema_alpha", 1.2), ("ema_lambda", -0.5), ("b1", 1.0), ("b2", -0.1), ("eps", -1e-16),
    ("weight_decay", -1.0), ("momentum", 1.5), ("l1", -1.0), ("lm_scaling", "diag"), ("lm_rule", "fast"),
    ("lm_restarts", 0), ("lm_restart_steps", -1), ("lm_tries", 0), ("lm_cg_iters", 0), ("lm_chunk", 0),
])
def test_config_rejects_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"^{field}: got ") as info:
        OptimConfig(**{field: value})
    assert repr(value) in str(info.value) and "allowed" in str(info.value)


def test_config_weight_decay_only_for_adamw_and_sgd():
    with pytest.raises(ValueError, match="weight_decay"):
        OptimConfig(optimizer="adam", weight_decay=0.1)
    OptimConfig(optimizer="adamw", weight_decay=0.1)
    OptimConfig(optimizer="sgd", weight_decay=0.1)
    cfg = OptimConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # frozen


def test_restarts_need_their_length_and_lm_from_the_start():
    with pytest.raises(ValueError, match="^lm_restart_steps: got None; allowed integers >= 1 when lm_restarts > 1"):
        OptimConfig(optimizer="lm", lm_restarts=2)
    with pytest.raises(ValueError, match="^lm_restarts: got 2; allowed 1 unless optimizer='lm' with lm_after=0"):
        OptimConfig(optimizer="lm", lm_restarts=2, lm_restart_steps=5, lm_after=3)
    with pytest.raises(ValueError, match="^lm_restarts: got 2"):
        OptimConfig(optimizer="adam", lm_restarts=2, lm_restart_steps=5)
    OptimConfig(optimizer="lm", lm_restarts=2, lm_restart_steps=5)
    # without restarts the length is not read: unset, so a variant's restarts turn off with lm_restarts=1
    assert OptimConfig(optimizer="lm", lm_restart_steps=5) == OptimConfig(optimizer="lm")
    assert OptimConfig(optimizer="lm", lm_restart_steps=5).lm_restart_steps is None


@pytest.mark.parametrize("fields, field", [
    ({"optimizer": "lm", "l1": 1e-4}, "l1"),
    ({"optimizer": "lm", "lm_after": 10, "l1": 1e-4}, "l1"),
    ({"optimizer": "lm", "lm_solver": "cholesky", "lm_cg_iters": 50}, "lm_cg_iters"),
    ({"optimizer": "lm", "lm_solver": "cholesky", "lm_cg_iters": 100}, "lm_cg_iters"),  # CG's unset value, but set
])
def test_settings_the_chosen_path_would_ignore_are_refused(fields, field):
    with pytest.raises(ValueError, match=f"^{field}: got .*; allowed .*(optimizer='lm'|lm_solver='cholesky' "
                                         r"\(only 'cg' reads it\))"):
        OptimConfig(**fields)


def test_the_settings_each_path_uses_are_accepted():
    OptimConfig(optimizer="lm", lm_solver="cg", lm_cg_iters=50, lm_tries=3)
    OptimConfig(optimizer="lm", lm_solver="sharded", lm_tries=3)
    OptimConfig(optimizer="lm", lm_geodesic=True, lm_tries=3)
    OptimConfig(optimizer="lm", lm_tries=3, lm_cg_iters=50)  # 'auto': resolved when the plan picks
    OptimConfig(optimizer="adam", l1=1e-4)


@pytest.mark.parametrize("solver", ["sharded", "cg"])
def test_a_switch_set_off_is_unset_for_a_solver_that_does_not_read_it(solver):
    assert OptimConfig(optimizer="lm", lm_solver=solver, lm_valley=False) == OptimConfig(optimizer="lm",
                                                                                         lm_solver=solver)
    allowed = re.escape(f"None or False with lm_solver={solver!r} (only 'cholesky' reads it)")
    with pytest.raises(ValueError, match=f"^lm_valley: got True; allowed {allowed}$"):
        OptimConfig(optimizer="lm", lm_solver=solver, lm_valley=True)
    assert OptimConfig(optimizer="lm", lm_solver="cholesky", lm_valley=False).lm_valley is False


def test_the_valley_predictor_by_cg_needs_the_valley_step():
    assert OptimConfig(optimizer="lm", lm_solver="cholesky", lm_valley=True, lm_valley_cg=True).lm_valley_cg
    assert OptimConfig(optimizer="lm", lm_solver="cholesky").lm_valley_cg is False
    for valley in (False, None):
        with pytest.raises(ValueError, match="^lm_valley_cg: got True; allowed None \\(unset\\) or False unless "
                                             "lm_valley=True"):
            OptimConfig(optimizer="lm", lm_solver="cholesky", lm_valley=valley, lm_valley_cg=True)
    with pytest.raises(ValueError, match="^lm_valley_cg: got 1; allowed None \\(unset\\), True or False$"):
        OptimConfig(optimizer="lm", lm_valley=True, lm_valley_cg=1)
    with pytest.raises(ValueError, match="^lm_valley_cg: got True; "):  # the valley step is Cholesky's alone
        OptimConfig(optimizer="lm", lm_solver="cg", lm_valley_cg=True)


def test_a_bad_solver_names_the_field_and_the_allowed_values():
    with pytest.raises(ValueError, match="^lm_solver: got 'dense'; allowed one of auto, cholesky, sharded, cg$"):
        OptimConfig(optimizer="lm", lm_solver="dense")


@pytest.mark.parametrize("solver, tries, cg_iters", [("cholesky", 3, None), ("sharded", 3, None), ("cg", 3, 50),
                                                      ("auto", 3, 50)])
def test_with_solver_keeps_what_the_solver_reads(solver, tries, cg_iters):
    cfg = OptimConfig(optimizer="lm", lm_tries=3, lm_cg_iters=50)
    resolved = with_solver(cfg, solver)
    assert (resolved.lm_solver, resolved.lm_tries, resolved.lm_cg_iters) == (solver, tries, cg_iters)
    assert with_solver(OptimConfig(optimizer="lm"), "cholesky") == OptimConfig(optimizer="lm", lm_solver="cholesky")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("field, value", [
    ("lm_after", 5), ("lm_solver", "cg"), ("lm_damping", 1e-2), ("lm_scaling", "marquardt"), ("lm_tries", 10),
    ("lm_cg_iters", 100), ("lm_geodesic", True), ("lm_chunk", 4), ("lm_refresh_every", 2),
])
def test_lm_settings_without_lm_are_refused(optimizer, field, value):
    default = OptimConfig.__dataclass_fields__[field].default
    allowed = re.escape(f"{default!r} unless optimizer='lm' (a Levenberg-Marquardt setting)")
    with pytest.raises(ValueError, match=f"^{field}: got {re.escape(repr(value))}; allowed {allowed}$"):
        OptimConfig(optimizer=optimizer, **{field: value})
    assert getattr(OptimConfig(optimizer=optimizer, **{field: default}), field) == default


@pytest.mark.parametrize("solver, tries, cg_iters", [("cholesky", 10, None), ("sharded", 10, None),
                                                      ("cg", 1, 100), ("auto", None, None)])
def test_the_chosen_solvers_unset_settings_take_their_value(solver, tries, cg_iters):
    cfg = OptimConfig(optimizer="lm", lm_solver=solver)
    assert (cfg.lm_tries, cfg.lm_cg_iters) == (tries, cg_iters)
    assert OptimConfig(**dataclasses.asdict(cfg)) == cfg  # a saved config decodes to itself
    other = OptimConfig()
    assert (other.lm_tries, other.lm_cg_iters, other.lm_chunk, other.lm_restart_steps) == (None,) * 4


def test_the_cg_forcing_term_is_a_cg_switch():
    assert OptimConfig(optimizer="lm", lm_solver="cg").lm_cg_forcing is True
    assert OptimConfig(optimizer="lm", lm_solver="cg", lm_cg_forcing=False).lm_cg_forcing is False
    assert OptimConfig(optimizer="lm", lm_solver="cholesky").lm_cg_forcing is None
    with pytest.raises(ValueError, match=re.escape("lm_cg_forcing: got True; allowed None or False with "
                                                   "lm_solver='cholesky' (only 'cg' reads it)")):
        OptimConfig(optimizer="lm", lm_solver="cholesky", lm_cg_forcing=True)
    with pytest.raises(ValueError, match="^lm_cg_forcing: got 'yes'; allowed None \\(unset\\), True or False$"):
        OptimConfig(optimizer="lm", lm_solver="cg", lm_cg_forcing="yes")
