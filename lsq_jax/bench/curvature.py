"""Curvature where LM stops: the spectrum of J^T J, the share of the residual Gauss-Newton cannot reach,
the Hessian's most negative eigenvalues and the loss along its most negative direction.

    python -m lsq_jax.bench --bench=curvature --workdir=W     # W: a finished LM run's workdir

On the parameters of W's newest checkpoint and the batch its LM iterations fit (the residuals r, M of
them, of the saved config's task; theta the P flattened parameters; J = dr/dtheta, M x P):

- J^T J's spectrum in bands: its largest eigenvalue and how many lie above 1e-6, 1e-10 and 1e-14 of it
  (the squared singular values of J, from one SVD of J, which is accurate to eps of the largest singular
  value, where eigenvalues of a formed J^T J are accurate to eps of the largest eigenvalue);
- the share of the residual outside range(J), ||r - U U^T r||^2 / ||r||^2 with U the left singular vectors
  kept: the Gauss-Newton model's best relative loss min_d ||r + J d||^2 / ||r||^2, so no GN or LM step,
  at any damping, lowers the batch loss below it. Given at J's numerical rank (numpy's matrix_rank
  tolerance) and with the directions of each band alone (a damping of that size drops the others);
- the most negative eigenvalues of the Hessian H of 0.5 ||r||^2 (= J^T J + sum_i r_i hess(r_i)), by
  Lanczos with full reorthogonalisation on Hessian-vector products (forward over reverse mode; H is never
  formed), each with its residual ||H y - lambda y|| (a bound on its error: an eigenvalue of H lies
  within it). Along a spectrum as wide as J^T J's, Lanczos resolves the negative end only when its steps
  approach P (the default runs min(P, --lanczos_steps) steps; P steps span the whole space);
- the loss along the most negative direction y (unit norm): loss(theta +- a y) / loss(theta) for a few a;
- the exact LM step at a few dampings lam (D isotropic, the mean of diag(J^T J) / M, as LM's default
  scaling): delta = -(J^T J + lam M D)^-1 J^T r from J's SVD, so every direction J resolves is solved
  for, not only those the formed J^T J resolves; its norm, the relative loss the linear model predicts,
  ||r + J delta||^2 / ||r||^2, and the batch loss it gives, loss(theta + delta) / loss(theta). Where the
  two ratios part, the residual is not linear over the step.

J is held whole (M x P doubles), built problem by problem in the LM chunks of the run.
"""
from __future__ import annotations

import numpy as np

BANDS = (1e-6, 1e-10, 1e-14)
STEP_SIZES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
DAMPINGS = (1e-6, 1e-8, 1e-10, 1e-12, 1e-14)


def flat_residuals(residual_fn, params):
    """theta (P,) and f(theta, batch) -> the flat residuals, of a (params, batch) -> (n, K) function."""
    from jax.flatten_util import ravel_pytree

    theta, unravel = ravel_pytree(params)
    return theta, lambda t, b: residual_fn(unravel(t), b).reshape(-1)


def _chunk(batch, index: int, n_chunks: int):
    import jax

    return jax.tree.map(lambda x: x[index::n_chunks], batch)


