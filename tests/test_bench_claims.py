"""The claims bench: its rows from the command line (--quick), and what it measures against closed forms and
numpy on exact models."""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from config_files import SMALL_REPORT, get_config
from xla_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_claims_from_the_command_line_have_a_row_per_claim(tmp_path):
    """`bench --bench=claims --quick`: every claim 1-6 has a row with the paper's figure and the measured one,
    labelled quick; each training ran QUICK_STEPS iterations; the constructions are exact to round-off."""
    import os

    from lsq_jax.bench.claims import QUICK_STEPS, TRAININGS

    out = tmp_path / "claims.json"
    proc = subprocess.run([sys.executable, "-m", "lsq_jax.bench", "--bench=claims", "--quick", "--seeds=0",
                           f"--out={out}"], cwd=REPO, env={**os.environ, "XLA_FLAGS": xla_flags()},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "QUICK" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["claims"]
    assert {r["claim"].split(".")[0] for r in rows} == {"1", "2", "3", "4", "5", "6"}
    for r in rows:
        assert r["quick"] is True and r["paper"] and r["what"] and r["criterion"]
        assert r["holds"] in (True, False)
        assert r["measured"] is None or isinstance(r["measured"], float)
        assert len(r["per_seed"]) == 1
    constructions = [r for r in rows if r["claim"].startswith("3.")]
    assert len(constructions) == 2 and all(r["measured"] <= 1e-13 and r["holds"] for r in constructions)
    runs = result["claim_trainings"]
    assert sorted(r["training"] for r in runs) == sorted(TRAININGS)
    assert all(r["steps"] == QUICK_STEPS and r["seed"] == 0 and r["seconds"] > 0 for r in runs)


def test_ratios_of_errors_order_diverged_runs():
    from lsq_jax.bench.claims import _median, _ratio, _summary

    assert _ratio(1e-3, 1e-8) == pytest.approx(1e5)
    assert _ratio(1.0, math.inf) == 0.0 and _ratio(math.inf, 1.0) == math.inf
    assert math.isnan(_ratio(math.inf, math.inf)) and _ratio(1.0, 0.0) == math.inf
    assert _median([1.0, math.nan, 3.0]) == 1.0  # not comparable counts against an "at least" criterion
    assert _summary([2.0, math.inf, 1.0]) == (2.0, [1.0, None])


def _exact_step(n_points=10, **overrides):
    """A Trained of configs/baseconv.py:lm (D = 3) holding the exact explicit-gradient weights."""
    from lsq_jax.bench.claims import Trained
    from lsq_jax.bench.precision import experiment
    from lsq_jax.mesh import make_mesh
    from lsq_jax.models.exact_weights import explicit_gradient_params
    from lsq_jax.plan.run import make_plan

    exp = experiment(get_config("baseconv", "lm"), **{**SMALL_REPORT, "train.eval_problems": 64, **overrides})
    plan = make_plan(exp, make_mesh())
    return Trained(plan, explicit_gradient_params(exp.model, exp.task.n_dims, n_points), 0.0, 0.0)


def test_the_exact_step_has_no_generality_gap():
    """The exact GD weights' own error is round-off in distribution and at kappa 100: no gap."""
    from lsq_jax.bench.claims import OOD_KAPPA, generality_gap

    g = generality_gap(_exact_step())
    assert g["in_distribution"] < 1e-13 and g["out_of_distribution"] < 1e-12
    assert abs(g["gap"]) < 1e-12 and OOD_KAPPA == 100.0


def test_iterated_use_on_the_transformers_problems_is_gd_as_numpy_computes_it():
    """On the Transformer's test problems the exact step iterated equals GD, and GD's MSE after the report's
    iterations is numpy's x <- x - A^T (A x - b) / (L lambda_max(A^T A / L))."""
    import jax

    from lsq_jax.bench.claims import Trained, _solution_problems, iterated_against_transformer
    from lsq_jax.bench.precision import experiment
    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.state import init_state

    exp = experiment(get_config("transformer_lsq", "lm"), **{**SMALL_REPORT, "train.eval_problems": 16,
                                                               "model.n_layer": 1})
    plan = make_plan(exp, make_mesh())
    transformer = Trained(plan, jax.jit(lambda: init_state(plan))().params, 0.0, 0.0)
    learned = _exact_step()
    r = iterated_against_transformer(learned, transformer)
    raw, estimate = _solution_problems(transformer)
    a, b, x = (np.asarray(v) for v in (raw.a, raw.b, raw.x0))
    n_points = a.shape[1]
    eta = 1.0 / np.linalg.eigvalsh(np.einsum("bli,blj->bij", a, a) / n_points)[:, -1]
    for _ in range(r["iterations"]):
        x = x - eta[:, None] * np.einsum("bli,bl->bi", a, np.einsum("bli,bi->bl", a, x) - b) / n_points
    gd = np.mean((x - np.asarray(raw.x_star)) ** 2)
    assert r["iterations"] == SMALL_REPORT["train.eval_iters"]
    np.testing.assert_allclose(r["gd_iterated_mse"], gd, rtol=1e-10)
    np.testing.assert_allclose(r["learned_iterated_mse"], gd, rtol=1e-8)
    np.testing.assert_allclose(r["transformer_mse"], np.mean((np.asarray(estimate) - np.asarray(raw.x_star)) ** 2),
                               rtol=1e-12)


def test_a_saved_training_is_reused_only_under_its_own_spec(tmp_path, monkeypatch):
    """save_trained then load_trained give back the parameters bit for bit and the record; a changed spec
    (another step count) is not reused."""
    import dataclasses

    import jax

    from lsq_jax.bench import claims
    from lsq_jax.train.state import init_state

    plan = claims._plan(claims.TRAININGS["multistep"], 3, True)
    params = jax.jit(lambda: init_state(plan))().params
    record = {"training": "multistep", "seed": 3, "seconds": 1.5, "test_mse": 0.25, "curve": [{"step": 0}]}
    claims.save_trained(str(tmp_path), "multistep", 3, True, claims.Trained(plan, params, 1.5, 0.25), record)
    loaded, loaded_record = claims.load_trained(str(tmp_path), "multistep", 3, True)
    assert loaded_record == record and loaded.test_mse == 0.25 and loaded.plan.exp == plan.exp
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert claims.load_trained(str(tmp_path), "multistep", 4, True) is None
    changed = dataclasses.replace(claims.TRAININGS["multistep"], steps=claims.TRAININGS["multistep"].steps + 1)
    monkeypatch.setitem(claims.TRAININGS, "multistep", changed)
    assert claims.load_trained(str(tmp_path), "multistep", 3, True) is None
