"""Samplers: shapes, dtypes, option order, kappa rescaling, per-example keys."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.data import samplers
from lsq_jax.data.samplers import (
    LeastSquaresSample,
    example_keys,
    gaussian,
    least_squares,
    scale_singular_values,
)


def _keys(count, step=0, start=0, seed=0):
    return example_keys(jax.random.key(seed), step, start, count)


@pytest.fixture(scope="module")
def ref(reference_dir):
    return dict(np.load(reference_dir / "tasks.npz"))


# -- shapes and dtypes ----------------------------------------------------------------------------------


def test_gaussian_shape_and_dtypes():
    x = gaussian(_keys(4), 7, 4)
    assert x.shape == (4, 7, 4) and x.dtype == jnp.float64
    x32 = gaussian(_keys(4), 7, 4, dtype=jnp.float32, normalize=True, scale=2.0, n_dims_truncated=2)
    assert x32.shape == (4, 7, 4) and x32.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_least_squares_shapes_and_dtypes(dtype):
    s = least_squares(_keys(4), 7, 4, scale_cond=5.0, normalize_x=True, n_dims_truncated=3, dtype=dtype)
    assert isinstance(s, LeastSquaresSample)
    assert s.a.shape == (4, 7, 4) and s.b.shape == (4, 7)
    assert s.x_star.shape == (4, 4) and s.x0.shape == (4, 4)
    assert all(v.dtype == dtype for v in s)


def test_least_squares_b_is_a_x_star():
    s = least_squares(_keys(4), 7, 4)
    a, x_star = np.asarray(s.a), np.asarray(s.x_star)
    b = np.array([[a[n, i] @ x_star[n] for i in range(7)] for n in range(4)])
    np.testing.assert_allclose(s.b, b, rtol=0, atol=1e-14)


def test_gaussian_statistics():
    # 4096 * 7 * 4 = 114688 draws: mean 0 to ~0.003 (1 sigma), variance 1 to ~0.004 (1 sigma).
    x = np.asarray(gaussian(_keys(4096), 7, 4)).ravel()
    assert abs(x.mean()) < 0.02 and abs(x.var() - 1) < 0.03


def test_least_squares_statistics_and_independence():
    s = least_squares(_keys(4096), 7, 4)
    for v in (s.a, s.x_star, s.x0):  # x*, x0: 16384 draws each, sigma 0.008 (mean), 0.011 (variance)
        v = np.asarray(v).ravel()
        assert abs(v.mean()) < 0.04 and abs(v.var() - 1) < 0.06
    # x* and x0 independent: per-coordinate correlation ~ N(0, 1/4096), sigma 0.016.
    xs, x0 = np.asarray(s.x_star), np.asarray(s.x0)
    corr = [np.corrcoef(xs[:, d], x0[:, d])[0, 1] for d in range(4)]
    assert max(abs(c) for c in corr) < 0.08
    # Distinct examples are distinct draws.
    assert not np.any(np.all(xs[1:] == xs[:-1], axis=-1))


# -- options ----------------------------------------------------------------------------------------------


def test_gaussian_normalize_scale_truncate_in_order():
    keys = _keys(4)
    x = np.asarray(gaussian(keys, 7, 4))
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    xn = np.asarray(gaussian(keys, 7, 4, normalize=True))
    np.testing.assert_allclose(np.linalg.norm(xn, axis=-1), 1, rtol=1e-15)
    np.testing.assert_allclose(xn, unit, rtol=1e-15)
    xs = np.asarray(gaussian(keys, 7, 4, normalize=True, scale=3.0))
    np.testing.assert_allclose(xs, 3 * unit, rtol=1e-15)
    # Truncation after normalising: rows are unit before the trailing coordinates are zeroed.
    xt = np.asarray(gaussian(keys, 7, 4, normalize=True, scale=3.0, n_dims_truncated=2))
    np.testing.assert_array_equal(xt[..., 2:], 0)
    np.testing.assert_allclose(xt[..., :2], 3 * unit[..., :2], rtol=1e-15)


def test_least_squares_normalize_and_scale_target():
    keys = _keys(4)
    s = least_squares(keys, 7, 4, normalize_a=True, normalize_x=True, scale_target=2.5)
    np.testing.assert_allclose(np.linalg.norm(s.a, axis=-1), 1, rtol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(s.x_star, axis=-1), 2.5, rtol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(s.x0, axis=-1), 2.5, rtol=1e-15)
    plain = least_squares(keys, 7, 4)
    unit = plain.x_star / np.linalg.norm(plain.x_star, axis=-1, keepdims=True)
    np.testing.assert_allclose(s.x_star, 2.5 * unit, rtol=1e-14)


def test_least_squares_truncation_zeroes_then_forms_b():
    keys = _keys(4)
    full = least_squares(keys, 7, 4, scale_cond=3.0)
    trunc = least_squares(keys, 7, 4, scale_cond=3.0, n_dims_truncated=3)
    # Same draws (and the same rescaled A: truncation comes after scale_cond), trailing coordinates zeroed.
    np.testing.assert_array_equal(trunc.a[..., 3:], 0)
    np.testing.assert_array_equal(trunc.x_star[..., 3:], 0)
    np.testing.assert_array_equal(trunc.x0[..., 3:], 0)
    np.testing.assert_array_equal(trunc.a[..., :3], full.a[..., :3])
    np.testing.assert_array_equal(trunc.x_star[..., :3], full.x_star[..., :3])
    np.testing.assert_array_equal(trunc.x0[..., :3], full.x0[..., :3])
    b = np.einsum("bld,bd->bl", np.asarray(full.a)[..., :3], np.asarray(full.x_star)[..., :3])
    np.testing.assert_allclose(trunc.b, b, rtol=0, atol=1e-14)


# -- kappa rescaling --------------------------------------------------------------------------------------


def _numpy_rescale(a, kappa):
    """Independent: numpy SVD per matrix, singular values mapped affinely onto [1, kappa]."""
    out = []
    for m in a:
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        s_new = 1 + (s - s[-1]) * (kappa - 1) / (s[0] - s[-1])
        out.append(u @ np.diag(s_new) @ vh)
    return np.stack(out)


def test_scale_singular_values_matches_reference(ref):
    a_in = jnp.asarray(ref["scale_cond/A_in"])
    got = np.asarray(scale_singular_values(a_in, 5.0))
    np.testing.assert_allclose(got, ref["scale_cond/A_kappa5"], rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.linalg.svd(got, compute_uv=False), ref["scale_cond/sv_kappa5"], rtol=0,
                               atol=1e-13)
    sv_in = np.linalg.svd(ref["scale_cond/A_in"], compute_uv=False)
    np.testing.assert_allclose(sv_in, ref["scale_cond/sv_in"], rtol=0, atol=1e-13)
    # The reference's kappa-5 sampler: its A is the rescaled ls_sample A.
    np.testing.assert_allclose(scale_singular_values(jnp.asarray(ref["ls_sample/A"]), 5),
                               ref["ls_sample_kappa5/A"], rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape,kappa", [((7, 4), 5.0), ((4, 7), 2.0), ((10, 3), 100.0), ((3, 3), 1.5)])
def test_scale_singular_values_spectrum(shape, kappa):
    a = np.random.default_rng(1).normal(size=(4, *shape))
    got = np.asarray(scale_singular_values(jnp.asarray(a), kappa))
    np.testing.assert_allclose(got, _numpy_rescale(a, kappa), rtol=0, atol=1e-12 * kappa)
    s = np.linalg.svd(got, compute_uv=False)
    assert np.all(s >= 1 - 1e-12) and np.all(s <= kappa * (1 + 1e-12))
    np.testing.assert_allclose(s[:, -1], 1, rtol=1e-12)
    np.testing.assert_allclose(s[:, 0], kappa, rtol=1e-12)
    # A single (L, D) matrix gives the same as a batch of one.
    np.testing.assert_allclose(scale_singular_values(jnp.asarray(a[0]), kappa), got[0], rtol=0, atol=1e-13)


def test_scale_singular_values_kappa_one_is_identity():
    a = gaussian(_keys(4), 7, 4)
    assert scale_singular_values(a, 1) is a


def test_least_squares_scale_cond_sampler():
    keys = _keys(4)
    plain = least_squares(keys, 7, 4)
    cond = least_squares(keys, 7, 4, scale_cond=5.0)
    s = np.linalg.svd(np.asarray(cond.a), compute_uv=False)
    assert np.all(s >= 1 - 1e-12) and np.all(s <= 5 * (1 + 1e-12))
    np.testing.assert_allclose(cond.a, _numpy_rescale(np.asarray(plain.a), 5.0), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(cond.x_star, plain.x_star)
    np.testing.assert_array_equal(cond.x0, plain.x0)
    np.testing.assert_allclose(cond.b, np.einsum("bld,bd->bl", cond.a, cond.x_star), rtol=0, atol=1e-13)
    s32 = least_squares(keys, 7, 4, scale_cond=5.0, dtype=jnp.float32)
    sv32 = np.linalg.svd(np.asarray(s32.a, np.float64), compute_uv=False)
    assert np.all(sv32 >= 1 - 1e-5) and np.all(sv32 <= 5 * (1 + 1e-5))


# -- per-example keys ----------------------------------------------------------------------------------


def test_example_keys_formula():
    key = jax.random.key(7)
    got = example_keys(key, 12, 3, 4)
    want = [jax.random.fold_in(jax.random.fold_in(key, 12), i) for i in range(3, 7)]
    want = np.stack([jax.random.key_data(k) for k in want])
    np.testing.assert_array_equal(jax.random.key_data(got), want)
    raw = example_keys(jax.random.PRNGKey(7), 12, 3, 4)
    assert raw.shape == (4, 2)
    np.testing.assert_array_equal(raw, jax.random.key_data(got))


def test_example_keys_traced_step_and_start():
    key = jax.random.key(3)
    got = jax.jit(example_keys, static_argnums=3)(key, jnp.asarray(5), jnp.asarray(2), 3)
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(example_keys(key, 5, 2, 3)))


@pytest.mark.parametrize("draw,whole_count", [
    (lambda k: gaussian(k, 7, 4, normalize=True), 4096),  # the batch size of the statistics test
    (lambda k: least_squares(k, 7, 4, normalize_a=True, scale_cond=4.0, normalize_x=True, n_dims_truncated=2),
     4096),
])
def test_shards_equal_the_whole_batch(draw, whole_count):
    """Examples [0, 8) of a batch drawn at once equal [0, 4) and [4, 8) drawn separately, bitwise.

    A large batch: XLA may compile reductions differently for it (the samplers sum in a fixed order).
    """
    key = jax.random.key(11)
    whole = draw(example_keys(key, 9, 0, whole_count))
    first = draw(example_keys(key, 9, 0, 4))
    second = draw(example_keys(key, 9, 4, 4))
    for w, f, s in zip(jax.tree.leaves(whole), jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(w[:8], np.concatenate([f, s]))


def test_steps_give_different_data():
    key = jax.random.key(0)
    step0 = gaussian(example_keys(key, 0, 0, 4), 7, 4)
    step1 = gaussian(example_keys(key, 1, 0, 4), 7, 4)
    assert not np.any(np.asarray(step0) == np.asarray(step1))


# -- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_points=0), "n_points"),
    (dict(n_dims=-1), "n_dims"),
    (dict(n_points=2.0), "n_points"),
    (dict(scale=0.0), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(normalize=1), "normalize"),
    (dict(n_dims_truncated=0), "n_dims_truncated"),
    (dict(n_dims_truncated=5), "n_dims_truncated"),
    (dict(dtype=jnp.int32), "dtype"),
])
def test_gaussian_rejects(kwargs, field):
    args = dict(n_points=3, n_dims=4) | kwargs
    with pytest.raises(ValueError, match=field):
        gaussian(_keys(2), **args)


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_points=0), "n_points"),
    (dict(n_dims=0), "n_dims"),
    (dict(scale_cond=0.5), "scale_cond"),
    (dict(scale_cond=2.0, n_dims=1), "scale_cond"),
    (dict(scale_target=-1.0), "scale_target"),
    (dict(normalize_a="yes"), "normalize_a"),
    (dict(normalize_x=None), "normalize_x"),
    (dict(n_dims_truncated=7), "n_dims_truncated"),
])
def test_least_squares_rejects(kwargs, field):
    args = dict(n_points=3, n_dims=4) | kwargs
    with pytest.raises(ValueError, match=field):
        least_squares(_keys(2), **args)


def test_other_rejections():
    with pytest.raises(ValueError, match="keys"):
        gaussian(jax.random.key(0), 3, 2)  # one key, not a batch
    with pytest.raises(ValueError, match="count"):
        example_keys(jax.random.key(0), 0, 0, 0)
    with pytest.raises(ValueError, match="kappa"):
        scale_singular_values(jnp.ones((3, 2)), 0.9)
    with pytest.raises(ValueError, match="min"):
        scale_singular_values(jnp.ones((3, 1)), 2.0)
    assert samplers.__all__  # the module's public names are declared


@pytest.mark.parametrize("spectrum,kappa", [((3.0, 3.0, 1.0), 10.0), ((2.0, 0.5, 0.5), 4.0),
                                            ((50.0, 1.0, 0.02), 100.0), ((4.0, 2.0, 1.0, 0.25), 1e4)])
def test_scale_singular_values_of_a_known_spectrum(spectrum, kappa):
    """A = U diag(s) V^T built from orthogonal factors: the rescaled matrix is U diag(s') V^T in closed
    form, repeated singular values included (no SVD on the test's side). A's own rounding moves its
    singular vectors by about eps kappa(A), hence the tolerance."""
    rng = np.random.default_rng(3)
    s = np.asarray(spectrum)
    u = np.linalg.qr(rng.normal(size=(7, s.size)))[0]
    v = np.linalg.qr(rng.normal(size=(s.size, s.size)))[0]
    s_new = 1 + (s - s.min()) * (kappa - 1) / (s.max() - s.min())
    for a, want in [(u * s @ v.T, u * s_new @ v.T), (v * s @ u.T, v * s_new @ u.T)]:  # tall and wide
        got = np.asarray(scale_singular_values(jnp.asarray(a), kappa))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14 * kappa * s.max() / s.min())


def test_rescaled_draws_call_no_lapack():
    """The sampler's program holds no LAPACK call: a batched one runs on the thread pool it is called
    from, and two at once in one training step have waited on each other for good on 2 cores."""
    draw = jax.jit(lambda keys: least_squares(keys, 12, 3, scale_cond=1.0, scale_cond_max=100.0))
    targets = lambda hlo: re.findall(r'custom_call_target="([^"]+)"', hlo)
    assert targets(draw.lower(_keys(8)).compile().as_text()) == []
    assert targets(jax.jit(jnp.linalg.svd).lower(jnp.ones((2, 3, 3))).compile().as_text()) == ["lapack_dgesdd_ffi"]
