"""The curvature diagnostic against closed forms and numpy, on a residual whose Jacobian and Hessian are
explicit: r(theta) = A theta + 0.5 [theta^T B_i theta]_i - b, so J(theta) = A + [theta^T B_i]_i and the
Hessian of 0.5 ||r||^2 is J^T J + sum_i r_i B_i."""
import io
import json
import pathlib
from contextlib import redirect_stderr

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.bench import curvature

P, N, K = 6, 5, 2  # parameters; problems of K residuals each (M = 10 residuals)
SINGULAR = np.array([1.0, 1e-2, 1e-4, 1e-6, 1e-8, 1e-9])  # J^T J's eigenvalues: their squares


@pytest.fixture(scope="module")
def problem():
    """A = U diag(SINGULAR) V^T and r(0) = -b = 3 u_0 + 2 u_3 + 4 w (w a unit vector outside range(A)),
    as per-problem arrays: row i of A is A_rows[i // K, i % K]."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((N * K, P + 1)))
    U, w = Q[:, :P], Q[:, P]
    V, _ = np.linalg.qr(rng.standard_normal((P, P)))
    A = U @ np.diag(SINGULAR) @ V.T
    b = -(3 * U[:, 0] + 2 * U[:, 3] + 4 * w)
    B = rng.standard_normal((N * K, P, P))
    B = B + B.transpose(0, 2, 1)
    return {"A": A.reshape(N, K, P), "B": B.reshape(N, K, P, P), "b": b.reshape(N, K)}


def residual_fn(theta, batch):
    return (jnp.einsum("nkp,p->nk", batch["A"], theta) + 0.5 * jnp.einsum("p,nkpq,q->nk", theta, batch["B"], theta)
            - batch["b"])


def numpy_residual(problem, theta):
    A, B, b = (problem[k].reshape(N * K, *problem[k].shape[2:]) for k in ("A", "B", "b"))
    return A @ theta + 0.5 * np.einsum("p,ipq,q->i", theta, B, theta) - b


def explicit_hessian(problem, theta):
    A, B = problem["A"].reshape(N * K, P), problem["B"].reshape(N * K, P, P)
    J = A + np.einsum("ipq,q->ip", B, theta)
    return J.T @ J + np.einsum("i,ipq->pq", numpy_residual(problem, theta), B)


@pytest.fixture(scope="module")
def figures(problem):
    batch = jax.tree.map(jnp.asarray, problem)
    return curvature.curvature(residual_fn, jnp.zeros(P), batch, n_chunks=5, lanczos_steps=P)


def test_jacobian_is_the_closed_form_in_chunks(problem):
    theta = np.random.default_rng(1).standard_normal(P)

    def f(t, b):
        return residual_fn(t, b).reshape(-1)

    r, J = curvature.jacobian(f, jnp.asarray(theta), jax.tree.map(jnp.asarray, problem), n_chunks=5)
    # chunk c holds the strided problems c, c + 5, ...: here one problem each, so rows come in problem order
    np.testing.assert_allclose(r, numpy_residual(problem, theta), rtol=1e-13)
    A, B = problem["A"].reshape(N * K, P), problem["B"].reshape(N * K, P, P)
    np.testing.assert_allclose(J, A + np.einsum("ipq,q->ip", B, theta), rtol=1e-13, atol=1e-15)


def test_spectrum_bands_count_the_squared_singular_values(figures, problem):
    jtj = figures["jtj"]
    np.testing.assert_allclose(jtj["largest"], 1.0, rtol=1e-12)
    # 1, 1e-4 | 1e-8 | 1e-12 above 1e-6, 1e-10, 1e-14; 1e-16 and 1e-18 below all three
    assert jtj["above"] == {"1e-06": 2, "1e-10": 3, "1e-14": 4}
    A = problem["A"].reshape(N * K, P)
    eig = np.linalg.eigvalsh(A.T @ A)
    assert jtj["above"]["1e-06"] == np.sum(eig > 1e-6 * eig[-1])
    assert figures["rank"] == np.linalg.matrix_rank(A) == P
    assert figures["params"] == P and figures["residuals"] == N * K


def test_residual_outside_range_is_the_gauss_newton_best_decrease(figures, problem):
    # ||r||^2 = 9 + 4 + 16: u_0 and u_3 are in range(J), w is not; a band drops u_3 unless it keeps 1e-12
    np.testing.assert_allclose(figures["residual_outside_range"], 16 / 29, rtol=1e-10)
    np.testing.assert_allclose(list(figures["residual_outside_band"].values()), [20 / 29, 20 / 29, 16 / 29],
                               rtol=1e-10)
    A, r = problem["A"].reshape(N * K, P), -problem["b"].reshape(-1)
    step = np.linalg.lstsq(A, -r, rcond=None)[0]
    np.testing.assert_allclose(figures["residual_outside_range"], np.sum((r + A @ step) ** 2) / (r @ r), rtol=1e-8)


def test_lanczos_finds_the_explicit_hessians_most_negative_eigenvalues(figures, problem):
    eig = np.linalg.eigvalsh(explicit_hessian(problem, np.zeros(P)))
    assert eig[0] < 0  # sum_i r_i B_i outweighs J^T J in some directions
    lz = figures["lanczos"]
    assert lz["steps"] == P and lz["negative_ritz_values"] == np.sum(eig < 0)
    np.testing.assert_allclose(lz["most_negative"], eig[:3], rtol=1e-10, atol=1e-12 * abs(eig).max())
    np.testing.assert_allclose(lz["largest"], eig[-1], rtol=1e-10)
    assert max(lz["residual_norms"]) < 1e-10 * abs(eig).max()


def test_lanczos_with_fewer_steps_gives_ritz_values_inside_the_spectrum():
    """Few steps on a diagonal operator: Ritz values interlace, so each lies within [min, max], and the
    extreme ones approach the extreme eigenvalues from inside."""
    d = np.linspace(-3.0, 5.0, 40)
    values, vectors = curvature.lanczos(lambda v: d * v, 40, 12)
    assert values.shape == (12,) and np.all((values >= d[0] - 1e-12) & (values <= d[-1] + 1e-12))
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(12), atol=1e-12)
    np.testing.assert_allclose(vectors.T @ (d[:, None] * vectors), np.diag(values), atol=1e-12)


def test_loss_along_the_most_negative_direction_is_the_residuals_own(figures, problem):
    H = explicit_hessian(problem, np.zeros(P))
    eig, vec = np.linalg.eigh(H)
    y = vec[:, 0]

    def loss(t):
        return np.mean(numpy_residual(problem, t) ** 2)

    along = figures["along_most_negative"]
    assert [a["step"] for a in along] == list(curvature.STEP_SIZES)
    for a in along:
        # the direction's sign is arbitrary: the pair (plus, minus) is the same set either way
        expected = sorted([loss(a["step"] * y) / loss(np.zeros(P)), loss(-a["step"] * y) / loss(np.zeros(P))])
        np.testing.assert_allclose(sorted([a["loss_ratio_plus"], a["loss_ratio_minus"]]), expected, rtol=1e-10)


def test_damped_steps_are_the_augmented_least_squares_steps(figures, problem):
    # at theta = 0: J = A, r = -b; LM's step at relative damping lam with D = mean diag(A^T A / M) solves
    # min ||r + A delta||^2 + mu ||delta||^2, mu = lam M D: here by QR (numpy's lstsq) of [A; sqrt(mu) I]
    A, r = problem["A"].reshape(N * K, P), -problem["b"].reshape(-1)
    mu_per_lam = np.mean(np.diag(A.T @ A))

    def loss(t):
        return np.mean(numpy_residual(problem, t) ** 2)

    steps = figures["damped_steps"]
    assert [s["damping"] for s in steps] == list(curvature.DAMPINGS)
    for s in steps:
        mu = s["damping"] * mu_per_lam
        delta = np.linalg.lstsq(np.vstack([A, np.sqrt(mu) * np.eye(P)]), np.concatenate([-r, np.zeros(P)]),
                                rcond=None)[0]
        np.testing.assert_allclose(s["step_norm"], np.linalg.norm(delta), rtol=1e-8)
        np.testing.assert_allclose(s["predicted_loss_ratio"], np.sum((r + A @ delta) ** 2) / (r @ r), rtol=1e-8)
        np.testing.assert_allclose(s["loss_ratio"], loss(delta) / loss(np.zeros(P)), rtol=1e-7)
    # the smallest damping resolves u_3 (squared singular value 1e-12), so only w is left to the linear model,
    # while the quadratic term over so long a step raises the actual loss
    assert abs(steps[-1]["predicted_loss_ratio"] - 16 / 29) < 1e-3
    assert steps[-1]["loss_ratio"] > 1


REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"task.n_dims": 2, "model.n_embd": 5, "model.n_layer": 1, "train.batch_size": 200, "train.num_steps": 2,
        "train.eval_batch_size": 64}


def bench_command(*flags):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lsq_jax.bench", "--bench=curvature", *flags], cwd=REPO,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_a_trained_workdirs_figures_match_the_explicit_matrices(tmp_path, monkeypatch, capsys):
    """A tiny LM run's workdir: the command's figures are those of the explicit Jacobian (jacfwd over the
    whole batch) and Hessian (jax.hessian) of the residuals of the batch LM fitted, at the saved parameters."""
    from lsq_jax import bench
    from jax.flatten_util import ravel_pytree

    from lsq_jax import main
    from lsq_jax.checkpoint import restore_params
    from lsq_jax.eval import report
    from lsq_jax.mesh import make_mesh, replicated
    from lsq_jax.models.backbone import abstract_params
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.step import lm_keys, lm_residual_fn

    monkeypatch.setattr(report, "write_evaluation", lambda *a, **k: {})
    args = [f"--config={REPO / 'configs' / 'baseconv.py'}:lm", *(f"--config.{k}={v}" for k, v in TINY.items()),
            f"--workdir={tmp_path / 'w'}"]
    with redirect_stderr(io.StringIO()):
        assert main.run(["lsq_jax.main", *args], log=lambda _: None) == 0
    c = curvature.workdir_curvature(str(tmp_path / "w"), lanczos_steps=100_000, log=lambda _: None)
    assert json.loads(json.dumps(c)) == c  # written as the bench's JSON
    bench.print_curvature(c)
    assert "curvature (baseconv-lm, seed 0, step 2" in capsys.readouterr().out

    exp, step, params = restore_params(tmp_path / "w", None, lambda e: abstract_params(e.model),
                                       replicated(make_mesh()), log=lambda _: None)
    plan = make_plan(exp, make_mesh())
    residuals, keys = lm_residual_fn(plan, plan.full_size(lm=True)), lm_keys(plan, step)
    theta, unravel = ravel_pytree(params)

    def f(t):
        return residuals(unravel(t), keys).reshape(-1)

    r, J = np.asarray(f(theta)), np.asarray(jax.jacfwd(f)(theta))
    H = np.asarray(jax.hessian(lambda t: 0.5 * jnp.sum(f(t) ** 2))(theta))
    assert (c["step"], c["params"], c["residuals"]) == (2, theta.size, r.size)
    s = np.linalg.svd(J, compute_uv=False)
    np.testing.assert_allclose(c["jtj"]["largest"], s[0] ** 2, rtol=1e-10)
    assert c["jtj"]["above"] == {f"{b:.0e}": int(np.sum(s ** 2 > b * s[0] ** 2)) for b in curvature.BANDS}
    assert c["rank"] == np.linalg.matrix_rank(J)
    gn = np.linalg.lstsq(J, -r, rcond=None)[0]
    assert r.size > theta.size  # more residuals than parameters: some of r lies outside range(J)
    np.testing.assert_allclose(c["residual_outside_range"], np.sum((r + J @ gn) ** 2) / (r @ r), rtol=1e-6)
    eig = np.linalg.eigvalsh(H)
    assert c["lanczos"]["steps"] <= theta.size
    np.testing.assert_allclose(c["lanczos"]["most_negative"], eig[:3], atol=1e-8 * abs(eig).max())


@pytest.mark.slow
def test_command_refuses_a_missing_or_empty_workdir_and_no_lanczos_steps(tmp_path):
    for flags, field in (([], "workdir"), ([f"--workdir={tmp_path}"], "workdir"),
                         ([f"--workdir={tmp_path}", "--lanczos_steps=0"], "lanczos_steps")):
        done = bench_command(*flags, f"--out={tmp_path / 'c.json'}")
        assert done.returncode == 2 and done.stderr.startswith(f"error: --{field}: ")
        assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.json").exists()