def jacobian(f, theta, batch, n_chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(r (M,), J (M, P)) as numpy arrays, one strided chunk of problems at a time (per problem VJPs)."""
    import jax

    from lsq_jax.optim.lm import chunk_jacobian

    fn = jax.jit(lambda c: chunk_jacobian(f, theta, c, True))
    parts = [fn(_chunk(batch, c, n_chunks)) for c in range(n_chunks)]
    return (np.concatenate([np.asarray(r) for r, _ in parts]),
            np.concatenate([np.asarray(Jt).T for _, Jt in parts]))


def spectrum_bands(singular_values: np.ndarray, bands=BANDS) -> dict:
    """J^T J's largest eigenvalue and the count of its eigenvalues above each band times the largest."""
    eig = np.sort(np.asarray(singular_values) ** 2)[::-1]
    return {"largest": float(eig[0]), "above": {f"{b:.0e}": int(np.sum(eig > b * eig[0])) for b in bands}}


def share_outside(r: np.ndarray, U: np.ndarray, keep: int) -> float:
    """||r - U_k U_k^T r||^2 / ||r||^2 over the first `keep` left singular vectors U_k."""
    inside = U[:, :keep].T @ r
    outside = r - U[:, :keep] @ inside
    return float(outside @ outside / (r @ r))


def range_shares(J: np.ndarray, r: np.ndarray, bands=BANDS, svd=None) -> dict:
    """The spectrum's bands, the numerical rank and the share of r outside range(J) at that rank and at
    each band (the directions whose squared singular value is above band times the largest). `svd`: J's
    thin SVD (U, s, Vt), if already computed."""
    U, s, _ = np.linalg.svd(J, full_matrices=False) if svd is None else svd
    rank = int(np.sum(s > s[0] * max(J.shape) * np.finfo(J.dtype).eps))
    kept = {f"{b:.0e}": int(np.sum(s ** 2 > b * s[0] ** 2)) for b in bands}
    return {"jtj": spectrum_bands(s, bands), "rank": rank, "residual_outside_range": share_outside(r, U, rank),
            "residual_outside_band": {name: share_outside(r, U, k) for name, k in kept.items()}}


def damped_step(svd, r: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """The exact LM step of J = U diag(s) Vt (`svd`, thin) at relative damping lam with isotropic D = mean
    diag(J^T J) / M: (J^T J + mu I) delta = -J^T r, mu = lam sum(s^2) / P; and the linear model's relative
    loss ||r + J delta||^2 / ||r||^2."""
    U, s, Vt = svd
    mu = damping * np.sum(s ** 2) / Vt.shape[1]
    inside = U.T @ r
    left = mu / (s ** 2 + mu) * inside  # U^T (r + J delta); the part outside range(U) is r's own
    return -Vt.T @ (s / (s ** 2 + mu) * inside), share_outside(r, U, s.size) + float(left @ left / (r @ r))


def lanczos(matvec, n: int, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values (ascending) and vectors (columns, unit norm) of the symmetric operator `matvec` on R^n
    after `steps` Lanczos steps with full reorthogonalisation (twice per step) from a random start; stops
    early at an invariant subspace."""
    q = np.random.default_rng(seed).standard_normal(n)
    Q = np.zeros((min(steps, n), n))
    alphas, betas = [], []
    for j in range(Q.shape[0]):
        Q[j] = q / np.linalg.norm(q)
        w = np.array(matvec(Q[j]), dtype=np.float64)
        alphas.append(Q[j] @ w)
        for _ in range(2):
            w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta = np.linalg.norm(w)
        if j + 1 == Q.shape[0] or beta <= np.finfo(np.float64).eps * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        q = w
    k = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    values, S = np.linalg.eigh(T)
    return values, Q[:k].T @ S


def hessian_vector_product(f, theta, batch):
    """v -> H v for H the Hessian of 0.5 ||f(theta, batch)||^2, jitted, never forming H."""
    import jax
    import jax.numpy as jnp

    grad = jax.grad(lambda t: 0.5 * jnp.sum(f(t, batch) ** 2))
    return jax.jit(lambda v: jax.jvp(grad, (theta,), (v,))[1])


def curvature(residual_fn, params, batch, n_chunks: int = 1, *, lanczos_steps: int = 4000, n_negative: int = 3,
              step_sizes=STEP_SIZES, bands=BANDS, dampings=DAMPINGS, seed: int = 0) -> dict:
    """The figures of the module docstring for `residual_fn(params, batch) -> (n, K)` residuals."""
    import jax
    import jax.numpy as jnp

    theta, f = flat_residuals(residual_fn, params)
    r, J = jacobian(f, theta, batch, n_chunks)
    svd = np.linalg.svd(J, full_matrices=False)
    out = {"params": int(theta.size), "residuals": int(r.size), "loss": float(r @ r / r.size),
           **range_shares(J, r, bands, svd)}
    del J
    hvp = hessian_vector_product(f, theta, batch)

    def matvec(v):
        return np.asarray(hvp(jnp.asarray(v, theta.dtype)))

    values, vectors = lanczos(matvec, theta.size, lanczos_steps, seed)
    lowest = range(min(n_negative, values.size))
    out["lanczos"] = {"steps": int(values.size), "largest": float(values[-1]),
                      "negative_ritz_values": int(np.sum(values < 0)),
                      "most_negative": [float(values[i]) for i in lowest],
                      "residual_norms": [float(np.linalg.norm(matvec(vectors[:, i]) - values[i] * vectors[:, i]))
                                         for i in lowest]}
    y = jnp.asarray(vectors[:, 0], theta.dtype)
    loss = jax.jit(lambda t: jnp.mean(f(t, batch) ** 2))
    base = float(loss(theta))
    out["along_most_negative"] = [{"step": a, "loss_ratio_plus": float(loss(theta + a * y)) / base,
                                   "loss_ratio_minus": float(loss(theta - a * y)) / base} for a in step_sizes]
    out["damped_steps"] = []
    for lam in dampings:
        delta, predicted = damped_step(svd, r, lam)
        out["damped_steps"].append({"damping": lam, "step_norm": float(np.linalg.norm(delta)),
                                    "predicted_loss_ratio": predicted,
                                    "loss_ratio": float(loss(theta + jnp.asarray(delta, theta.dtype))) / base})
    return out


def workdir_curvature(workdir: str, step: int | None = None, log=print, **kwargs) -> dict:
    """curvature() at a training workdir's checkpoint (`step`, or the newest good one), restored as
    --mode=eval restores it, on the batch LM fits at that iteration (lsq_jax.train.step.lm_keys)."""
    from lsq_jax import checkpoint, mesh
    from lsq_jax.models.backbone import abstract_params
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.step import lm_keys, lm_residual_fn
    from lsq_jax.workdir import resolve_workdir

    exp, step, params = checkpoint.restore_params(resolve_workdir(workdir), step, lambda e: abstract_params(e.model),
                                                  mesh.replicated(mesh.make_mesh()), log=log)
    mesh.setup_jax(exp.matmul_precision)
    plan = make_plan(exp, mesh.make_mesh())
    residuals = lm_residual_fn(plan, plan.full_size(lm=True))
    return {"config": exp.name, "seed": exp.seed, "step": step,
            **curvature(residuals, params, lm_keys(plan, step), plan.lm_chunks, **kwargs)}
