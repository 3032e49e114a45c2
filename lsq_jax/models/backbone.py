"""The sequence model: read-in + positions -> blocks -> optional final LN -> read-out.

Block with use_resid: x = x + mixer(LN1(x)), then with MLPs x = x + MLP(LN2(x)); without use_resid the
same lines without the `x +`. The residual stream after the embedding, after every block and after the
final LayerNorm is sown into the 'intermediates' collection as 'hidden' for inspection.
"""
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsq_jax.config.model import ModelConfig
from lsq_jax.models import initializers
from lsq_jax.models.attention import Attention
from lsq_jax.models.baseconv import BaseConv
from lsq_jax.models.dense import Dense

LN_EPS = 1e-5


def layer_norm(cfg: ModelConfig, name: str):
    """LayerNorm with the biased variance computed as E[(x - mean)^2] (Flax's fast E[x^2] - mean^2 loses
    digits that float64 training needs)."""
    return nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias, use_fast_variance=False,
                        dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype, name=name)


def rectangular_identity(x, out_features: int):
    """The frozen read-in / read-out: copies the first min(in, out) channels, zero elsewhere."""
    return x @ jnp.eye(x.shape[-1], out_features, dtype=x.dtype)


class MLP(nn.Module):
    """Dense E -> up E, activation, Dense up E -> E. The reference's 'glu' keeps the width:
    sigmoid(P1 h) * (P2 h) with two bias-free (up E x up E) matrices between the two Dense layers."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt = cfg.jnp_dtype
        hidden = cfg.mlp_upfactor * cfg.n_embd
        dense = functools.partial(Dense, dtype=dt, param_dtype=dt)
        h = dense(hidden, use_bias=cfg.use_bias, kernel_init=initializers.normal(), name="c_fc")(x)
        if cfg.mlp_activ == "relu":
            h = nn.relu(h)
        elif cfg.mlp_activ == "gelu":
            h = jax.nn.gelu(h, approximate=False)
        else:
            proj = functools.partial(dense, hidden, use_bias=False, kernel_init=initializers.normal())
            h = nn.sigmoid(proj(name="proj1")(h)) * proj(name="proj2")(h)
        return dense(cfg.n_embd, use_bias=cfg.use_bias,
                     kernel_init=initializers.output_projection(cfg.n_layer), name="c_proj")(h)


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, last_only: bool = False):
        cfg = self.config
        if cfg.mixer == "baseconv":
            mixer = BaseConv(cfg, name="mixer")
        else:
            mixer = Attention(cfg, softmax=cfg.mixer == "attention", name="mixer")
        h = layer_norm(cfg, "ln_1")(x) if cfg.use_seqop_ln else x
        if last_only:
            x = x[:, -1:]
        x = x + mixer(h, last_only) if cfg.use_resid else mixer(h, last_only)
        if cfg.use_mlps:
            h = layer_norm(cfg, "ln_2")(x) if cfg.use_mlp_ln else x
            x = x + MLP(cfg, name="mlp")(h) if cfg.use_resid else MLP(cfg, name="mlp")(h)
        return x


class SequenceModel(nn.Module):
    """(B, T, in_dims) -> (B, T, out_dims) for any T <= n_positions.

    `last_only=True` returns only the last position, (B, 1, out_dims), equal to the last row of the full
    output; the last block then evaluates its mixer output, MLP, final LN and read-out at that position
    alone (what a loss read at the last position needs).

    With `normalize` (the task's, for model.scale_equivariant), the blocks see the tokens it returns and the
    output is multiplied by the factor it returns.
    """

    config: ModelConfig
    normalize: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None

    @nn.compact
    def __call__(self, x_BxTxD, last_only: bool = False):
        cfg = self.config
        dt = cfg.jnp_dtype
        n = x_BxTxD.shape[1]
        if x_BxTxD.shape[-1] != cfg.in_dims:
            raise ValueError(f"input width {x_BxTxD.shape[-1]} does not match in_dims={cfg.in_dims}")
        if n > cfg.n_positions:
            raise ValueError(f"sequence length {n} is not allowed: must be <= n_positions={cfg.n_positions}")
        x = x_BxTxD.astype(dt)
        out_scale = 1
        if self.normalize is not None:
            x, out_scale = self.normalize(x)
        if cfg.train_proj:
            x = Dense(cfg.n_embd, dtype=dt, param_dtype=dt, kernel_init=initializers.uniform_fan_in(cfg.in_dims),
                      bias_init=initializers.uniform_fan_in(cfg.in_dims), name="read_in")(x)
        else:
            x = rectangular_identity(x, cfg.n_embd)
        if cfg.train_pos:
            table = cfg.positions == "table"
            wpe = self.param("wpe", initializers.normal(), (cfg.n_positions if table else 2, cfg.n_embd), dt)
            x = x + (wpe[:n] if table else wpe[jnp.minimum(jnp.arange(n), 1)])
        self.sow("intermediates", "hidden", x)
        for i in range(cfg.n_layer):
            x = Block(cfg, name=f"h_{i}")(x, last_only and i == cfg.n_layer - 1)
            self.sow("intermediates", "hidden", x)
        if cfg.use_final_ln:
            x = layer_norm(cfg, "ln_f")(x)
            self.sow("intermediates", "hidden", x)
        if cfg.train_proj:
            x = Dense(cfg.out_dims, dtype=dt, param_dtype=dt, kernel_init=initializers.uniform_fan_in(cfg.n_embd),
                      bias_init=initializers.uniform_fan_in(cfg.n_embd), name="read_out")(x)
        else:
            x = rectangular_identity(x, cfg.out_dims)
        return x * out_scale


def init_params(cfg: ModelConfig, key, seq_len: int | None = None):
    """Parameters of a fresh model with the reference's initialisation (a pure function of the key)."""
    x = jnp.zeros((1, seq_len or cfg.n_positions, cfg.in_dims), cfg.jnp_dtype)
    return SequenceModel(cfg).init(key, x)["params"]


def abstract_params(cfg: ModelConfig):
    """The parameters' shapes and dtypes (ShapeDtypeStructs), without computing or allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def parameter_count(cfg: ModelConfig) -> int:
    """P, the model's parameter count, from shapes alone (nothing is computed or allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def mixing_bytes(cfg: ModelConfig, seq_len: int, n_sequences: int) -> int:
    """A lower bound of the bytes one block's sequence mixer materialises on `n_sequences` sequences of
    `seq_len` tokens, from the config alone (tracing the model would allocate the first term on the host):
    BaseConv's short convolution builds a (K, T, T) float64 shift tensor (K = n_positions) and an (E, T, T)
    Toeplitz matrix; softmax attention holds (n, heads, T, T) scores. Zero for the others."""
    t, itemsize = seq_len, cfg.jnp_dtype.itemsize
    if cfg.mixer == "baseconv" and cfg.conv_type == "short":
        return cfg.n_positions * t * t * 8 + cfg.n_embd * t * t * itemsize
    if cfg.mixer == "attention":
        return n_sequences * cfg.n_head * t * t * itemsize
    return 0
