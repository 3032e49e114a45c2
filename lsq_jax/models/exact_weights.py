"""Exact weights for the explicit-gradient task in the TRAINED model's own form.

The published explicit-gradient model (configs/baseconv.py) is a `SequenceModel` with a trainable read-in,
positional table and read-out around residual BaseConv blocks. Its input is token 0 = [x0, 0] and tokens
i = 1..L = [a_i, b_i]; its target, read at the last position L, is

    g = A^T (A x0 - b) / L = S x0 - v,   S = (1/L) sum_i a_i a_i^T,   v = (1/L) sum_i b_i a_i.

`explicit_gradient_params` fills that architecture so that it outputs g exactly (to float64 rounding),
which shows the trained model can represent its target. Unlike the GD constructions of gd_weights.py, the iterate is NOT copied
into every token: only position L needs x0, and a causal filter tap at lag L reaches token 0 from
position L alone, so no gating by position is needed (the positional table is zero).

Two blocks do the work; any further blocks are exact identities (all parameters zero):

  block 1 (per token s, lag-0 products; the conv tap at lag L fetches x0):
      X_k   = x0_k at position L                       (D channels)
      AB_k  = b_s a_sk                                 (D channels)
      Q_ij  = a_si a_sj             for i < j          (D(D-1)/2 channels)
      Q_ii  = a_si^2 - sum_{j!=i} a_si a_sj            (D channels)
  block 2 (at position L; conv taps 1/L at lags 0..L-1 and 0 at lag L average tokens 1..L only):
      out_i = sum_{j!=i} S_ij (x0_i + x0_j) + (S_ii - sum_{j!=i} S_ij) x0_i - v_i  =  (S x0 - v)_i

Block 2 is a symmetric matrix-vector product in D(D+1)/2 multiplications instead of D^2. Both blocks
set the branch weights to (1, -1), so a block's output replaces the residual stream: x + (y - x) = y.
The residual stream then needs E = D(D+1)/2 + 2D = D(D+5)/2 channels (12 for D = 3, 25 for D = 5),
the minimum for this scheme: at position L it holds x0 next to the D(D+1)/2 + D per-token products.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from lsq_jax.config.model import ModelConfig
from lsq_jax.models.gd_weights import check_fields, check_positive_int, not_allowed

N_ACTIVE_LAYERS = 2  # blocks that compute; the rest of n_layer pass the stream through unchanged
_WHAT = "explicit-gradient construction"


def explicit_gradient_width(n_dims: int) -> int:
    """E = D(D+1)/2 + 2D: x0 (D), b a (D) and the D(D+1)/2 products of a with itself."""
    return n_dims * (n_dims + 1) // 2 + 2 * n_dims


def _check(cfg: ModelConfig, n_dims: int, n_points: int) -> None:
    check_positive_int("n_dims", n_dims, _WHAT)
    check_positive_int("n_points", n_points, _WHAT)
    check_fields(cfg, dict(mixer="baseconv", conv_type="short", causal=True, use_resid=True,
                            use_mlps=False, use_seqop_ln=False, use_final_ln=False, train_proj=True,
                            train_pos=True, positions="table"), _WHAT)
    if cfg.n_layer < N_ACTIVE_LAYERS:
        raise not_allowed("n_layer", cfg.n_layer, f">= {N_ACTIVE_LAYERS}", _WHAT)
    if cfg.in_dims != n_dims + 1:
        raise not_allowed("in_dims", cfg.in_dims, f"n_dims + 1 = {n_dims + 1}", _WHAT)
    if cfg.out_dims < n_dims:
        raise not_allowed("out_dims", cfg.out_dims, f">= n_dims = {n_dims}", _WHAT)
    width = explicit_gradient_width(n_dims)
    if cfg.n_embd < width:
        raise not_allowed("n_embd", cfg.n_embd, f">= D(D+5)/2 = {width} for n_dims={n_dims}", _WHAT)
    if cfg.n_positions < n_points + 1:
        raise not_allowed("n_positions", cfg.n_positions, f">= n_points + 1 = {n_points + 1}", _WHAT)


def explicit_gradient_params(cfg: ModelConfig, n_dims: int, n_points: int):
    """Weights for `cfg` whose output at the last position is A^T (A x0 - b) / L, channels [:D].

    A block computes x + w0 y + w1 x with y = out_proj((conv(v) + v) * projection(x)), v = in_proj(x),
    conv(v)[t] = bias + sum_j filter[:, j] v[t - j] (stored by lag; the `+ v` is BaseConv's inner
    residual, cancelled where unwanted by filter[:, 0] = -1). Dense kernels are (in, out). Residual
    channels after block 1: X = [0, D), AB = [D, 2D), Q = [2D, E_min), one per pair i <= j.

      read-in:  a -> [0, D), b -> D; no bias, positional table zero.
      block 1:  gate channel k:      v = a_k, taps lag L: 1, lag 0: -1  -> c[L] = x0_k;  p = 1      -> X_k
                gate channel D+k:    v = a_k, lag 0 only                ;  p = b        -> AB_k
                gate channel (i<=j): v = a_i, lag 0 only                ;  p = a_j      -> products,
                combined by out_proj into Q_ij (i < j) and Q_ii - sum_{j!=i} Q_ij.
      block 2:  taps 1/L at lags 0..L-1 (lag 0: 1/L - 1), 0 at lag L, so c[L] = mean over tokens 1..L:
                gate channel (i<j):  v = Q_ij ;  p = x0_i + x0_j  -> out_i, out_j
                gate channel (i,i):  v = Q_ii ;  p = x0_i         -> out_i
                gate channel AB_k:   v = AB_k ;  p = -1           -> out_k
      read-out: [0, D) -> [0, D); no bias.

    Exact only at the last position of a sequence of exactly L + 1 tokens (the 1/L and the lag-L tap are
    baked in); earlier positions hold intermediate values.

    Allowed, checked with a ValueError naming the field: mixer 'baseconv', conv_type 'short', causal,
    use_resid, no MLPs or LayerNorms, train_proj and train_pos, n_layer >= 2 (blocks after the second
    are identities), in_dims = D + 1, out_dims >= D, n_embd >= D(D+5)/2, n_positions >= L + 1.

    Args:
      cfg: the model config, e.g. `experiment_from_config(get_config()).model` of configs/baseconv.py.
      n_dims: D.
      n_points: L, the number of rows the weights are built for.

    Returns:
      The params pytree, with the structure, shapes and dtype (cfg.dtype) of `init_params(cfg, key)`.

    Raises:
      ValueError: naming the first config field or argument that the construction cannot have.
    """
    _check(cfg, n_dims, n_points)
    d, e, k_len, n = n_dims, cfg.n_embd, cfg.n_positions, n_points
    x_ch, ab_ch, b_in = np.arange(d), d + np.arange(d), d
    pairs = list(itertools.combinations_with_replacement(range(d), 2))  # (i, j), i <= j
    q_ch = {p: 2 * d + m for m, p in enumerate(pairs)}

    def dense():
        return {"kernel": np.zeros((e, e)), "bias": np.zeros(e)}

    def block():
        return {"in_proj": dense(), "projection": dense(), "out_proj": dense(),
                "conv": {"filter": np.zeros((e, k_len)), "bias": np.zeros(e)},
                "branch_weights": np.zeros(2)}

    b1, b2 = block(), block()
    b1["branch_weights"][:] = b2["branch_weights"][:] = (1, -1)  # x + (y - x): y replaces the stream

    # block 1: x0 fetched to position L by the lag-L tap; per-token products at lag 0 (gate = residual ch)
    b1["in_proj"]["kernel"][x_ch, x_ch] = 1
    b1["conv"]["filter"][x_ch, n] = 1
    b1["conv"]["filter"][x_ch, 0] = -1
    b1["projection"]["bias"][x_ch] = 1
    b1["out_proj"]["kernel"][x_ch, x_ch] = 1
    b1["in_proj"]["kernel"][x_ch, ab_ch] = 1
    b1["projection"]["kernel"][b_in, ab_ch] = 1
    b1["out_proj"]["kernel"][ab_ch, ab_ch] = 1
    for (i, j), ch in q_ch.items():
        b1["in_proj"]["kernel"][i, ch] = 1
        b1["projection"]["kernel"][j, ch] = 1
        b1["out_proj"]["kernel"][ch, ch] = 1
        if i != j:  # the diagonal channels subtract the off-diagonal products of their row
            b1["out_proj"]["kernel"][ch, q_ch[i, i]] = b1["out_proj"]["kernel"][ch, q_ch[j, j]] = -1

    # block 2: average tokens 1..L at position L (token 0 sits at lag L, whose tap is 0), then multiply
    sums = np.concatenate([ab_ch, list(q_ch.values())])
    b2["in_proj"]["kernel"][sums, sums] = 1
    b2["conv"]["filter"][sums, :n] = 1 / n
    b2["conv"]["filter"][sums, 0] = 1 / n - 1
    b2["projection"]["bias"][ab_ch] = -1
    b2["out_proj"]["kernel"][ab_ch, x_ch] = 1
    for (i, j), ch in q_ch.items():
        b2["projection"]["kernel"][[i, j], ch] = 1  # x0_i + x0_j, or x0_i when i == j
        b2["out_proj"]["kernel"][ch, [i, j]] = 1

    read_in = np.zeros((d + 1, e))
    read_in[np.arange(d + 1), np.arange(d + 1)] = 1
    read_out = np.zeros((e, cfg.out_dims))
    read_out[x_ch, x_ch] = 1
    params = {"read_in": {"kernel": read_in, "bias": np.zeros(e)}, "wpe": np.zeros((k_len, e)),
              "read_out": {"kernel": read_out, "bias": np.zeros(cfg.out_dims)},
              **{f"h_{i}": {"mixer": b1 if i == 0 else b2 if i == 1 else block()} for i in range(cfg.n_layer)}}
    return jax.tree.map(lambda x: jnp.asarray(x, cfg.jnp_dtype), params)
