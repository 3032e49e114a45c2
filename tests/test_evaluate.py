"""lsq_jax.evaluate against independent numpy computations (loops over problems and iterations)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax import evaluate as ev
from lsq_jax.data import LeastSquaresSample, TaskConfig, example_keys, gradient_descent, make_task
from lsq_jax.data.tasks import least_squares_gradient
from lsq_jax.experiment import experiment_from_config
from lsq_jax.models.backbone import init_params

EPS = np.finfo(np.float64).eps


# ----------------------------------------------------------------------------------------------------------
# Independent numpy computations


def conditioned_problems(seed, bsz, n, d, kappa, truncate=None):
    """A with singular values mapped onto [1, kappa] (kappa = 1: plain Gaussian), x*, x0 ~ N(0, I), b = A x*.

    `truncate` zeroes the trailing coordinates of A, x* and x0 (rank-deficient A)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((bsz, n, d))
    if kappa != 1:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        lo, hi = s.min(-1, keepdims=True), s.max(-1, keepdims=True)
        a = np.einsum("bld,bd,bde->ble", u, 1 + (kappa - 1) * (s - lo) / (hi - lo), vt)
    x_star, x0 = rng.standard_normal((bsz, d)), rng.standard_normal((bsz, d))
    if truncate is not None:
        a[..., truncate:] = 0
        x_star[..., truncate:] = 0
        x0[..., truncate:] = 0
    return LeastSquaresSample(a, np.einsum("bld,bd->bl", a, x_star), x_star, x0)


def gram_eigs(a):
    return np.linalg.eigvalsh(np.einsum("bld,ble->bde", a, a) / a.shape[1])


def numpy_gd(a, b, x0, eta_b, n_iters):
    """Iterates (T + 1, B, D) of x <- x - eta_b A^T (A x - b) / L, one problem at a time."""
    out = np.zeros((n_iters + 1,) + x0.shape)
    for i in range(a.shape[0]):
        x = x0[i].copy()
        out[0, i] = x
        for t in range(n_iters):
            x = x - eta_b[i] * a[i].T @ (a[i] @ x - b[i]) / a.shape[1]
            out[t + 1, i] = x
    return out


def numpy_cgls(a, b, x0, n_iters):
    """CGLS (Bjorck's form), one problem at a time, held once ||A^T r|| <= eps ||A||_F (||A||_F ||x|| + ||b||)."""
    out = np.zeros((n_iters + 1,) + x0.shape)
    for i in range(a.shape[0]):
        ai, bi, x = a[i], b[i], x0[i].copy()
        norm_a = np.linalg.norm(ai)
        r = bi - ai @ x
        s = ai.T @ r
        p, gamma = s.copy(), s @ s
        stopped = np.sqrt(gamma) <= EPS * norm_a * (norm_a * np.linalg.norm(x) + np.linalg.norm(bi))
        out[0, i] = x
        for t in range(n_iters):
            if not stopped:
                q = ai @ p
                alpha = gamma / (q @ q)
                x = x + alpha * p
                r = r - alpha * q
                s = ai.T @ r
                gamma_new = s @ s
                p = s + gamma_new / gamma * p
                gamma = gamma_new
                stopped = np.sqrt(gamma) <= EPS * norm_a * (norm_a * np.linalg.norm(x) + np.linalg.norm(bi))
            out[t + 1, i] = x
    return out


def numpy_statistics(e, thresholds=ev.THRESHOLDS, tail_fraction=0.1, margin=100.0):
    """The definitions of evaluate.trajectory_statistics, written out per problem."""
    e = np.where(np.isnan(e), np.inf, e)
    n_iters = e.shape[0] - 1
    n_tail = max(1, math.ceil(tail_fraction * n_iters))
    floors, settled, rates = [], [], []
    for col in e.T:
        floor = np.median(col[-n_tail:])
        end, hit = n_iters, False
        if np.isfinite(floor):
            for t in range(n_iters + 1 - n_tail):
                if col[t] <= margin * floor:
                    if t > 0:  # descended to the floor from above the margin
                        end, hit = t, True
                    break
        start = end // 2
        with np.errstate(invalid="ignore"):
            ratio = col[end] / col[start] if col[start] > 0 else np.nan
        rates.append(ratio ** (1.0 / (end - start)))
        floors.append(floor)
        settled.append(hit)
    with np.errstate(invalid="ignore"):
        quantiles = np.percentile(e, [10, 50, 90], axis=1)
    iters_to = []
    for thr in thresholds:
        below = np.nonzero(quantiles[1] <= thr)[0]
        iters_to.append(int(below[0]) if below.size else -1)
    return quantiles, np.array(floors), np.array(settled), np.array(rates), iters_to


