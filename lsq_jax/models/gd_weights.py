"""Hand-built sequence models that perform exact gradient descent on least squares.

Both constructions are params pytrees for the ordinary `SequenceModel` (read-in/read-out frozen identities,
no positional table), so they drop straight into `SequenceModel(cfg).apply({'params': params}, tokens)`
and into any code that evaluates a learned model.

Token layout (both): a model input of L tokens of width E,

    channels [0, D)        a_i, the i-th row of A
    channel  D             b_i
    channels [D+1, 2D+1)   w, the current iterate, the SAME w copied into every token
    channels [2D+1, E)     zero (scratch for the BaseConv construction)

and the next iterate is read from channels [D+1, 2D+1) of the LAST token (not through any read-out).
One GD step is the multistep_gd task's:

    w+ = w - eta / L * A^T (A w - b).

The step size divides by L, the number of rows, and a polynomial model cannot divide by the length of its
input: c = eta / L is baked into the weights, so a construction is built for a given `n_points` L and is
exact GD only on sequences of exactly L tokens (on T tokens it makes the step eta T / L).

* `baseconv_gd_*`: three BaseConv layers = one GD step (with c = eta / L, not the reference
  notebook's c = eta).
* `linear_attention_gd_*`: every linear-attention layer = one GD step (von Oswald et al. 2023), so
  n_layer layers = n_layer steps per pass.

Allowed (E, n_layer, causal), checked with a ValueError naming the field: BaseConv E >= 4D + 1,
n_layer = 3, causal only; linear attention E >= 2D + 1 with head_dim >= D + 1, any n_layer, causal or not
(causal: exact at the last token, which is where the iterate is read).

`gd_tokens`, `read_iterate`, `make_token_step` and `iterate` feed the iterate back, one pass per
iteration, exactly as a learned one-step model is iterated.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsq_jax.config.model import ModelConfig

BASECONV_N_LAYER = 3  # layers per GD step of the BaseConv construction


# ----------------------------------------------------------------------------------------------------------
# Validation


def not_allowed(name: str, value, allowed: str, what: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed for the {what}: must be {allowed}")


def check_positive_int(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise not_allowed(name, value, "a positive integer", what)


def _check_eta(eta, what: str) -> None:
    try:
        value = float(eta)  # Python and numpy scalars, 0-d arrays; the weights are built on the host
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(eta, bool) or not math.isfinite(value):
        raise not_allowed("eta", eta, "a finite real number", what)


def check_fields(cfg: ModelConfig, required: dict, what: str) -> None:
    """Raise for the first field of `cfg` whose value differs from `required[field]`."""
    if not isinstance(cfg, ModelConfig):
        raise not_allowed("cfg", cfg, "a ModelConfig", what)
    for name, value in required.items():
        if getattr(cfg, name) != value:
            raise not_allowed(name, getattr(cfg, name), repr(value), what)


def _check_sizes(cfg: ModelConfig, n_dims: int, n_points: int, min_width: int, what: str) -> None:
    check_positive_int("n_dims", n_dims, what)
    check_positive_int("n_points", n_points, what)
    if cfg.n_embd < min_width:
        raise not_allowed("n_embd", cfg.n_embd, f">= {min_width} for n_dims={n_dims}", what)
    # Tokens enter and leave at full width: the frozen read-in/read-out must be square identities.
    for name in ("in_dims", "out_dims"):
        if getattr(cfg, name) != cfg.n_embd:
            raise not_allowed(name, getattr(cfg, name), f"n_embd={cfg.n_embd}", what)
    if cfg.n_positions < n_points:
        raise not_allowed("n_positions", cfg.n_positions, f">= n_points={n_points}", what)


# ----------------------------------------------------------------------------------------------------------
# BaseConv: three layers per GD step

_BASECONV = "BaseConv GD construction"


def baseconv_width(n_dims: int) -> int:
    """E = 4D + 1: a, b, w, and two D-channel scratch blocks (a * w, then r a)."""
    return 4 * n_dims + 1


def baseconv_gd_config(n_dims: int, n_points: int, *, n_positions: int | None = None,
                       dtype: str = "float64") -> ModelConfig:
    """The model that `baseconv_gd_params` fills: 3 causal short-conv BaseConv layers, width 4D + 1.

    No residual (so no inner `+ v` in the conv), no LayerNorm, no MLP, identity read-in/read-out, no
    positional table. `n_positions` (L_max, the conv filter length) defaults to `n_points`.
    """
    check_positive_int("n_dims", n_dims, _BASECONV)
    check_positive_int("n_points", n_points, _BASECONV)
    width = baseconv_width(n_dims)
    n_positions = n_points if n_positions is None else n_positions
    cfg = ModelConfig(in_dims=width, out_dims=width, n_positions=n_positions, n_embd=width,
                      n_layer=BASECONV_N_LAYER, mixer="baseconv", conv_type="short", causal=True,
                      use_resid=False, use_mlps=False, use_seqop_ln=False, use_final_ln=False,
                      train_proj=False, train_pos=False, dtype=dtype)
    _check_baseconv(cfg, n_dims, n_points)
    return cfg


def _check_baseconv(cfg: ModelConfig, n_dims: int, n_points: int) -> None:
    check_fields(cfg, dict(mixer="baseconv", conv_type="short", causal=True, use_resid=False,
                            use_mlps=False, use_seqop_ln=False, use_final_ln=False, train_proj=False,
                            train_pos=False, n_layer=BASECONV_N_LAYER), _BASECONV)
    _check_sizes(cfg, n_dims, n_points, baseconv_width(n_dims), _BASECONV)


def baseconv_gd_params(cfg: ModelConfig, n_dims: int, n_points: int, eta: float):
    """Weights for `cfg` that make one pass one exact GD step w - eta/L A^T (A w - b).

    Each layer computes y = out_proj(conv(in_proj(u)) * projection(u)), Dense kernels (in, out), the conv
    causal, depthwise and stored by lag (filter[:, 0] = current token). With no residual every layer must
    carry a, b, w itself: in_proj copies them, the conv passes them (delta filter), the projection branch
    multiplies them by its unit bias, out_proj copies them. Channels: a = [0, D), b = D, w = [D+1, 2D+1),
    s1 = [2D+1, 3D+1), s2 = [3D+1, 4D+1); channels >= 4D+1 stay zero.

      layer 1: in_proj a -> s1, projection w -> s1, delta conv      =>  s1_k = a_k w_k
      layer 2: in_proj sum_j s1_j - b -> every s2_k, projection a -> s2
                                                                    =>  s2_k = r a_k,  r = a.w - b
               (out_proj drops s1)
      layer 3: all-ones causal filter on s2 (delta elsewhere) sums over positions s <= t; projection is
               the constant 1 (zero kernel, unit bias); out_proj writes w_k - c s2_k into w and drops s2
                                                                    =>  w+ = w - c sum_{s<=t} r_s a_s

    with c = eta / L. The last token sums all L rows, so it holds exactly one GD step; earlier tokens
    hold partial sums (read the last token only).

    Allowed: n_layer = 3 only (one step per pass: iterate by feeding the iterate back, not by stacking
    passes, which would see the partial sums); E >= 4D + 1 (channels >= 4D + 1 unused, zero at output);
    causal only (the non-causal short filter is a centred window of about L_max / 2 each way, so no
    token sees every row); conv_type 'short' only (its Toeplitz contraction is a plain sum; 'long' goes
    through an FFT, 'implicit' has no free filter).

    Args:
      cfg: a config like `baseconv_gd_config(n_dims, n_points)`: mixer 'baseconv', conv_type 'short',
        causal, no residual, no MLP/LayerNorm, frozen read-in/out and positions, n_layer 3,
        in_dims = out_dims = n_embd >= 4D + 1, n_positions >= n_points.
      n_dims: D.
      n_points: L, the number of rows (tokens) the step is built for.
      eta: the step size.

    Returns:
      The params pytree, with the structure, shapes and dtype (cfg.dtype) of `init_params(cfg, key)`.

    Raises:
      ValueError: naming the first config field or argument that the construction cannot have.
    """
    _check_baseconv(cfg, n_dims, n_points)
    _check_eta(eta, _BASECONV)
    d, e, k_len = n_dims, cfg.n_embd, cfg.n_positions
    a_ch = np.arange(d)
    b_ch = d
    w_ch = d + 1 + np.arange(d)
    s1_ch = 2 * d + 1 + np.arange(d)
    s2_ch = 3 * d + 1 + np.arange(d)
    keep = np.arange(2 * d + 1)  # a, b, w: carried through every layer
    c = float(eta) / n_points

    def dense():
        return {"kernel": np.zeros((e, e)), "bias": np.zeros(e)}

    def empty_layer():
        return {"in_proj": dense(), "projection": dense(), "out_proj": dense(),
                "conv": {"filter": np.zeros((e, k_len)), "bias": np.zeros(e)}}

    def carry(layer):
        layer["in_proj"]["kernel"][keep, keep] = 1
        layer["projection"]["bias"][keep] = 1
        layer["conv"]["filter"][keep, 0] = 1
        layer["out_proj"]["kernel"][keep, keep] = 1
        return layer

    # layer 1: s1 = a * w
    l1 = carry(empty_layer())
    l1["in_proj"]["kernel"][a_ch, s1_ch] = 1
    l1["conv"]["filter"][s1_ch, 0] = 1
    l1["projection"]["kernel"][w_ch, s1_ch] = 1
    l1["out_proj"]["kernel"][s1_ch, s1_ch] = 1

    # layer 2: s2 = (sum s1 - b) * a; s1 cleared by out_proj
    l2 = carry(empty_layer())
    l2["in_proj"]["kernel"][np.ix_(s1_ch, s2_ch)] = 1
    l2["in_proj"]["kernel"][b_ch, s2_ch] = -1
    l2["conv"]["filter"][s2_ch, 0] = 1
    l2["projection"]["kernel"][a_ch, s2_ch] = 1
    l2["out_proj"]["kernel"][s2_ch, s2_ch] = 1

    # layer 3: w <- w - c * (causal sum of s2); s2 cleared by out_proj
    l3 = carry(empty_layer())
    l3["in_proj"]["kernel"][s2_ch, s2_ch] = 1
    l3["conv"]["filter"][s2_ch, :] = 1
    l3["projection"]["bias"][:] = 1
    l3["out_proj"]["kernel"][s2_ch, w_ch] = -c

    layers = [l1, l2, l3]
    params = {f"h_{i}": {"mixer": layer} for i, layer in enumerate(layers)}
    return jax.tree.map(lambda x: jnp.asarray(x, cfg.jnp_dtype), params)


# ----------------------------------------------------------------------------------------------------------
# Linear attention: one GD step per layer (von Oswald et al. 2023)

_LINATTN = "linear-attention GD construction"


def linear_attention_gd_config(n_dims: int, n_points: int, n_iters: int = 1, *, width: int | None = None,
                               causal: bool = False, n_head: int = 1, n_positions: int | None = None,
                               dtype: str = "float64") -> ModelConfig:
    """The model that `linear_attention_gd_params` fills: `n_iters` residual linear-attention layers.

    Width defaults to the minimum 2D + 1 (a, b, w); n_head heads must leave head_dim >= D + 1. No
    LayerNorm, no MLP, attention biases on, identity read-in/read-out, no positional table.
    `n_positions` defaults to `n_points`.
    """
    check_positive_int("n_dims", n_dims, _LINATTN)
    check_positive_int("n_points", n_points, _LINATTN)
    check_positive_int("n_iters", n_iters, _LINATTN)
    width = 2 * n_dims + 1 if width is None else width
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 2 * n_dims + 1:
        raise not_allowed("width", width, f"an integer >= 2 * n_dims + 1 = {2 * n_dims + 1}", _LINATTN)
    n_positions = n_points if n_positions is None else n_positions
    cfg = ModelConfig(in_dims=width, out_dims=width, n_positions=n_positions, n_embd=width, n_layer=n_iters,
                      n_head=n_head, mixer="linear_attention", causal=causal, use_resid=True, use_mlps=False,
                      use_seqop_ln=False, use_final_ln=False, use_bias=True, train_proj=False,
                      train_pos=False, dtype=dtype)
    _check_linear_attention(cfg, n_dims, n_points)
    return cfg


def _check_linear_attention(cfg: ModelConfig, n_dims: int, n_points: int) -> None:
    check_fields(cfg, dict(mixer="linear_attention", use_resid=True, use_bias=True, use_mlps=False,
                            use_seqop_ln=False, use_final_ln=False, train_proj=False, train_pos=False),
                  _LINATTN)
    _check_sizes(cfg, n_dims, n_points, 2 * n_dims + 1, _LINATTN)
    if cfg.head_dim < n_dims + 1:
        raise not_allowed("n_head", cfg.n_head,
                           f"small enough that head_dim = n_embd // n_head >= n_dims + 1 = {n_dims + 1}",
                           _LINATTN)


def linear_attention_gd_params(cfg: ModelConfig, n_dims: int, n_points: int, eta: float):
    """Weights for `cfg` that make every layer one exact GD step w - eta/L A^T (A w - b).

    Derivation. A block computes x_t + c_proj(sum_s (q_t . k_s / sqrt(hs)) v_s) (linear attention, no
    normalisation), q, k, v from the packed Dense c_attn (with bias). Using only head 0's features:

      q_t = [w_t, -1]            (w channels copied, the -1 from the c_attn bias)
      k_s = [a_s, b_s]           so  q_t . k_s = a_s . w_t - b_s = r_s(w_t)
      v_s = -c sqrt(hs) a_s      (sqrt(hs) undoes the score scale; c = eta / L)

    so head 0 outputs sum_s r_s(w_t) (-c a_s) = -c A^T (A w_t - b), c_proj maps its features [0, D)
    onto the iterate channels, and the residual adds it to w_t: a, b and every other channel pass
    unchanged, so the next layer sees the same a, b and the new iterate.

    Non-causal: every token holds the same w and sums all L rows, so every token takes the same exact
    GD step and n_layer layers make n_layer steps. Causal (allowed): token t sums rows s <= t only, so
    earlier tokens hold other iterates, but a token's update depends only on its own w_t and on a, b
    (never on other tokens' w), so the LAST token still holds exactly n_layer GD steps.

    Args:
      cfg: a config like `linear_attention_gd_config(...)`: mixer 'linear_attention', use_resid,
        use_bias, no MLP/LayerNorm, frozen read-in/out and positions, in_dims = out_dims = n_embd
        >= 2D + 1, head_dim >= D + 1, n_positions >= n_points; any n_layer, causal or not.
      n_dims: D.
      n_points: L, the number of rows (tokens) the step is built for.
      eta: the step size.

    Returns:
      The params pytree, with the structure, shapes and dtype (cfg.dtype) of `init_params(cfg, key)`.

    Raises:
      ValueError: naming the first config field or argument that the construction cannot have.
    """
    _check_linear_attention(cfg, n_dims, n_points)
    _check_eta(eta, _LINATTN)
    d, e, hs = n_dims, cfg.n_embd, cfg.head_dim
    a_ch = np.arange(d)
    b_ch = d
    w_ch = d + 1 + np.arange(d)
    feat = np.arange(d)  # head 0's features [0, D) of each of the q, k, v column blocks
    q0, k0, v0 = 0, e, 2 * e  # column offsets of the q, k, v blocks in c_attn
    c = float(eta) / n_points

    attn_kernel = np.zeros((e, 3 * e))
    attn_bias = np.zeros(3 * e)
    attn_kernel[w_ch, q0 + feat] = 1
    attn_bias[q0 + d] = -1
    attn_kernel[a_ch, k0 + feat] = 1
    attn_kernel[b_ch, k0 + d] = 1
    attn_kernel[a_ch, v0 + feat] = -c * math.sqrt(hs)
    proj_kernel = np.zeros((e, e))
    proj_kernel[feat, w_ch] = 1

    layer = {"mixer": {"c_attn": {"kernel": attn_kernel, "bias": attn_bias},
                       "c_proj": {"kernel": proj_kernel, "bias": np.zeros(e)}}}
    params = {f"h_{i}": layer for i in range(cfg.n_layer)}
    # jnp.asarray makes a fresh array per leaf, so the layers share no buffers.
    return jax.tree.map(lambda x: jnp.asarray(x, cfg.jnp_dtype), params)

# ----------------------------------------------------------------------------------------------------------
# Feeding the iterate back


def gd_tokens(a_BxLxD, b_BxL, w_BxD, width: int):
    """Tokens [a_i, b_i, w, 0...] of width `width` (B, L, width); the same iterate w in every token.

    The dtype is the promoted dtype of a, b and w.
    """
    a_BxLxD, b_BxL, w_BxD = jnp.asarray(a_BxLxD), jnp.asarray(b_BxL), jnp.asarray(w_BxD)
    if a_BxLxD.ndim != 3:
        raise ValueError(f"a_BxLxD.shape={a_BxLxD.shape} is not allowed: must be (B, L, D)")
    bsz, n, d = a_BxLxD.shape
    if b_BxL.shape != (bsz, n):
        raise ValueError(f"b_BxL.shape={b_BxL.shape} is not allowed: must be {(bsz, n)}")
    if w_BxD.shape != (bsz, d):
        raise ValueError(f"w_BxD.shape={w_BxD.shape} is not allowed: must be {(bsz, d)}")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 2 * d + 1:
        raise ValueError(f"width={width!r} is not allowed: must be an integer >= 2 * n_dims + 1 = {2 * d + 1}")
    dtype = jnp.result_type(a_BxLxD, b_BxL, w_BxD)
    return jnp.concatenate([
        a_BxLxD.astype(dtype),
        b_BxL[..., None].astype(dtype),
        jnp.broadcast_to(w_BxD[:, None, :], (bsz, n, d)).astype(dtype),
        jnp.zeros((bsz, n, width - 2 * d - 1), dtype),
    ], axis=-1)


def read_iterate(out_BxTxE, n_dims: int):
    """The iterate w (B, D): channels [D+1, 2D+1) of the LAST token of the model output."""
    return out_BxTxE[:, -1, n_dims + 1:2 * n_dims + 1]


def make_token_step(apply_fn: Callable, params, a_BxLxD, b_BxL, width: int):
    """step(w_BxD) -> w_next: write w into every token with `gd_tokens`, apply, `read_iterate`.

    Args:
      apply_fn: apply_fn(params, tokens_BxLxE) -> outputs_BxLxE, e.g.
        `lambda p, x: SequenceModel(cfg).apply({'params': p}, x)`.
      params: passed to apply_fn unchanged (may be traced: build the step inside a jitted function).
      a_BxLxD, b_BxL: the problems, fixed across steps.
      width: the token width E (the model's in_dims).
    """
    n_dims = a_BxLxD.shape[-1]

    def step(w_BxD):
        return read_iterate(apply_fn(params, gd_tokens(a_BxLxD, b_BxL, w_BxD, width)), n_dims)

    return step


def iterate(step: Callable, w0_BxD, n_iters: int):
    """The iterates w_0, ..., w_n of w_{t+1} = step(w_t) by `jax.lax.scan`: (n_iters + 1, B, D).

    Generic over `step`: a construction or a learned one-step model fed back through its tokens
    (`make_token_step`), exact GD, or x - eta * model(A, b, x) for a learned gradient. Jittable with
    `n_iters` static.
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, (int, np.integer)) or n_iters < 0:
        raise ValueError(f"n_iters={n_iters!r} is not allowed: must be a non-negative integer")
    w0_BxD = jnp.asarray(w0_BxD)

    def body(w, _):
        w_next = step(w).astype(w.dtype)
        return w_next, w_next

    _, ws = jax.lax.scan(body, w0_BxD, None, length=n_iters)
    return jnp.concatenate([w0_BxD[None], ws], axis=0)
