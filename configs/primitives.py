"""Primitives: read, linear, multiply, square, identity, with BaseConv or softmax attention.

E = 64, MLP x4, D = 20, L = 40; Adam lr 1e-3, step-threshold 10000 x 0.9, 1M steps. Argument: the
primitive, optionally the mixer (baseconv, the default, or attention with 2 heads), optionally the size.

    python -m lsq_jax.main --config=configs/primitives.py:multiply            # BaseConv
    python -m lsq_jax.main --config=configs/primitives.py:read,attention,cpu
"""
from lsq_jax.config import defaults

PRIMITIVES = {"read": ("read", 20), "linear": ("linear", 1), "multiply": ("elementwise_multiply", 10),
              "square": ("square", 20), "identity": ("identity", 20)}
MIXERS = ("baseconv", "attention")


def get_config(arg=None):
    parts = defaults.split_arg(arg) or ["multiply"]
    allowed = set(PRIMITIVES) | set(MIXERS) | {"cpu", "smoke"}
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise ValueError(f"config argument {unknown[0]!r} is not allowed: use one of {', '.join(sorted(allowed))}")
    primitive = next((p for p in parts if p in PRIMITIVES), "multiply")
    mixer = next((p for p in parts if p in MIXERS), "baseconv")
    variant = "".join(p for p in parts if p in ("cpu", "smoke"))
    task_name, out_dims = PRIMITIVES[primitive]
    c = defaults.base_config()
    c.name = f"primitives_{primitive}_{mixer}"
    c.task.update(name=task_name, n_dims=20, n_points=40)
    c.model.update(mixer=mixer, n_layer=2, n_embd=64, n_head=2, use_mlps=True, mlp_upfactor=4, out_dims=out_dims)
    c.optim.update(lr=1e-3, schedule="step", step_rate=10_000, gamma=0.9)
    c.train.update(batch_size=1024, num_steps=1_000_000)
    return defaults.apply_variant(
        c, variant,
        cpu={"train.batch_size": 64, "train.num_steps": 3000, "train.log_every": 250, "optim.step_rate": 1000,
             "train.grad_stats_batches": 16, "train.checkpoint_every": 1000},
        smoke={"train.batch_size": 16, "train.num_steps": 100, "train.log_every": 25, "optim.step_rate": 50,
               "train.grad_stats_batches": 4, "train.eval_batch_size": 256, "train.eval_problems": 32, "train.eval_iters": 100, "train.checkpoint_every": 50})