def rel_err(xs, ref, scale):
    return np.linalg.norm(xs - ref, axis=-1) / np.linalg.norm(scale, axis=-1)


def run(solver, p, n_iters):
    return np.asarray(ev.run_solver(solver, p.a, p.b, p.x0, n_iters))


# ----------------------------------------------------------------------------------------------------------
# Stand-in "learned" models: exact computations placed where the task reads the prediction


def exact_gradient_model(scale=1.0):
    """explicit_gradient tokens [x, 0], [a_i, b_i] -> scale * A^T (A x - b) / L at the last position."""

    def apply_fn(params, tokens):
        x, a, b = tokens[:, 0, :-1], tokens[:, 1:, :-1], tokens[:, 1:, -1]
        g = scale * least_squares_gradient(a, b, x)
        return jnp.zeros(tokens.shape[:2] + (x.shape[-1],), tokens.dtype).at[:, -1].set(g)

    return apply_fn


def exact_multistep_model(k, eta):
    """multistep_gd tokens [a_i, b_i], [x, 0] -> k GD steps at the last position."""

    def apply_fn(params, tokens):
        a, b, x = tokens[:, :-1, :-1], tokens[:, :-1, -1], tokens[:, -1, :-1]
        xk = gradient_descent(a, b, x, k, eta)
        return jnp.zeros(tokens.shape[:2] + (x.shape[-1],), tokens.dtype).at[:, -1].set(xk)

    return apply_fn


# ----------------------------------------------------------------------------------------------------------
# Classical solvers


@pytest.mark.parametrize("eta", [0.3, "auto"])
def test_gd_matches_numpy(eta):
    p = conditioned_problems(0, 12, 15, 4, 3.0)
    eta_b = 1 / gram_eigs(p.a)[:, -1] if eta == "auto" else np.full(12, eta)
    want = numpy_gd(p.a, p.b, p.x0, eta_b, 150)
    got = run(ev.gd_solver(eta), p, 150)
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
    got = run(ev.optimal_gd_solver(), p, 150)
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-13
    # the worst component contracts by exactly (lmax - lmin) / (lmax + lmin): rate over 20 steps
    rho = (lam[:, -1] - lam[:, 0]) / (lam[:, -1] + lam[:, 0])
    e = rel_err(got, p.x_star, p.x_star)
    np.testing.assert_allclose((e[40] / e[20]) ** (1 / 20), rho, rtol=0.05)


def test_cg_matches_numpy_cgls_reaches_lstsq_and_stays_there():
    p = conditioned_problems(2, 16, 12, 5, 5.0)
    got = run(ev.cg_solver(), p, 300)
    want = numpy_cgls(p.a, p.b, p.x0, 300)
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-12
    x_ls = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(p.a, p.b)])
    # D = 5 iterations in exact arithmetic; round-off distance from lstsq from then on (no late drift)
    assert np.max(rel_err(got[8:], x_ls, p.x_star)) <= 1e-13
    assert np.max(rel_err(got[-1], p.x_star, p.x_star)) <= 1e-13


@pytest.mark.parametrize("truncate", [None, 3])
def test_lstsq_matches_numpy(truncate):
    p = conditioned_problems(3, 10, 9, 5, 1.0, truncate=truncate)
    got = run(ev.lstsq_solver(), p, 3)
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
        got = run(ev.construction_solver("baseconv", 5, 20, eta), p, n_iters)
        eta_b = 1 / lam_max if eta == "auto" else np.full(12, eta)
        want = numpy_gd(p.a, p.b, p.x0, eta_b, n_iters)
        assert np.max(rel_err(got, want, p.x_star)) <= 1e-13, eta
        assert np.max(rel_err(got[-1], p.x_star, p.x_star)) <= 1e-13, eta


def test_linear_attention_construction_through_the_harness_is_gd():
    p = conditioned_problems(5, 8, 14, 4, 3.0)
    got = run(ev.construction_solver("linear_attention", 4, 14), p, 300)
    want = numpy_gd(p.a, p.b, p.x0, 1 / gram_eigs(p.a)[:, -1], 300)
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-13
    assert np.max(rel_err(got[-1], p.x_star, p.x_star)) <= 1e-13


@pytest.mark.parametrize("eta", [0.4, "auto"])
def test_learned_gradient_solver_with_an_exact_stand_in_is_gd(eta):
    p = conditioned_problems(6, 10, 20, 5, 2.0)
    got = run(ev.learned_gradient_solver(exact_gradient_model(), None, eta), p, 200)
    eta_b = 1 / gram_eigs(p.a)[:, -1] if eta == "auto" else np.full(10, eta)
    assert np.max(rel_err(got, numpy_gd(p.a, p.b, p.x0, eta_b, 200), p.x_star)) <= 1e-13


