"""Models against the PyTorch reference's own outputs, and against direct numpy formulas."""
import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.config.model import ModelConfig
from lsq_jax.models import attention, baseconv, dense
from lsq_jax.models.backbone import SequenceModel, init_params

from convert import config_from_reference, params_from_reference, short_filter_from_reference, short_filter_to_reference

REFERENCE_CASES = sorted(os.path.basename(f)[:-4] for f in glob.glob(
    os.path.join(os.path.dirname(__file__), "reference", "model_*.npz")))


def _load_case(reference_dir, case):
    z = np.load(reference_dir / f"{case}.npz")
    cfg = config_from_reference(json.loads(str(z["config"]))["constructor_args"])
    params = params_from_reference({k: z[k] for k in z.files if k.startswith("_")}, cfg)
    return z, cfg, params


def test_all_reference_cases_present():
    assert len(REFERENCE_CASES) == 12


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reproduces_reference_outputs(reference_dir, case):
    z, cfg, params = _load_case(reference_dir, case)
    model = SequenceModel(cfg)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        init_params(cfg, jax.random.key(0)))
    out, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(params, z["xs"])
    np.testing.assert_allclose(out, z["out"], rtol=0, atol=1e-12)
    hidden = np.stack(state["intermediates"]["hidden"])[:, 0]
    np.testing.assert_allclose(hidden, z["hidden"], rtol=0, atol=1e-12)
    out_short = model.apply({"params": params}, z["xs_short"])
    np.testing.assert_allclose(out_short, z["out_short"], rtol=0, atol=1e-12)


def test_implicit_filters_match_reference(reference_dir):
    z, cfg, params = _load_case(reference_dir, "model_c_baseconv_implicit_causal")
    for n, name in ((21, "implicit_filter_{}"), (16, "implicit_filter_short_{}")):
        _, state = SequenceModel(cfg).apply({"params": params}, z["xs"][:, :n], mutable=["intermediates"])
        for layer in range(cfg.n_layer):
            (filt,) = state["intermediates"][f"h_{layer}"]["mixer"]["conv"]["filter"]
            np.testing.assert_allclose(filt, z[name.format(layer)], rtol=0, atol=1e-13)
    table = z["_backbone.transformer.h.0.seq_mixer.base_conv.conv.pos_emb.z"][0]
    np.testing.assert_allclose(baseconv.implicit_features(21), table, rtol=0, atol=1e-15)


# --- convolutions against direct sums -------------------------------------------------------------------

def _direct_reference_conv1d(v_TxE, weight_Ex1xK, bias_E, causal):
    """The reference's Conv1d, written out: a cross-correlation with K-1 (causal) or K//2 left padding."""
    n, e = v_TxE.shape
    k = weight_Ex1xK.shape[-1]
    pad = k - 1 if causal else k // 2
    out = np.tile(bias_E, (n, 1)).astype(float)
    for t in range(n):
        for j in range(k):
            s = t + j - pad
            if 0 <= s < n:
                out[t] += weight_Ex1xK[:, 0, j] * v_TxE[s]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k,n", [(21, 21), (21, 16), (8, 8), (7, 5)])
def test_short_conv_matches_conv1d(causal, k, n):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, n, 3))
    weight = rng.normal(size=(3, 1, k))
    bias = rng.normal(size=3)
    filt = short_filter_from_reference(weight)
    np.testing.assert_array_equal(short_filter_to_reference(filt), weight)
    out = baseconv.short_conv(jnp.asarray(v), filt, jnp.asarray(bias), causal)
    for b in range(2):
        np.testing.assert_allclose(out[b], _direct_reference_conv1d(v[b], weight, bias, causal), atol=1e-13)


@pytest.mark.parametrize("method", ["fft", "toeplitz", "auto"])
@pytest.mark.parametrize("causal", [True, False])
def test_long_conv_matches_direct(causal, method):
    rng = np.random.default_rng(1)
    n, e, lmax = 13, 4, 21
    v = rng.normal(size=(2, n, e))
    h = rng.normal(size=(e, lmax))
    expected = np.zeros_like(v)
    for t in range(n):
        for s in range(n):
            if causal and s <= t:
                expected[:, t] += h[:, s] * v[:, t - s]
            elif not causal:
                expected[:, t] += h[:, s] * v[:, (t - s) % n]
    np.testing.assert_allclose(baseconv.long_conv(jnp.asarray(v), jnp.asarray(h), causal, method), expected, atol=1e-13)


