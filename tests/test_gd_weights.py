"""The hand-built GD models (lsq_jax.models.gd_weights) against numpy gradient descent, in float64."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.config.model import ModelConfig
from lsq_jax.models import gd_weights
from lsq_jax.models.backbone import SequenceModel, init_params

# ----------------------------------------------------------------------------------------------------------
# Independent numpy computations


def numpy_gd(a_BxLxD, b_BxL, w0_BxD, eta, n_steps):
    """Iterates (n_steps + 1, B, D) of w <- w - eta / L * A^T (A w - b)."""
    n = a_BxLxD.shape[1]
    ws = [w0_BxD]
    for _ in range(n_steps):
        w = ws[-1]
        resid = np.einsum("bld,bd->bl", a_BxLxD, w) - b_BxL
        ws.append(w - eta / n * np.einsum("bld,bl->bd", a_BxLxD, resid))
    return np.stack(ws)


def gaussian_problems(rng, bsz, n, d):
    """A ~ N(0, I) (B, L, D), x* and w0 ~ N(0, I) (B, D), b = A x*."""
    a = rng.standard_normal((bsz, n, d))
    x_star = rng.standard_normal((bsz, d))
    w0 = rng.standard_normal((bsz, d))
    return a, np.einsum("bld,bd->bl", a, x_star), w0, x_star


def conditioned_problems(rng, bsz, n, d, kappa):
    """As `gaussian_problems`, with A's singular values mapped affinely onto [1, kappa]."""
    a, _, w0, x_star = gaussian_problems(rng, bsz, n, d)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    lo, hi = s.min(-1, keepdims=True), s.max(-1, keepdims=True)
    s = 1 + (kappa - 1) * (s - lo) / (hi - lo)
    a = np.einsum("bld,bd,bde->ble", u, s, vt)
    return a, np.einsum("bld,bd->bl", a, x_star), w0, x_star


def lambda_max(a_BxLxD):
    """Largest eigenvalue of A^T A / L per problem."""
    return np.linalg.eigvalsh(np.einsum("bld,ble->bde", a_BxLxD, a_BxLxD) / a_BxLxD.shape[1])[:, -1]


# ----------------------------------------------------------------------------------------------------------
# The constructions under test: name -> (config, params, GD steps per pass)


def build(kind, d, n, eta, dtype="float64"):
    if kind == "baseconv":
        cfg = gd_weights.baseconv_gd_config(d, n, dtype=dtype)
        return cfg, gd_weights.baseconv_gd_params(cfg, d, n, eta), 1
    # kind: 'linattn<n_layer>[-causal][-wide]'
    n_steps = int(kind[len("linattn")])
    options = dict(causal="causal" in kind, dtype=dtype)
    if "wide" in kind:  # spare channels and a second head
        options.update(width=2 * d + 4, n_head=2)
    cfg = gd_weights.linear_attention_gd_config(d, n, n_steps, **options)
    return cfg, gd_weights.linear_attention_gd_params(cfg, d, n, eta), n_steps


def apply_fn(cfg):
    model = SequenceModel(cfg)
    return lambda params, tokens: model.apply({"params": params}, tokens)


