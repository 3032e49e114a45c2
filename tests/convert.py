"""Load the PyTorch reference's TransformerModel state_dicts into our models.

The reference stores Linear weights as (out, in) with y = x W^T + b; a Flax Dense kernel is W^T. Its short
convolution is a Conv1d cross-correlation (see short_filter_from_reference); its long filter is
already by lag; attention packs q, k, v in row blocks of c_attn, which become column blocks of our kernel.
Frozen read-in/read-out (train_proj=False) and positions (train_pos=False) hold no parameters here, so the
converter checks that the reference's are the identities and zeros it would otherwise drop.
"""
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from lsq_jax.config.model import ModelConfig

_MIXERS = {("base_conv", True): "baseconv", ("base_conv", False): "baseconv",
           ("attn", True): "attention", ("attn", False): "linear_attention"}
_SHARED_FIELDS = ("in_dims", "out_dims", "n_positions", "n_embd", "n_layer", "n_head", "conv_type", "causal",
                  "use_resid", "use_mlps", "mlp_activ", "mlp_upfactor", "use_seqop_ln", "use_mlp_ln",
                  "use_final_ln", "use_bias", "train_proj", "train_pos")


def short_filter_from_reference(weight_Ex1xK):
    """Reference Conv1d weight (E, 1, K) -> our lag-indexed filter (E, K): tap K-1-s is lag s."""
    return jnp.asarray(weight_Ex1xK)[:, 0, ::-1]


def short_filter_to_reference(filter_ExK):
    """Our lag-indexed filter (E, K) -> the reference's Conv1d weight (E, 1, K)."""
    return jnp.asarray(filter_ExK)[:, None, ::-1]


def config_from_reference(constructor_args: Mapping, dtype: str = "float64") -> ModelConfig:
    """ModelConfig equivalent to the reference's TransformerModel(**constructor_args)."""
    key = (constructor_args["seq_op"], bool(constructor_args.get("use_softmax_for_attn", True)))
    if key not in _MIXERS:
        raise ValueError(f"seq_op={key[0]!r} is not supported: must be base_conv or attn")
    fields = {name: constructor_args[name] for name in _SHARED_FIELDS if name in constructor_args}
    return ModelConfig(mixer=_MIXERS[key], dtype=dtype, **fields)


def _dense(sd, prefix, use_bias=True):
    out = {"kernel": sd[prefix + ".weight"].T}
    if use_bias:
        out["bias"] = sd[prefix + ".bias"]
    return out


def _layer_norm(sd, prefix, use_bias):
    out = {"scale": sd[prefix + ".weight"]}
    if use_bias:
        out["bias"] = sd[prefix + ".bias"]
    return out


def _check_frozen(sd, name, expected):
    if name in sd and not np.array_equal(np.asarray(sd[name]), expected):
        raise ValueError(f"{name} is frozen in this configuration but is not the identity/zero it must be")


def _baseconv(sd, prefix, cfg):
    p = {name: _dense(sd, f"{prefix}.{name}") for name in ("in_proj", "projection", "out_proj")}
    if cfg.use_resid:
        p["branch_weights"] = sd[prefix + ".branch_weights"]
    if cfg.conv_type == "short":
        p["conv"] = {"filter": np.asarray(short_filter_from_reference(sd[prefix + ".conv.conv.weight"])),
                     "bias": sd[prefix + ".conv.conv.bias"]}
    elif cfg.conv_type == "long":
        p["conv"] = {"filter": sd[prefix + ".conv.filter"]}
    else:
        p["conv"] = {"mlp_0": _dense(sd, prefix + ".conv.mlp.0"), "mlp_1": _dense(sd, prefix + ".conv.mlp.2")}
    return p


def params_from_reference(state_dict: Mapping, cfg: ModelConfig):
    """Our params pytree for `cfg` from a reference state_dict (names without any leading '_' stripped).

    Args:
      state_dict: reference name -> array, e.g. '_backbone.transformer.h.0.seq_mixer.base_conv.in_proj.weight'
        (a leading '_' as in the saved .npz files is accepted).
      cfg: the matching ModelConfig (see config_from_reference).
    """
    sd = {k.lstrip("_"): np.asarray(v, dtype=cfg.dtype) for k, v in state_dict.items()}
    params = {}
    if cfg.train_proj:
        params["read_in"] = _dense(sd, "read_in")
        params["read_out"] = _dense(sd, "read_out")
    else:
        _check_frozen(sd, "read_in.weight", np.eye(cfg.n_embd, cfg.in_dims))
        _check_frozen(sd, "read_out.weight", np.eye(cfg.out_dims, cfg.n_embd))
    if cfg.train_pos:
        params["wpe"] = sd["backbone.transformer.wpe.weight"]
    else:
        _check_frozen(sd, "backbone.transformer.wpe.weight", np.zeros((cfg.n_positions, cfg.n_embd)))
    for i in range(cfg.n_layer):
        prefix = f"backbone.transformer.h.{i}"
        block = {}
        if cfg.mixer == "baseconv":
            block["mixer"] = _baseconv(sd, prefix + ".seq_mixer.base_conv", cfg)
        else:
            block["mixer"] = {name: _dense(sd, f"{prefix}.seq_mixer.{name}", cfg.use_bias)
                              for name in ("c_attn", "c_proj")}
        if cfg.use_seqop_ln:
            block["ln_1"] = _layer_norm(sd, prefix + ".ln_1", cfg.use_bias)
        if cfg.use_mlps:
            if cfg.use_mlp_ln:
                block["ln_2"] = _layer_norm(sd, prefix + ".ln_2", cfg.use_bias)
            mlp = {name: _dense(sd, f"{prefix}.mlp.{name}", cfg.use_bias) for name in ("c_fc", "c_proj")}
            if cfg.mlp_activ == "glu":
                mlp.update({name: _dense(sd, f"{prefix}.mlp.activ.{name}", False) for name in ("proj1", "proj2")})
            block["mlp"] = mlp
        params[f"h_{i}"] = block
    if cfg.use_final_ln:
        params["ln_f"] = _layer_norm(sd, "backbone.transformer.ln_f", cfg.use_bias)
    return params
