"""lsq_jax.eval.stats against its definitions written out in numpy, per problem."""
import jax.numpy as jnp
import numpy as np

from lsq_jax.eval.stats import trajectory_statistics

from eval_numpy import numpy_statistics


def test_trajectory_statistics_against_numpy():
    t = np.arange(201)[:, None]
    rates = np.array([0.5, 0.8, 0.9, 0.95, 0.999, 1.05, 0.7, 1.0])
    e = np.maximum(rates ** t, np.array([1e-16, 1e-12, 1e-15, 1e-9, 1e-16, 0, 1e-16, 0])[None])
    e[:, 6] *= 1 + 0.3 * np.sin(t[:, 0])  # a noisy floor
    e[150:, 5] = np.nan  # diverged: inf - inf
    e[:, 7] = 3e-16  # constant (lstsq): no window
    got = trajectory_statistics(jnp.asarray(e))
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
