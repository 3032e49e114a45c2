"""ModelConfig: one sequence model (backbone and mixer), validated on construction."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lsq_jax.config.check import check_choice, check_flag, check_int, require

MIXERS = ("baseconv", "attention", "linear_attention")
CONV_TYPES = ("short", "long", "implicit")
ACTIVATIONS = ("relu", "gelu", "glu")
DTYPES = ("float64", "float32")
POSITIONS = ("table", "first_and_rest")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A backbone (read-in, positions, blocks, final LN, read-out) and its sequence mixer.

    Field names follow the reference's constructor where one exists. Defaults are the published
    explicit-gradient model (BaseConv short, 3 layers, width 64, no MLP, no LayerNorm), except the sizes
    that come from the task (in_dims, out_dims, n_positions).

    Attributes:
      in_dims: width of an input token.
      out_dims: width of the read-out.
      n_positions: L_max, the length of the positional table and of the convolution filters.
      n_embd: model width E.
      n_layer: number of blocks.
      n_head: attention heads (must divide n_embd; unused by BaseConv).
      mixer: 'baseconv' (gated convolution), 'attention' (softmax) or 'linear_attention'.
      conv_type: BaseConv's convolution: 'short' (depthwise, kernel L_max), 'long' (explicit filter by FFT),
        'implicit' (filter produced by a small MLP over positional features).
      causal: output t sees inputs <= t only.
      use_resid: residual connections (and BaseConv's branch weights and inner conv residual).
      use_mlps: an MLP after every mixer.
      mlp_activ: 'relu', 'gelu' (exact erf form) or 'glu' (the reference's sigmoid(P1 h) * (P2 h)).
      mlp_upfactor: MLP hidden width / n_embd.
      use_seqop_ln, use_mlp_ln, use_final_ln: LN1, LN2 and the final LayerNorm.
      use_bias: biases in attention and MLP Dense layers and in LayerNorms (BaseConv always has biases).
      train_proj: False freezes read-in and read-out to rectangular identities (they hold no parameters).
      train_pos: False makes the positional table zero (it holds no parameters).
      positions: the positional table: 'table' (a learned vector per position, n_positions of them) or
        'first_and_rest' (one vector for token 0 and one shared by every later token: the later tokens are
        interchangeable, and a sequence longer than any trained is read as the trained ones are).
      dtype: 'float64' or 'float32', for parameters and activations alike.
      scale_equivariant: the model sees each problem at unit scale and scales its output back by the
        target's own homogeneity (the task's `normalize`; explicit_gradient 'last' only), so that a problem
        rescaled gets its prediction rescaled exactly. No parameters change.
    """

    in_dims: int
    out_dims: int
    n_positions: int
    n_embd: int = 64
    n_layer: int = 3
    n_head: int = 1
    mixer: str = "baseconv"
    conv_type: str = "short"
    causal: bool = True
    use_resid: bool = True
    use_mlps: bool = False
    mlp_activ: str = "relu"
    mlp_upfactor: int = 4
    use_seqop_ln: bool = False
    use_mlp_ln: bool = False
    use_final_ln: bool = False
    use_bias: bool = True
    train_proj: bool = True
    train_pos: bool = True
    positions: str = "table"
    dtype: str = "float64"
    scale_equivariant: bool = False

    def __post_init__(self):
        for name in ("in_dims", "out_dims", "n_positions", "n_embd", "n_layer", "n_head", "mlp_upfactor"):
            check_int(name, getattr(self, name), 1)
        for name in ("causal", "use_resid", "use_mlps", "use_seqop_ln", "use_mlp_ln", "use_final_ln",
                     "use_bias", "train_proj", "train_pos", "scale_equivariant"):
            check_flag(name, getattr(self, name))
        check_choice("mixer", self.mixer, MIXERS)
        check_choice("conv_type", self.conv_type, CONV_TYPES)
        check_choice("mlp_activ", self.mlp_activ, ACTIVATIONS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("positions", self.positions, POSITIONS)
        if self.mixer != "baseconv":
            require("n_head", self.n_head, self.n_embd % self.n_head == 0, f"divisors of n_embd={self.n_embd}")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
