"""BaseConv, the gated convolution: y = out_proj(conv(in_proj(u)) * projection(u)).

Filters are stored BY LAG: filter[e, s] multiplies v[t - s, e], so filter[:, 0] is the current token.
The reference's short convolution is a torch Conv1d, a cross-correlation whose LAST tap multiplies the
current token (tests/convert.py converts between the two).
"""
import functools
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lsq_jax.config.model import ModelConfig
from lsq_jax.models import initializers
from lsq_jax.models.dense import Dense

IMPLICIT_HIDDEN = 16  # width of the implicit filter's MLP (3 -> 16 -> E)
IMPLICIT_FREQ = 1e-4  # frequency of its cos / -sin positional features


def short_conv_offset(kernel_size: int, causal: bool) -> int:
    """Lag of filter index 0 is -offset: 0 when causal; the centred window's half width otherwise.

    Non-causal, the reference pads K // 2 on both sides, so its centre tap K // 2 (our index
    K - 1 - K // 2) multiplies the current token and filter[j] multiplies v[t - j + offset].
    """
    return 0 if causal else kernel_size - 1 - kernel_size // 2


FFT_MIN_LENGTH = 256  # below this a Toeplitz contraction is cheaper than an FFT, and exactly causal


def shift_tensor(k: int, n: int, offset: int = 0, circular: bool = False) -> np.ndarray:
    """The constant 0/1 tensor S (k, n, n) with S[j, t, s] = 1 iff filter tap j links output t to input s.

    Tap j has lag j - offset: s = t - j + offset (taken mod n when `circular`), inside [0, n).
    """
    j, t, src = np.ogrid[:k, :n, :n]
    lag = t - src + offset
    if circular:
        lag = lag % n
    return (lag == j).astype(np.float64)


def conv_matrix(filter_ExK, n: int, offset: int = 0, circular: bool = False):
    """The (E, n, n) matrix M with out[t] = sum_s M[:, t, s] v[s] for a lag-indexed filter.

    M[:, t, s] = filter[:, t - s + offset] where that index lies in [0, K), else 0; with `circular`, the lag
    is taken mod n (a period-n circular convolution of the first n lags). Built as a contraction with a
    constant shift tensor rather than a gather: same numbers, and its gradient is a contraction too
    instead of a scatter-add (about 3x faster forward on CPU).
    """
    k = filter_ExK.shape[1]
    shifts = shift_tensor(k, n, offset, circular).astype(filter_ExK.dtype)
    return jnp.einsum("ej,jts->ets", filter_ExK, shifts)


def _apply_matrix(matrix_ExTxT, v_BxTxE, last_only: bool):
    if last_only:  # only the last output row: a (1 x T) contraction per channel
        matrix_ExTxT = matrix_ExTxT[:, -1:]
    return jnp.einsum("ets,bse->bte", matrix_ExTxT, v_BxTxE)


def short_conv(v_BxTxE, filter_ExK, bias_E, causal: bool, last_only: bool = False):
    """Depthwise convolution with a length-K filter, zero padding, as a Toeplitz contraction.

    out[t, e] = bias[e] + sum_j filter[e, j] v[t - j + offset, e] over 0 <= t - j + offset < T.
    With `last_only`, only t = T - 1 is computed: (B, 1, E).
    """
    offset = short_conv_offset(filter_ExK.shape[1], causal)
    return _apply_matrix(conv_matrix(filter_ExK, v_BxTxE.shape[1], offset), v_BxTxE, last_only) + bias_E


