"""lsq_jax.eval.solvers and lsq_jax.eval.constructions against independent numpy computations."""
import numpy as np
import pytest

from lsq_jax.eval.constructions import construction_solver
from lsq_jax.eval.report import iterated_report
from lsq_jax.eval.solvers import (
    cg_solver,
    gd_solver,
    learned_gradient_solver,
    learned_multistep_solver,
    lstsq_solver,
    optimal_gd_solver,
    run_solver,
)

from eval_numpy import (
    conditioned_problems,
    exact_gradient_model,
    exact_multistep_model,
    gram_eigs,
    numpy_cgls,
    numpy_gd,
    rel_err,
    run,
)

# ----------------------------------------------------------------------------------------------------------
# Classical solvers


@pytest.mark.parametrize("eta", [0.3, "auto"])
def test_gd_matches_numpy(eta):
    p = conditioned_problems(0, 12, 15, 4, 3.0)
    eta_b = 1 / gram_eigs(p.a)[:, -1] if eta == "auto" else np.full(12, eta)
    want = numpy_gd(p.a, p.b, p.x0, eta_b, 150)
    got = run(gd_solver(eta), p, 150)
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-13
    # eta 'auto' converges on every problem, at least as fast as (1 - lambda_min / lambda_max)^t
    if eta == "auto":
        lam = gram_eigs(p.a)
        bound = (1 - lam[:, 0] / lam[:, -1]) ** 150 * rel_err(p.x0, p.x_star, p.x_star)
        assert np.all(rel_err(got[-1], p.x_star, p.x_star) <= bound * (1 + 1e-6))


def test_optimal_gd_matches_numpy_and_its_rate():
    p = conditioned_problems(1, 12, 15, 4, 3.0)
    lam = gram_eigs(p.a)
    want = numpy_gd(p.a, p.b, p.x0, 2 / (lam[:, 0] + lam[:, -1]), 150)
    got = run(optimal_gd_solver(), p, 150)
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-13
    # the worst component contracts by exactly (lmax - lmin) / (lmax + lmin): rate over 20 steps
    rho = (lam[:, -1] - lam[:, 0]) / (lam[:, -1] + lam[:, 0])
    e = rel_err(got, p.x_star, p.x_star)
    np.testing.assert_allclose((e[40] / e[20]) ** (1 / 20), rho, rtol=0.05)


def test_cg_matches_numpy_cgls_reaches_lstsq_and_stays_there():
    p = conditioned_problems(2, 16, 12, 5, 5.0)
    got = run(cg_solver(), p, 300)
    want = numpy_cgls(p.a, p.b, p.x0, 300)
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-12
    x_ls = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(p.a, p.b)])
    # D = 5 iterations in exact arithmetic; round-off distance from lstsq from then on (no late drift)
    assert np.max(rel_err(got[8:], x_ls, p.x_star)) <= 1e-13
    assert np.max(rel_err(got[-1], p.x_star, p.x_star)) <= 1e-13


@pytest.mark.parametrize("truncate", [None, 3])
def test_lstsq_matches_numpy(truncate):
    p = conditioned_problems(3, 10, 9, 5, 1.0, truncate=truncate)
    got = run(lstsq_solver(), p, 3)
    want = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(p.a, p.b)])
    for t in range(4):  # a constant iterate
        assert np.max(rel_err(got[t], want, p.x_star)) <= 1e-13
    assert np.max(rel_err(got[0], p.x_star, p.x_star)) <= 1e-13


# ----------------------------------------------------------------------------------------------------------
# Constructions and learned models through the harness


@pytest.mark.parametrize("kappa", [2.0, 5.0])
def test_baseconv_construction_through_the_harness_is_gd_and_reaches_round_off(kappa):
    n_iters = 1000
    p = conditioned_problems(4, 12, 20, 5, kappa)
    lam_max = gram_eigs(p.a)[:, -1]
    for eta in ("auto", 0.8 * 20 / kappa ** 2):  # the second: eta lambda_i in [0.8 / kappa^2, 0.8]
        got = run(construction_solver("baseconv", 5, 20, eta), p, n_iters)
        eta_b = 1 / lam_max if eta == "auto" else np.full(12, eta)
        want = numpy_gd(p.a, p.b, p.x0, eta_b, n_iters)
        assert np.max(rel_err(got, want, p.x_star)) <= 1e-13, eta
        assert np.max(rel_err(got[-1], p.x_star, p.x_star)) <= 1e-13, eta


def test_linear_attention_construction_through_the_harness_is_gd():
    p = conditioned_problems(5, 8, 14, 4, 3.0)
    got = run(construction_solver("linear_attention", 4, 14), p, 300)
    want = numpy_gd(p.a, p.b, p.x0, 1 / gram_eigs(p.a)[:, -1], 300)
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-13
    assert np.max(rel_err(got[-1], p.x_star, p.x_star)) <= 1e-13


@pytest.mark.parametrize("eta", [0.4, "auto"])
def test_learned_gradient_solver_with_an_exact_stand_in_is_gd(eta):
    p = conditioned_problems(6, 10, 20, 5, 2.0)
    got = run(learned_gradient_solver(exact_gradient_model(), None, eta), p, 200)
    eta_b = 1 / gram_eigs(p.a)[:, -1] if eta == "auto" else np.full(10, eta)
    assert np.max(rel_err(got, numpy_gd(p.a, p.b, p.x0, eta_b, 200), p.x_star)) <= 1e-13


def test_learned_multistep_solver_with_an_exact_stand_in_is_gd_at_k_t():
    k, eta, n_iters = 4, 0.5, 25
    p = conditioned_problems(7, 10, 20, 5, 1.0)
    solver = learned_multistep_solver(exact_multistep_model(k, eta), None, k)
    got = run(solver, p, n_iters)
    want = numpy_gd(p.a, p.b, p.x0, np.full(10, eta), k * n_iters)[::k]
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-13
    report = iterated_report([solver, gd_solver(eta)], p, n_iters, eta=eta, n_report_points=None)
    learned, gd = report["methods"]["learned"], report["methods"]["gd"]
    assert report["n_gd_steps"] == k * n_iters
    assert (learned["steps_per_iter"], learned["n_iters"], gd["n_iters"]) == (k, n_iters, k * n_iters)
    assert max(learned["distance_to_gd"]["p90"]) <= 1e-13
    # the same GD-step budget: the learned curve at t is GD's at k t
    np.testing.assert_allclose(learned["forward_error"]["median"], gd["forward_error"]["median"][::k],
                               rtol=1e-9, atol=1e-15)


def test_solver_validation():
    with pytest.raises(ValueError, match="eta"):
        gd_solver(-1.0)
    with pytest.raises(ValueError, match="eta"):
        construction_solver("baseconv", 3, 8, "fast")
    with pytest.raises(ValueError, match="kind"):
        construction_solver("mamba", 3, 8)
    with pytest.raises(ValueError, match="n_iters"):
        learned_multistep_solver(exact_multistep_model(1, 0.5), None, 0)
    p = conditioned_problems(0, 2, 6, 3, 1.0)
    with pytest.raises(ValueError, match="n_iters"):
        run_solver(gd_solver(), p.a, p.b, p.x0, -1)
    with pytest.raises(ValueError, match="distinct"):
        iterated_report([gd_solver(), gd_solver()], p, 5)