def test_learned_multistep_solver_with_an_exact_stand_in_is_gd_at_k_t():
    k, eta, n_iters = 4, 0.5, 25
    p = conditioned_problems(7, 10, 20, 5, 1.0)
    solver = ev.learned_multistep_solver(exact_multistep_model(k, eta), None, k)
    got = run(solver, p, n_iters)
    want = numpy_gd(p.a, p.b, p.x0, np.full(10, eta), k * n_iters)[::k]
    assert np.max(rel_err(got, want, p.x_star)) <= 1e-13
    report = ev.iterated_report([solver, ev.gd_solver(eta)], p, n_iters, eta=eta, n_report_points=None)
    learned, gd = report["methods"]["learned"], report["methods"]["gd"]
    assert report["n_gd_steps"] == k * n_iters
    assert (learned["steps_per_iter"], learned["n_iters"], gd["n_iters"]) == (k, n_iters, k * n_iters)
    assert max(learned["distance_to_gd"]["p90"]) <= 1e-13
    # the same GD-step budget: the learned curve at t is GD's at k t
    np.testing.assert_allclose(learned["forward_error"]["median"], gd["forward_error"]["median"][::k],
                               rtol=1e-9, atol=1e-15)


def test_solver_validation():
    with pytest.raises(ValueError, match="eta"):
        ev.gd_solver(-1.0)
    with pytest.raises(ValueError, match="eta"):
        ev.construction_solver("baseconv", 3, 8, "fast")
    with pytest.raises(ValueError, match="kind"):
        ev.construction_solver("mamba", 3, 8)
    p = conditioned_problems(0, 2, 6, 3, 1.0)
    with pytest.raises(ValueError, match="n_iters"):
        ev.run_solver(ev.gd_solver(), p.a, p.b, p.x0, -1)
    with pytest.raises(ValueError, match="distinct"):
        ev.iterated_report([ev.gd_solver(), ev.gd_solver()], p, 5)


# ----------------------------------------------------------------------------------------------------------
# Report statistics


def test_trajectory_statistics_against_numpy():
    t = np.arange(201)[:, None]
    rates = np.array([0.5, 0.8, 0.9, 0.95, 0.999, 1.05, 0.7, 1.0])
    e = np.maximum(rates ** t, np.array([1e-16, 1e-12, 1e-15, 1e-9, 1e-16, 0, 1e-16, 0])[None])
    e[:, 6] *= 1 + 0.3 * np.sin(t[:, 0])  # a noisy floor
    e[150:, 5] = np.nan  # diverged: inf - inf
    e[:, 7] = 3e-16  # constant (lstsq): no window
    got = ev.trajectory_statistics(jnp.asarray(e))
    quantiles, floors, settled, contraction, iters_to = numpy_statistics(e)
    np.testing.assert_allclose(np.asarray(got["quantiles"]), quantiles, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(got["floor_b"]), floors, rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(got["settled_b"]), settled)
    np.testing.assert_allclose(np.asarray(got["contraction_b"]), contraction, rtol=1e-12)
    assert list(np.asarray(got["iters_to"])) == iters_to
    # geometric decays are measured at their own rate; the slow one has not settled
    np.testing.assert_allclose(contraction[[0, 1, 2, 3, 4]], rates[[0, 1, 2, 3, 4]], rtol=1e-9)
    assert not settled[4] and not settled[7] and contraction[7] == 1 and np.isinf(floors[5])
    assert np.isinf(contraction[5]) and settled[[0, 1, 2, 3, 6]].all()