def long_conv(v_BxTxE, filter_ExL, causal: bool, method: str = "auto", last_only: bool = False):
    """Convolution with an explicit lag-indexed filter, using its first T lags.

    Causal: the linear convolution out[t] = sum_{s<=t} filter[:, s] v[t - s].
    Non-causal: the reference's CIRCULAR convolution of period T, out[t] = sum_s filter[:, s] v[(t-s) mod T].
    The reference computes both by FFT (size 2T when causal, which makes it exact). `method` 'fft' does the
    same; 'toeplitz' contracts with the (E, T, T) matrix, which is cheaper for short sequences and keeps
    the future's weight exactly zero (an FFT leaks round-off into it); 'auto' picks by T. With
    `last_only`, only t = T - 1 is returned: (B, 1, E).
    """
    n = v_BxTxE.shape[1]
    if method == "toeplitz" or (method == "auto" and n < FFT_MIN_LENGTH):
        return _apply_matrix(conv_matrix(filter_ExL[:, :n], n, circular=not causal), v_BxTxE, last_only)
    size = 2 * n if causal else n
    f_v = jnp.fft.rfft(v_BxTxE, n=size, axis=1)
    f_h = jnp.fft.rfft(filter_ExL[:, :n].T, n=size, axis=0)
    out = jnp.fft.irfft(f_v * f_h, n=size, axis=1)[:, :n].astype(v_BxTxE.dtype)
    return out[:, -1:] if last_only else out


def implicit_features(n_positions: int, dtype=jnp.float64):
    """The implicit filter's fixed inputs (L_max, 3): [n / (L_max - 1), cos(2 pi f n / L_max), -sin(...)].

    The two denominators differ (L_max - 1 for the time column, L_max in the phase), as in the reference.
    """
    n = jnp.arange(n_positions, dtype=dtype)
    t = n / max(n_positions - 1, 1)
    phase = 2 * math.pi * IMPLICIT_FREQ * n / n_positions
    return jnp.stack([t, jnp.cos(phase), -jnp.sin(phase)], axis=1)


class Conv(nn.Module):
    """BaseConv's depthwise convolution over the E channels (short, long or implicit)."""

    config: ModelConfig

    def filter(self, n: int):
        """The lag-indexed filter (E, >= n) and bias (E,) or None, for a sequence of length n."""
        cfg = self.config
        dt = cfg.jnp_dtype
        shape = (cfg.n_embd, cfg.n_positions)
        if cfg.conv_type == "short":
            init = initializers.uniform_fan_in(cfg.n_positions)
            return self.param("filter", init, shape, dt), self.param("bias", init, (cfg.n_embd,), dt)
        if cfg.conv_type == "long":
            return self.param("filter", initializers.delta, shape, dt), None
        # implicit: the table is truncated to the first n rows, not rebuilt for length n
        dense = functools.partial(Dense, dtype=dt, param_dtype=dt, kernel_init=initializers.normal(),
                                  bias_init=nn.initializers.zeros)
        z = implicit_features(cfg.n_positions, dt)[:n]
        h = nn.relu(dense(IMPLICIT_HIDDEN, name="mlp_0")(z))
        return dense(cfg.n_embd, name="mlp_1")(h).T, None

    @nn.compact
    def __call__(self, v_BxTxE, last_only: bool = False):
        cfg = self.config
        filter_ExL, bias = self.filter(v_BxTxE.shape[1])
        self.sow("intermediates", "filter", filter_ExL)
        if cfg.conv_type == "short":
            return short_conv(v_BxTxE, filter_ExL, bias, cfg.causal, last_only)
        return long_conv(v_BxTxE, filter_ExL, cfg.causal, last_only=last_only)


class BaseConv(nn.Module):
    """The gated convolution mixer.

    With use_resid: conv(v) = filter * v + v, and the mixer returns w0 y + w1 u with trainable
    branch weights (w0, w1) initialised (1, 0). Without: no inner `+ v`, and it returns y.
    With `last_only` only the last position is returned; the gate and output projections then run on one
    position (the convolution still reads every position of in_proj(u)).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, u_BxTxE, last_only: bool = False):
        cfg = self.config
        dt = cfg.jnp_dtype
        dense = functools.partial(Dense, cfg.n_embd, dtype=dt, param_dtype=dt,
                                  kernel_init=initializers.normal(), bias_init=nn.initializers.zeros)
        v = dense(name="in_proj")(u_BxTxE)
        c = Conv(cfg, name="conv")(v, last_only)
        u = u_BxTxE[:, -1:] if last_only else u_BxTxE
        if cfg.use_resid:
            c = c + (v[:, -1:] if last_only else v)
        y = dense(name="out_proj")(c * dense(name="projection")(u))
        if not cfg.use_resid:
            return y
        w = self.param("branch_weights", initializers.branch_weights, (2,), dt)
        return w[0] * y + w[1] * u