# --- dense layers: the product by rows ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5), (7, 5)])
def test_rows_dot_general_is_the_feature_product_and_its_gradient(shape):
    """(..., in) @ (in, out) by rows: the same values and input/kernel gradients as numpy (einsum, tensordot)."""
    rng = np.random.default_rng(0)
    x, w, g = rng.normal(size=shape), rng.normal(size=(5, 6)), rng.normal(size=shape[:-1] + (6,))
    dims = (((len(shape) - 1,), (0,)), ((), ()))
    f = lambda x, w: jnp.vdot(g, dense.rows_dot_general(x, w, dims))
    np.testing.assert_allclose(dense.rows_dot_general(x, w, dims), np.einsum("...i,io->...o", x, w), rtol=1e-13)
    dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dx, np.einsum("...o,io->...i", g, w), rtol=1e-13)
    lead = list(range(len(shape) - 1))
    np.testing.assert_allclose(dw, np.tensordot(x, g, axes=(lead, lead)), rtol=1e-13)


def test_rows_dot_general_passes_other_products_through():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_allclose(dense.rows_dot_general(a, b, batched), np.einsum("bij,bjk->bik", a, b), rtol=1e-13)


# --- attention against a naive O(L^2) formula ------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("softmax", [True, False])
def test_attention_matches_naive(causal, softmax):
    cfg = ModelConfig(in_dims=4, out_dims=4, n_positions=9, n_embd=8, n_head=2, causal=causal,
                      mixer="attention" if softmax else "linear_attention")
    mod = attention.Attention(cfg, softmax=softmax)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 8))
    p = mod.init(jax.random.key(0), jnp.asarray(x))
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
    w_attn, b_attn = np.asarray(p["params"]["c_attn"]["kernel"]), np.asarray(p["params"]["c_attn"]["bias"])
    w_proj, b_proj = np.asarray(p["params"]["c_proj"]["kernel"]), np.asarray(p["params"]["c_proj"]["bias"])
    expected = np.zeros((2, 9, 8))
    hs = 4
    for b in range(2):
        qkv = x[b] @ w_attn + b_attn
        heads = []
        for h in range(2):
            q, k, v = (qkv[:, i * 8 + h * hs: i * 8 + (h + 1) * hs] for i in range(3))
            y = np.zeros((9, hs))
            for t in range(9):
                visible = range(t + 1) if causal else range(9)
                scores = np.array([q[t] @ k[s] / math.sqrt(hs) for s in visible])
                if softmax:
                    scores = np.exp(scores - scores.max())
                    scores /= scores.sum()
                y[t] = sum(sc * v[s] for sc, s in zip(scores, visible))
            heads.append(y)
        expected[b] = np.concatenate(heads, axis=1) @ w_proj + b_proj
    np.testing.assert_allclose(mod.apply(p, jnp.asarray(x)), expected, atol=1e-12)


# --- causality through gradients ---------------------------------------------------------------------------

def perturbed_params(cfg):
    """Initial parameters plus noise, so that no degenerate init (delta filters, zero biases) hides a
    dependence."""
    leaves, tree = jax.tree_util.tree_flatten(init_params(cfg, jax.random.key(3)))
    keys = jax.random.split(jax.random.key(4), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)])