def test_iterated_report_against_numpy():
    n_iters = 120
    p = conditioned_problems(8, 24, 16, 4, 4.0)
    solvers = [ev.gd_solver(), ev.optimal_gd_solver(), ev.cg_solver(), ev.lstsq_solver()]
    report = ev.iterated_report(solvers, p, n_iters, n_report_points=20)
    json.dumps(report, allow_nan=False)

    s = np.linalg.svd(p.a, compute_uv=False)
    kappa = s[:, 0] / s[:, -1]
    lam = gram_eigs(p.a)
    eta_b = 1 / lam[:, -1]
    x_gd = numpy_gd(p.a, p.b, p.x0, eta_b, n_iters)
    np.testing.assert_allclose(report["kappa"]["median"], np.median(kappa), rtol=1e-12)
    np.testing.assert_allclose(report["step_size"]["p90"], np.percentile(eta_b, 90), rtol=1e-12)
    for solver in solvers:
        m = report["methods"][solver.name]
        times = m["t"]
        assert times[0] == 0 and times[-1] == n_iters == m["n_iters"] and times == sorted(set(times))
        assert len(times) < n_iters
        xs = run(solver, p, n_iters)
        fe = rel_err(xs, p.x_star, p.x_star)
        curves = {
            "forward_error": fe,
            "residual": rel_err(np.einsum("bld,tbd->tbl", p.a, xs), p.b, p.b),
            "distance_to_gd": rel_err(xs, x_gd, p.x_star),
        }
        for key, values in curves.items():
            q = np.percentile(values, [10, 50, 90], axis=1)[:, times]
            # numpy's GD reference and A x - b agree with the report's to round-off, not bitwise
            atol = 0 if key == "forward_error" else 1e-14
            for row, name in zip(q, ("p10", "median", "p90")):
                np.testing.assert_allclose(m[key][name], row, rtol=1e-9, atol=atol, err_msg=(solver.name, key))
        _, floors, settled, contraction, iters_to = numpy_statistics(fe)
        np.testing.assert_allclose(m["floor"], np.median(floors), rtol=1e-9)
        np.testing.assert_allclose(m["floor_over_kappa_eps"], np.median(floors / (kappa * EPS)), rtol=1e-9)
        np.testing.assert_allclose(m["final_forward_error"], np.median(fe[-1]), rtol=1e-9)
        assert m["settled_fraction"] == pytest.approx(np.mean(settled))
        assert m["iters_to"] == {f"{thr:.0e}": (it if it >= 0 else None) for thr, it in zip(ev.THRESHOLDS, iters_to)}
        finite = contraction[~np.isnan(contraction)]
        assert (m["contraction"] is None) == (finite.size == 0)
        if finite.size:
            np.testing.assert_allclose(m["contraction"], np.median(finite), rtol=1e-9)
    gd, opt, cg = (report["methods"][k] for k in ("gd", "optimal_gd", "cg"))
    np.testing.assert_allclose(gd["contraction_theory"], np.median(1 - lam[:, 0] / lam[:, -1]), rtol=1e-9)
    np.testing.assert_allclose(opt["contraction_theory"],
                               np.median((lam[:, -1] - lam[:, 0]) / (lam[:, -1] + lam[:, 0])), rtol=1e-9)
    np.testing.assert_allclose(cg["contraction_theory"], np.median((kappa - 1) / (kappa + 1)), rtol=1e-9)
    # GD's measured rate is its theoretical one; every method here reaches round-off (kappa(A) eps units)
    assert gd["contraction"] == pytest.approx(gd["contraction_theory"], rel=0.02)
    assert report["methods"]["lstsq"]["contraction"] == pytest.approx(1.0)  # a constant iterate
    for name in ("cg", "lstsq"):  # at their floor after 120 iterations (GD needs ~500 at kappa(A) = 4)
        assert report["methods"][name]["floor_over_kappa_eps"] <= 10


def test_single_step_report_against_numpy():
    key = jax.random.key(3)
    n = 32
    for name, apply_fn, field, want in (
        ("explicit_gradient", exact_gradient_model(1.01), "relative_gradient_error", 0.01),
        ("multistep_gd", lambda p, tok: jnp.zeros(tok.shape[:2] + (5,)).at[:, -1].set(tok[:, -1, :5]),
         "relative_step_error", 1.0),  # predicts x0: ||x0 - x_k|| / ||x_k - x0|| = 1
    ):
        task = make_task(TaskConfig(name))
        report = ev.single_step_report(task, apply_fn, None, key, n)
        for q in ("median", "p10", "p90"):
            assert report[field][q] == pytest.approx(want, rel=1e-10)
    # least_squares predicting 0: forward error 1, test MSE = mean(x*^2) of the same fresh problems
    task = make_task(TaskConfig("least_squares"))
    report = ev.single_step_report(task, lambda p, tok: jnp.zeros(tok.shape[:2] + (5,)), None, key, n)
    x_star = np.asarray(task.sample(example_keys(key, 0, 0, n)).raw.x_star)
    assert report["test_mse"] == pytest.approx(np.mean(x_star ** 2), rel=1e-12)
    assert report["forward_error"] == {"median": 1.0, "p10": 1.0, "p90": 1.0}


