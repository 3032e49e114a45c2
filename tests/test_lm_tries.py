"""The Cholesky path's retries with their factorisations spread over the devices
(lsq_jax.optim.lm._tries_over_devices): the same solves, acceptances and state as the sequential tries on one
device, on 2 and 4 emulated devices (one subprocess), in rounds that end early, run out of tries, or span
several rounds."""
import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lsq_jax.optim import lm
from test_lm_sharded import mlp_residual, problem
from xla_env import run_on_devices

# (max_tries, alpha, damping0): alpha bounds the geodesic acceleration relative to the step, and a small
# alpha rejects the small-damping steps whose acceleration is large, so the damping must grow over
# several rejected tries before one is accepted.
CASES = {"first try": (10, 0.75, 0.3), "several rounds": (10, 2e-3, 1e-6), "out of tries": (3, 2e-3, 1e-6),
         "without geodesic": (10, None, 1e-6)}


def tries_on(case, n_devices):
    """(step, damping, nu, iteration, accepted, rejected, tries) of one Cholesky iteration of `case` on the
    first `n_devices` devices (0: no shard_map)."""
    max_tries, alpha, damping0 = CASES[case]
    params, batch = problem()
    state = lm.init_lm_state(ravel_pytree(params)[0].size, damping0=damping0)
    iterate = functools.partial(lm.lm_iteration, mlp_residual, max_tries=max_tries, geodesic=alpha is not None,
                                alpha=alpha or 0.75)

    def outcome(p, b, axis_name=None):
        step, s, metrics = iterate(p, b, state, 2, axis_name=axis_name)
        return step, s.damping, s.nu, s.iteration, s.accepted, s.rejected, metrics["tries"]

    if not n_devices:
        return [np.asarray(x) for x in jax.jit(outcome)(params, batch)]
    mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
    run = jax.shard_map(functools.partial(outcome, axis_name="data"), mesh=mesh,
                        in_specs=(jax.P(), jax.P("data")), out_specs=jax.P(), check_vma=False)
    place = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
    return [np.asarray(x) for x in jax.jit(run)(place(params, jax.P()), place(batch, jax.P("data")))]


ON_DEVICES = textwrap.dedent("""
    import sys, numpy as np, jax
    jax.config.update("jax_enable_x64", True)
    from test_lm_tries import CASES, tries_on
    out = {f"{case}|{n}|{i}": x for case in CASES for n in (2, 4) for i, x in enumerate(tries_on(case, n))}
    np.savez(sys.argv[1], **out)
""")


def test_rejected_dampings_are_nielsens_closed_form():
    # Nielsen: a rejection multiplies lam by nu and doubles nu, so from (lam, nu) the j-th is
    # lam nu^j 2^(j (j - 1) / 2)
    state = lm.init_lm_state(3, damping0=1e-6)._replace(nu=jnp.asarray(4.0))
    j = np.arange(5)
    np.testing.assert_allclose(lm.rejected_dampings(state, 5, "nielsen", 1e-15, 1e15),
                               1e-6 * 4.0 ** j * 2.0 ** (j * (j - 1) / 2), rtol=1e-15)
    np.testing.assert_allclose(lm.rejected_dampings(state, 4, "delayed", 1e-15, 1e15), 1e-6 * 2.0 ** np.arange(4),
                               rtol=1e-15)
    assert float(lm.rejected_dampings(state, 5, "nielsen", 1e-15, 1e-3)[-1]) == 1e-3  # clamped


@pytest.mark.slow
def test_tries_spread_over_2_and_4_devices_are_the_sequential_tries(tmp_path):
    one = {case: tries_on(case, 0) for case in CASES}
    tries = {case: int(one[case][-1]) for case in CASES}
    accepted = {case: int(one[case][4]) for case in CASES}
    # the cases cover what they say: one try; more tries than 4 devices, the last accepted; all 3 rejected
    assert tries["first try"] == 1 and accepted["first try"] == 1
    assert tries["several rounds"] > 4 and accepted["several rounds"] == 1
    assert tries["out of tries"] == 3 and accepted["out of tries"] == 0
    out = tmp_path / "tries.npz"
    run_on_devices(ON_DEVICES, out, 4)
    z = np.load(out)
    for case in CASES:
        for n in (2, 4):
            step, *counts = (z[f"{case}|{n}|{i}"] for i in range(7))
            assert np.linalg.norm(step - one[case][0]) <= 1e-11 * np.linalg.norm(one[case][0]), (case, n)
            np.testing.assert_allclose(counts[:2], one[case][1:3], rtol=1e-15, err_msg=f"{case}, {n}")
            assert [int(c) for c in counts[2:]] == [int(c) for c in one[case][3:]], (case, n)