def param_shapes(cfg):
    """init_params(cfg, key) as ShapeDtypeStructs (traced, not run: the structure is what matters)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def jitted_hidden(cfg):
    """(params, tokens) -> the residual stream after each block, (n_layer, B, T, E)."""
    model = SequenceModel(cfg)

    def run(params, tokens):
        _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
        return jnp.stack(state["intermediates"]["hidden"][1:])

    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def jitted_iterate(cfg, n_iters):
    """(params, a, b, w0) -> iterates (n_iters + 1, B, D); one compilation per config and shape."""

    def run(params, a, b, w0):
        step = gd_weights.make_token_step(apply_fn(cfg), params, a, b, cfg.in_dims)
        return gd_weights.iterate(step, w0, n_iters)

    return jax.jit(run)


# ----------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["baseconv", "linattn1", "linattn3", "linattn2-wide"])
def test_params_have_the_structure_shapes_and_dtypes_of_init_params(kind, dtype):
    cfg, params, _ = build(kind, 3, 7, 0.5, dtype)
    fresh = param_shapes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(fresh)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(fresh)):
        assert got.shape == want.shape
        assert got.dtype == want.dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("d", [1, 3, 5, 8])
@pytest.mark.slow
def test_one_pass_is_exact_gd(d):
    """BaseConv: 3 layers = 1 step. Linear attention: the stream after layer k holds k steps (3 layers;
    and 2 layers, causal, with a spare head and spare channels, on one length)."""
    rng = np.random.default_rng(d)
    eta = 0.37
    for n in (d, 2 * d + 3, 40):
        a, b, w, _ = gaussian_problems(rng, 16, n, d)
        want = numpy_gd(a, b, w, eta, 3)
        kinds = ("baseconv", "linattn3") + (("linattn2-causal-wide",) if n == 2 * d + 3 else ())
        for kind in kinds:
            cfg, params, steps = build(kind, d, n, eta)
            hidden = jitted_hidden(cfg)(params, gd_weights.gd_tokens(a, b, w, cfg.in_dims))
            # BaseConv's inner layers hold scratch, not iterates: only its output is a step
            layer_of_step = {1: 2} if kind == "baseconv" else {k: k - 1 for k in range(1, steps + 1)}
            for k, layer in layer_of_step.items():
                got = np.asarray(gd_weights.read_iterate(hidden[layer], d))
                rel = np.linalg.norm(got - want[k], axis=-1) / np.linalg.norm(want[k], axis=-1)
                assert rel.max() <= 1e-13, (kind, d, n, k, rel.max())


def test_baseconv_pass_keeps_a_b_and_clears_scratch():
    d, n = 4, 9
    a, b, w, _ = gaussian_problems(np.random.default_rng(1), 5, n, d)
    cfg, params, _ = build("baseconv", d, n, 0.5)
    out = np.asarray(jitted_hidden(cfg)(params, gd_weights.gd_tokens(a, b, w, cfg.in_dims))[-1])
    np.testing.assert_array_equal(out[..., :d], a)
    np.testing.assert_array_equal(out[..., d], b)
    np.testing.assert_array_equal(out[..., 2 * d + 1:], 0)


@pytest.mark.parametrize("kind", ["baseconv", "linattn1"])
@pytest.mark.slow
def test_fed_back_1000_times_is_gd_and_converges(kind):
    n_iters = 1000
    rng = np.random.default_rng(7)
    for d in (3, 5, 8):
        for n in (2 * d + 3, 40):
            for kappa in (2.0, 5.0):
                a, b, w0, x_star = conditioned_problems(rng, 8, n, d, kappa)
                eta = n / kappa ** 2  # eta lambda_i(A^T A / L) in [1 / kappa^2, 1]: contraction 1 - 1/kappa^2
                cfg, params, _ = build(kind, d, n, eta)
                got = np.asarray(jitted_iterate(cfg, n_iters)(params, a, b, w0))
                want = numpy_gd(a, b, w0, eta, n_iters)
                err0 = np.linalg.norm(w0 - x_star, axis=-1)
                gap = np.linalg.norm(got - want, axis=-1).max(axis=0) / err0
                assert gap.max() <= 1e-12, (d, n, kappa, gap.max())
                mse = np.mean((got[-1] - x_star) ** 2, axis=-1)
                assert mse.max() <= 1e-26, (d, n, kappa, mse.max())


@pytest.mark.parametrize("kind", ["baseconv", "linattn1"])
def test_fed_back_gaussian_problems_follow_gd_even_when_it_diverges(kind):
    eta, n_iters = 0.5, 100
    rng = np.random.default_rng(11)
    diverging = 0
    for d, n in ((2, 2), (4, 4), (8, 8), (8, 40)):
        a, b, w0, _ = gaussian_problems(rng, 64, n, d)
        cfg, params, _ = build(kind, d, n, eta)
        got = np.asarray(jitted_iterate(cfg, n_iters)(params, a, b, w0))
        want = numpy_gd(a, b, w0, eta, n_iters)
        rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
        assert rel.max() <= 1e-12, (d, n, rel.max())
        # The premise: GD itself blows up (by |1 - eta lambda_max| per step), and the construction with it.
        unstable = eta * lambda_max(a) > 2.2
        assert np.all(np.linalg.norm(want[-1][unstable], axis=-1) > 1e6)
        diverging += unstable.sum()
    assert diverging >= 5


def test_hand_set_baseconv_multiplies_elementwise():
    """One BaseConv layer, delta filter: in_proj copies x[:D/2], projection x[D/2:], out_proj identity."""
    d, n = 6, 10
    half = d // 2
    cfg = ModelConfig(in_dims=d, out_dims=d, n_positions=n, n_embd=d, n_layer=1, mixer="baseconv",
                      conv_type="short", causal=True, use_resid=False, train_proj=False, train_pos=False)
    eye = np.eye(d)
    copy_first, copy_second = np.zeros((d, d)), np.zeros((d, d))
    copy_first[:half, :half] = np.eye(half)
    copy_second[half:, :half] = np.eye(half)
    delta = np.zeros((d, n))
    delta[:, 0] = 1
    zeros = np.zeros(d)
    params = {"h_0": {"mixer": {"in_proj": {"kernel": copy_first, "bias": zeros},
                                "projection": {"kernel": copy_second, "bias": zeros},
                                "conv": {"filter": delta, "bias": zeros},
                                "out_proj": {"kernel": eye, "bias": zeros}}}}
    params = jax.tree.map(jnp.asarray, params)
    assert jax.tree.structure(params) == jax.tree.structure(param_shapes(cfg))

    x = np.random.default_rng(3).standard_normal((32, n, d))
    y = np.asarray(jax.jit(apply_fn(cfg))(params, x))[..., :half]
    assert np.mean((y - x[..., :half] * x[..., half:]) ** 2) <= 1e-28


def test_gd_tokens_layout_and_read_iterate():
    a, b, w, _ = gaussian_problems(np.random.default_rng(5), 2, 4, 3)
    tokens = np.asarray(gd_weights.gd_tokens(a, b, w, 10))
    assert tokens.shape == (2, 4, 10)
    np.testing.assert_array_equal(tokens[..., :3], a)
    np.testing.assert_array_equal(tokens[..., 3], b)
    np.testing.assert_array_equal(tokens[..., 4:7], np.broadcast_to(w[:, None], (2, 4, 3)))
    np.testing.assert_array_equal(tokens[..., 7:], 0)
    np.testing.assert_array_equal(gd_weights.read_iterate(tokens, 3), w)


def test_iterate_is_a_scan_of_the_step():
    w0 = jnp.arange(6.0).reshape(2, 3)
    ws = jax.jit(gd_weights.iterate, static_argnums=(0, 2))(lambda w: 2 * w + 1, w0, 3)
    want = [np.asarray(w0)]
    for _ in range(3):
        want.append(2 * want[-1] + 1)
    np.testing.assert_array_equal(ws, np.stack(want))
    np.testing.assert_array_equal(gd_weights.iterate(lambda w: w, w0, 0), np.asarray(w0)[None])


_BC = gd_weights.baseconv_gd_config(3, 8)
_LA = gd_weights.linear_attention_gd_config(3, 8)


@pytest.mark.parametrize("make, field", [
    (lambda: gd_weights.baseconv_gd_params(_BC.replace(n_layer=2), 3, 8, 0.5), "n_layer"),
    (lambda: gd_weights.baseconv_gd_params(_BC.replace(n_embd=12, in_dims=12, out_dims=12), 3, 8, 0.5),
     "n_embd"),
    (lambda: gd_weights.baseconv_gd_params(_BC.replace(in_dims=3), 3, 8, 0.5), "in_dims"),
    (lambda: gd_weights.baseconv_gd_params(_BC.replace(causal=False), 3, 8, 0.5), "causal"),
    (lambda: gd_weights.baseconv_gd_params(_BC.replace(use_resid=True), 3, 8, 0.5), "use_resid"),
    (lambda: gd_weights.baseconv_gd_params(_BC.replace(conv_type="long"), 3, 8, 0.5), "conv_type"),
    (lambda: gd_weights.baseconv_gd_params(_BC.replace(use_mlps=True), 3, 8, 0.5), "use_mlps"),
    (lambda: gd_weights.baseconv_gd_params(_BC.replace(train_proj=True), 3, 8, 0.5), "train_proj"),
    (lambda: gd_weights.baseconv_gd_params(_BC, 3, 9, 0.5), "n_positions"),
    (lambda: gd_weights.baseconv_gd_params(_BC, 3, 8, float("nan")), "eta"),
    (lambda: gd_weights.baseconv_gd_params(_LA, 3, 8, 0.5), "mixer"),
    (lambda: gd_weights.baseconv_gd_config(0, 8), "n_dims"),
    (lambda: gd_weights.baseconv_gd_config(3, 8, n_positions=5), "n_positions"),
    (lambda: gd_weights.linear_attention_gd_config(3, 8, width=6), "width"),
    (lambda: gd_weights.linear_attention_gd_config(3, 8, width=8, n_head=4), "n_head"),
    (lambda: gd_weights.linear_attention_gd_params(_LA.replace(n_embd=6, in_dims=6, out_dims=6), 3, 8, 0.5),
     "n_embd"),
    (lambda: gd_weights.linear_attention_gd_params(_LA.replace(n_embd=8, in_dims=8, out_dims=8, n_head=4),
                                                  3, 8, 0.5), "n_head"),
    (lambda: gd_weights.linear_attention_gd_params(_LA.replace(use_bias=False), 3, 8, 0.5), "use_bias"),
    (lambda: gd_weights.linear_attention_gd_params(_LA.replace(use_resid=False), 3, 8, 0.5), "use_resid"),
    (lambda: gd_weights.linear_attention_gd_params(_LA.replace(use_seqop_ln=True), 3, 8, 0.5), "use_seqop_ln"),
    (lambda: gd_weights.linear_attention_gd_params(_LA, 3, 0, 0.5), "n_points"),
    (lambda: gd_weights.linear_attention_gd_params(_BC, 3, 8, 0.5), "mixer"),
    (lambda: gd_weights.linear_attention_gd_config(3, 8, n_iters=0), "n_iters"),
    (lambda: gd_weights.gd_tokens(np.zeros((2, 4, 3)), np.zeros((2, 4)), np.zeros((2, 3)), 6), "width"),
    (lambda: gd_weights.gd_tokens(np.zeros((2, 4, 3)), np.zeros((2, 5)), np.zeros((2, 3)), 7), "b_BxL"),
    (lambda: gd_weights.iterate(lambda w: w, jnp.zeros((2, 3)), -1), "n_iters"),
])
def test_bad_input_raises_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()