def test_ood_cells():
    cells = ev.ood_cells(5, 20, kappa=1.0, scale_target=1.0)
    assert cells[0] == {"axis": "kappa_scale", "kappa": 1.0, "scale_target": 1.0, "n_points": 20, "n_dims": 5}
    assert sum(c["axis"] == "kappa_scale" for c in cells) == 15
    assert [c["n_points"] for c in cells if c["axis"] == "rows"] == [10, 15]
    assert [c["n_dims"] for c in cells if c["axis"] == "dims"] == [3, 4]
    # an in-distribution cell off the grid is added first; rows below D are not allowed
    cells = ev.ood_cells(5, 8, kappa=3.0, scale_target=1.0, kappas=(1.0,), scales=(1.0,))
    assert [c["kappa"] for c in cells if c["axis"] == "kappa_scale"] == [3.0, 1.0]
    assert [c["n_points"] for c in cells if c["axis"] == "rows"] == [6]


# ----------------------------------------------------------------------------------------------------------
# Top-level reports


def small_experiment(task):
    return experiment_from_config({"task": {"name": task, "n_dims": 3, "n_points": 8},
                                   "model": {"n_embd": 8, "n_layer": 1}, "optim": {}, "train": {}})


def test_evaluate_experiment_with_an_exact_stand_in():
    exp = small_experiment("explicit_gradient")
    report = ev.evaluate_experiment(exp, None, jax.random.key(0), n_problems=16, n_iters=150, n_ood_problems=8,
                                    n_ood_iters=100, ood_kappas=(1.0, 5.0), ood_scales=(1.0, 10.0),
                                    apply_fn=exact_gradient_model())
    json.dumps(report, allow_nan=False)
    assert set(report) == {"kind", "config", "single_step", "iterated", "ood"}
    assert report["single_step"]["relative_gradient_error"]["p90"] <= 1e-14
    methods = report["iterated"]["methods"]
    assert list(methods) == ["learned", "baseconv_gd", "linear_attention_gd", "gd", "optimal_gd", "cg", "lstsq"]
    for q in ("median", "p10", "p90"):
        np.testing.assert_allclose(methods["learned"]["forward_error"][q], methods["gd"]["forward_error"][q],
                                   rtol=1e-9, atol=1e-14)
    assert max(methods["learned"]["distance_to_gd"]["p90"]) <= 1e-13
    cells = report["ood"]["cells"]
    assert len(cells) == 4 + 2 + 1  # kappa x scale, rows (4, 6), dims (2)
    for cell in cells:
        for name in ("learned", "baseconv_gd"):
            assert cell["methods"][name]["step_error"]["p90"] <= 1e-14
        assert cell["methods"]["learned"]["final_vs_gd"]["median"] == pytest.approx(1.0, rel=1e-6)
    table = ev.format_table(report)
    for name in methods:
        assert name in table


def test_evaluate_experiment_single_step_only_for_other_tasks():
    exp = small_experiment("identity")
    params = init_params(exp.model, jax.random.key(1))
    report = ev.evaluate_experiment(exp, params, jax.random.key(0), n_problems=16)
    assert set(report) == {"kind", "config", "single_step"}
    assert {"test_mse", "test_rel", "test_rel_l2"} <= set(report["single_step"])
    json.dumps(report, allow_nan=False)
    assert "single step" in ev.format_table(report)


def test_evaluate_constructions():
    report = ev.evaluate_constructions(3, 8, jax.random.key(0), n_problems=16, n_iters=300, n_ood_problems=8,
                                       n_ood_iters=40, ood_kappas=(1.0, 10.0), ood_scales=(1.0,))
    json.dumps(report, allow_nan=False)
    methods = report["iterated"]["methods"]
    assert list(methods) == ["baseconv_gd", "linear_attention_gd", "gd", "optimal_gd", "cg", "lstsq"]
    for name in ("baseconv_gd", "linear_attention_gd"):
        assert report["single_step"][f"{name}_relative_step_error"]["p90"] <= 1e-14
        assert max(methods[name]["distance_to_gd"]["p90"]) <= 1e-13
        assert methods[name]["iters_to"] == methods["gd"]["iters_to"]
    for name, m in methods.items():
        assert m["final_forward_error"] <= 1e-13, name
    for cell in report["ood"]["cells"]:
        assert cell["methods"]["baseconv_gd"]["step_error"]["p90"] <= 1e-14
        assert cell["methods"]["baseconv_gd"]["final_vs_gd"]["median"] == pytest.approx(1.0, rel=1e-6) or \
            cell["methods"]["gd"]["final_forward_error"]["median"] <= 1e-13  # ratio of round-off at the floor
    table = ev.format_table(report)
    assert all(name in table for name in methods) and "to 1e-14" in table
