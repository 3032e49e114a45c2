"""The memory check's figures for LM iterations (Cholesky, row-sharded, matrix-free CG) against what XLA's
compiler allocates."""
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.mesh import make_mesh
from lsq_jax.optim import lm
from lsq_jax.plan.memory import lm_cholesky_bytes, lm_sharded_bytes
from lsq_jax.plan.run import make_plan
from lsq_jax.train.state import init_state
from lsq_jax.train.step import make_step_fns

from config_files import get_config
from xla_env import run_on_devices


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


SHARDED = textwrap.dedent("""
    import json, sys, jax
    jax.config.update("jax_enable_x64", True)
    from lsq_jax.optim import lm
    from test_lm_memory import mlp_problem
    mesh = jax.make_mesh((2,), ("data",))
    place = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
    out = []
    for width, n, n_chunks in json.loads(sys.argv[1]):
        residuals, params, batch = mlp_problem(width, n)
        state = lm.init_lm_state(4 * width + width**2 + 3 * width)
        step = jax.shard_map(lambda p, b: lm.lm_iteration_sharded(residuals, p, b, state, n_chunks, geodesic=True,
                                                                   max_tries=10, axis_name="data")[0],
                             mesh=mesh, in_specs=(jax.P(), jax.P("data")), out_specs=jax.P(), check_vma=False)
        compiled = jax.jit(step).lower(place(params, jax.P()), place(batch, jax.P("data"))).compile()
        out.append(compiled.memory_analysis().temp_size_in_bytes)
    print(json.dumps(out))
""")
SHARDED_SIZES = [(20, 400, 4), (60, 400, 4), (40, 1200, 1)]  # P = 540, 4,020 (row-block-bound), 1,880 (chunk-bound)


@pytest.mark.slow
def test_sharded_estimate_is_within_10_percent_of_the_compiler_per_device():
    """On 2 devices, per device."""
    stdout = run_on_devices(SHARDED, json.dumps(SHARDED_SIZES), 2)
    for (width, n, n_chunks), compiled in zip(SHARDED_SIZES, json.loads(stdout.splitlines()[-1]), strict=True):
        estimate = lm_sharded_bytes(4 * width + width**2 + 3 * width, n // 2 // n_chunks * 3, 8, 2)
        assert abs(estimate / compiled - 1) < 0.1, (width, n, n_chunks, estimate, compiled)


@pytest.mark.parametrize("n_dims, n_embd, n_layer, microbatch", [(2, 8, 2, 32), (2, 8, 2, 8), (3, 16, 3, 32)])
def test_cg_estimate_is_within_10_percent_of_the_compiler(n_dims, n_embd, n_layer, microbatch):
    """The matrix-free LM step of a BaseConv model (batch 256 in chunks of `microbatch` problems): the
    plan's figure against the compiled step's temp bytes."""
    config = get_config("baseconv", "lm")
    config.update_from_flattened_dict({"task.n_dims": n_dims, "model.n_embd": n_embd, "model.n_layer": n_layer,
                                       "task.n_points": 6, "train.batch_size": 256, "train.eval_batch_size": 64,
                                       "train.microbatch_size": microbatch, "optim.lm_solver": "cg"})
    plan = make_plan(experiment_from_config(config), make_mesh(1))
    fns = make_step_fns(plan, plan.full_size(lm=True))
    state = jax.eval_shape(lambda: init_state(plan))
    compiled = fns.train.lower(state, fns.no_metric).compile().memory_analysis().temp_size_in_bytes
    assert abs(plan.memory["lm_normal_equations"] / compiled - 1) < 0.1, (plan.memory, compiled)
