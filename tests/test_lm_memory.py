"""The memory check's figure for a Cholesky LM iteration against what XLA's compiler allocates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.optim import lm
from lsq_jax.plan.memory import lm_cholesky_bytes


def mlp_problem(width: int, n: int, d: int = 4, k: int = 3):
    """A two-hidden-layer tanh network's residuals on n problems of k outputs: P = d w + w^2 + w k."""
    key = jax.random.key(0)
    params = {"w1": jax.random.normal(key, (d, width)), "w2": jax.random.normal(key, (width, width)),
              "w3": jax.random.normal(key, (width, k))}
    batch = (jax.random.normal(key, (n, d)), jax.random.normal(key, (n, k)))

    def residuals(p, b):
        x, y = b
        return jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["w3"] - y

    return residuals, params, batch


@pytest.mark.parametrize("width, n, n_chunks", [(20, 400, 1), (40, 400, 8), (40, 1200, 1)])
def test_cholesky_estimate_is_within_10_percent_of_the_compiler(width, n, n_chunks):
    """Chunk-bound (P = 540, 1,200 rows; P = 1,880, 3,600 rows) and solve-bound (P = 1,880, 150 rows)."""
    residuals, params, batch = mlp_problem(width, n)
    n_params = 4 * width + width**2 + 3 * width
    state = lm.init_lm_state(n_params)
    iterate = jax.jit(lambda p, b, s: lm.lm_iteration(residuals, p, b, s, n_chunks, geodesic=True, max_tries=10))
    compiled = iterate.lower(params, batch, state).compile().memory_analysis().temp_size_in_bytes
    estimate = lm_cholesky_bytes(n_params, n // n_chunks * 3, 8)
    assert abs(estimate / compiled - 1) < 0.1, (estimate, compiled)


@pytest.mark.parametrize("rows", [1, 512, 513, 1880, 4020])
def test_gram_depth_is_the_depth_of_lower_grams_tree(rows):
    tree = jax.eval_shape(lm.lower_gram, jax.ShapeDtypeStruct((rows, 2), np.float64))
    depth = lambda t: 1 + max(depth(t[0]), depth(t[2])) if isinstance(t, tuple) else 0
    assert lm.gram_depth(rows) == depth(tree)
