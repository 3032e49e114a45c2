"""Multi-head attention: GPT-2-style softmax attention, and linear attention.

q, k and v come from one packed Dense `c_attn` (E -> 3E; column blocks q, k, v; head h owns features
[h hs, (h+1) hs) of each), scores are q k^T / sqrt(hs), heads are concatenated in order and projected by
`c_proj`. Linear attention is the same without softmax and without any normalisation or feature map:
causal masking sets the scores above the diagonal to zero.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsq_jax.config.model import ModelConfig
from lsq_jax.models import initializers
from lsq_jax.models.dense import Dense


def attention_weights(q_BxHxQxd, k_BxHxTxd, causal: bool, softmax: bool):
    """Scores q k^T / sqrt(d), masked and (for softmax attention) normalised: (B, H, Q, T).

    The Q queries are the LAST Q positions of the T keys (Q = T normally, Q = 1 for the last position).
    """
    scores = jnp.einsum("bhtd,bhsd->bhts", q_BxHxQxd, k_BxHxTxd) / math.sqrt(q_BxHxQxd.shape[-1])
    n_q, n = scores.shape[-2:]
    if causal:
        visible = jnp.arange(n)[None, :] <= jnp.arange(n - n_q, n)[:, None]
        scores = jnp.where(visible, scores, -jnp.inf if softmax else 0)
    return jax.nn.softmax(scores, axis=-1) if softmax else scores


class Attention(nn.Module):
    """Softmax (`softmax=True`) or linear multi-head attention over (B, T, E)."""

    config: ModelConfig
    softmax: bool = True

    @nn.compact
    def __call__(self, x_BxTxE, last_only: bool = False):
        cfg = self.config
        dt = cfg.jnp_dtype
        b, n, e = x_BxTxE.shape
        qkv = Dense(3 * e, use_bias=cfg.use_bias, dtype=dt, param_dtype=dt,
                    kernel_init=initializers.normal(), name="c_attn")(x_BxTxE)
        # (B, T, 3E) -> three (B, H, T, hs)
        q, k, v = qkv.reshape(b, n, 3, cfg.n_head, cfg.head_dim).transpose(2, 0, 3, 1, 4)
        if last_only:  # one query: the last position
            q = q[:, :, -1:]
        weights = attention_weights(q, k, cfg.causal, self.softmax)
        y = jnp.einsum("bhts,bhsd->bthd", weights, v).reshape(b, q.shape[2], e)
        return Dense(e, use_bias=cfg.use_bias, dtype=dt, param_dtype=dt,
                     kernel_init=initializers.output_projection(cfg.n_layer), name="c_proj")(y)
