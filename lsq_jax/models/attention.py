"""Multi-head attention (SPEC §3): GPT-2-style softmax attention, and linear attention.

q, k and v come from one packed Dense `c_attn` (E -> 3E; column blocks q, k, v; head h owns features
[h hs, (h+1) hs) of each), scores are q k^T / sqrt(hs), heads are concatenated in order and projected by
`c_proj`. Linear attention is the same without softmax and without any normalisation or feature map:
causal masking sets the scores above the diagonal to zero.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsq_jax.models import initializers
from lsq_jax.models.config import ModelConfig


def attention_weights(q_BxHxTxd, k_BxHxTxd, causal: bool, softmax: bool):
    """Scores q k^T / sqrt(d), masked and (for softmax attention) normalised: (B, H, T, T)."""
    scores = jnp.einsum("bhtd,bhsd->bhts", q_BxHxTxd, k_BxHxTxd) / math.sqrt(q_BxHxTxd.shape[-1])
    n = scores.shape[-1]
    if softmax:
        if causal:
            scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -jnp.inf)
        return jax.nn.softmax(scores, axis=-1)
    return jnp.tril(scores) if causal else scores


class Attention(nn.Module):
    """Softmax (`softmax=True`) or linear multi-head attention over (B, T, E)."""

    config: ModelConfig
    softmax: bool = True

    @nn.compact
    def __call__(self, x_BxTxE):
        cfg = self.config
        dt = cfg.jnp_dtype
        b, n, e = x_BxTxE.shape
        qkv = nn.Dense(3 * e, use_bias=cfg.use_bias, dtype=dt, param_dtype=dt,
                       kernel_init=initializers.normal(), name="c_attn")(x_BxTxE)
        # (B, T, 3E) -> three (B, H, T, hs)
        q, k, v = qkv.reshape(b, n, 3, cfg.n_head, cfg.head_dim).transpose(2, 0, 3, 1, 4)
        weights = attention_weights(q, k, cfg.causal, self.softmax)
        y = jnp.einsum("bhts,bhsd->bthd", weights, v).reshape(b, n, e)
        return nn.Dense(e, use_bias=cfg.use_bias, dtype=dt, param_dtype=dt,
                        kernel_init=initializers.output_projection(cfg.n_layer), name="c_proj")(y)