MIXER_CASES = [dict(mixer="baseconv", conv_type=c) for c in ("short", "long", "implicit")] + [
    dict(mixer="attention"), dict(mixer="linear_attention", use_mlps=True, use_seqop_ln=True)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", MIXER_CASES)
@pytest.mark.slow
def test_causality_through_gradients(kw, causal):
    cfg = ModelConfig(in_dims=3, out_dims=2, n_positions=10, n_embd=8, n_layer=2, n_head=2, causal=causal, **kw)
    params = perturbed_params(cfg)
    x = jax.random.normal(jax.random.key(5), (1, 8, 3))
    jac = jax.jacrev(lambda x: SequenceModel(cfg).apply({"params": params}, x)[0])(x)[:, :, 0]  # (T, out, T, in)
    sensitivity = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [t, s]
    future = np.triu(np.ones((8, 8), bool), k=1)
    if causal:
        assert np.all(sensitivity[future] == 0)
    else:
        assert np.all(sensitivity[future] > 0)
    assert np.all(np.diag(sensitivity) > 0)


# --- dtypes, initialisation, validation ---------------------------------------------------------------------

ALL_SWITCHES = dict(use_mlps=True, use_seqop_ln=True, use_mlp_ln=True, use_final_ln=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kw", MIXER_CASES + [dict(mixer="attention", mlp_activ="glu", **ALL_SWITCHES)])
@pytest.mark.slow
def test_dtypes_reach_every_leaf(kw, dtype):
    cfg = ModelConfig(in_dims=3, out_dims=2, n_positions=6, n_embd=8, n_head=2, dtype=dtype, **kw)
    params = init_params(cfg, jax.random.key(0))
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == jnp.dtype(dtype)
    out, state = SequenceModel(cfg).apply({"params": params}, jnp.ones((2, 5, 3), jnp.float64),
                                          mutable=["intermediates"])
    assert out.shape == (2, 5, 2) and out.dtype == jnp.dtype(dtype)
    assert all(h.dtype == jnp.dtype(dtype) for h in state["intermediates"]["hidden"])


def _assert_uniform(a, bound):
    a = np.asarray(a).ravel()
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound


def _assert_normal(a, std):
    a = np.asarray(a).ravel()
    assert abs(a.mean()) < 5 * std / math.sqrt(a.size)
    assert abs(a.std() / std - 1) < 5 / math.sqrt(2 * a.size)


def test_initialisation_of_every_group():
    n_layer, e, lmax = 4, 64, 21
    conv = init_params(ModelConfig(in_dims=6, out_dims=5, n_positions=lmax, n_embd=e, n_layer=n_layer),
                       jax.random.key(0))
    _assert_uniform(conv["read_in"]["kernel"], 1 / math.sqrt(6))
    _assert_uniform(conv["read_in"]["bias"], 1 / math.sqrt(6))
    _assert_uniform(np.concatenate([conv[f"h_{i}"]["mixer"]["conv"]["filter"].ravel() for i in range(n_layer)]),
                    1 / math.sqrt(lmax))
    _assert_uniform(np.concatenate([conv[f"h_{i}"]["mixer"]["conv"]["bias"] for i in range(n_layer)]),
                    1 / math.sqrt(lmax))
    _assert_uniform(conv["read_out"]["kernel"], 1 / math.sqrt(e))
    _assert_normal(conv["wpe"], 0.02)
    for name in ("in_proj", "projection", "out_proj"):
        _assert_normal(conv["h_0"]["mixer"][name]["kernel"], 0.02)
        assert np.all(conv["h_0"]["mixer"][name]["bias"] == 0)
    np.testing.assert_array_equal(conv["h_1"]["mixer"]["branch_weights"], [1.0, 0.0])

    long_filter = init_params(ModelConfig(in_dims=6, out_dims=5, n_positions=lmax, conv_type="long"),
                              jax.random.key(1))["h_0"]["mixer"]["conv"]["filter"]
    delta = np.zeros((e, lmax))
    delta[:, 0] = 1
    np.testing.assert_array_equal(long_filter, delta)

    attn = init_params(ModelConfig(in_dims=6, out_dims=5, n_positions=lmax, n_embd=e, n_layer=n_layer, n_head=4,
                                   mixer="attention", mlp_activ="glu", **ALL_SWITCHES), jax.random.key(2))
    blk = attn["h_0"]
    _assert_normal(blk["mixer"]["c_attn"]["kernel"], 0.02)
    _assert_normal(blk["mlp"]["c_fc"]["kernel"], 0.02)
    _assert_normal(blk["mlp"]["proj1"]["kernel"], 0.02)
    _assert_normal(blk["mixer"]["c_proj"]["kernel"], 0.02 / math.sqrt(2 * n_layer))
    _assert_normal(blk["mlp"]["c_proj"]["kernel"], 0.02 / math.sqrt(2 * n_layer))
    for ln in (blk["ln_1"], blk["ln_2"], attn["ln_f"]):
        assert np.all(ln["scale"] == 1) and np.all(ln["bias"] == 0)


def test_frozen_projections_and_positions_hold_no_parameters():
    cfg = ModelConfig(in_dims=3, out_dims=2, n_positions=5, n_embd=6, n_layer=1, train_proj=False, train_pos=False)
    params = init_params(cfg, jax.random.key(0))
    assert set(params) == {"h_0"}
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    x = jax.random.normal(jax.random.key(1), (1, 5, 3))
    # with zero blocks and residual connections the model is read-out(read-in(x)) = x[..., :2]
    np.testing.assert_array_equal(SequenceModel(cfg).apply({"params": zero}, x), x[..., :2])


@pytest.mark.parametrize("softmax", [False, True])
def test_first_and_rest_positions_make_the_later_tokens_interchangeable(softmax):
    """With positions='first_and_rest' a non-causal attention model is permutation-equivariant in tokens
    1..T-1: permuting them permutes their outputs and leaves token 0's unchanged (a closed-form property of
    attention without positional information); with the positional table it is not."""
    kw = dict(in_dims=3, out_dims=2, n_positions=8, n_embd=8, n_layer=2, n_head=2, causal=False,
              mixer="attention" if softmax else "linear_attention", use_mlps=True, use_seqop_ln=True)
    x = jax.random.normal(jax.random.key(1), (2, 7, 3))
    order = np.array([0, 4, 1, 6, 2, 5, 3])
    for positions, equivariant in [("first_and_rest", True), ("table", False)]:
        cfg = ModelConfig(positions=positions, **kw)
        params = init_params(cfg, jax.random.key(0))
        assert params["wpe"].shape == ((2, 8) if equivariant else (8, 8))
        apply = jax.jit(lambda p, x: SequenceModel(cfg).apply({"params": p}, x))
        out, permuted = np.asarray(apply(params, x)), np.asarray(apply(params, x[:, order]))
        assert np.allclose(permuted, out[:, order], rtol=1e-12, atol=1e-14) == equivariant


@pytest.mark.parametrize("field,value", [
    ("n_embd", 0), ("n_layer", -1), ("mixer", "mamba"), ("conv_type", "medium"), ("mlp_activ", "swish"),
    ("dtype", "float16"), ("causal", "yes"), ("positions", "rotary")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(in_dims=3, out_dims=2, n_positions=5, **{field: value})


def test_bad_head_count_and_length():
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(in_dims=3, out_dims=2, n_positions=5, n_embd=10, n_head=3, mixer="attention")
    cfg = ModelConfig(in_dims=3, out_dims=2, n_positions=5, n_embd=8)
    with pytest.raises(ValueError, match="n_positions"):
        SequenceModel(cfg).init(jax.random.key(0), jnp.zeros((1, 6, 3)))


@pytest.mark.parametrize("kw", MIXER_CASES + [dict(mixer="attention", mlp_activ="glu", **ALL_SWITCHES),
                                              dict(mixer="linear_attention", causal=False),
                                              dict(mixer="baseconv", conv_type="long", causal=False)])
@pytest.mark.slow
def test_last_only_equals_the_last_row(kw):
    cfg = ModelConfig(in_dims=3, out_dims=2, n_positions=10, n_embd=8, n_layer=2, n_head=2, **kw)
    params = perturbed_params(cfg)
    x = jax.random.normal(jax.random.key(5), (2, 9, 3))
    model = SequenceModel(cfg)
    full = model.apply({"params": params}, x)
    last = model.apply({"params": params}, x, last_only=True)
    assert last.shape == (2, 1, 2)
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-13, atol=1e-14)
