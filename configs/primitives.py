"""Primitives: read, linear, multiply, square, identity, with BaseConv, softmax or linear attention.

E = 64, MLP x4, D = 20, L = 40; Adam lr 1e-3, step-threshold 10000 x 0.9, 1M steps. Argument: the
primitive, optionally the mixer (baseconv, the default; attention, softmax with 2 heads; linear_attention,
2 heads), optionally the size. The read-out width is the task's (D, 1 for linear, D/2 for multiply).

    python -m lsq_jax.main --config=configs/primitives.py:multiply            # BaseConv
    python -m lsq_jax.main --config=configs/primitives.py:read,attention,cpu
    python -m lsq_jax.main --config=configs/primitives.py:multiply,attention,lm   # Levenberg-Marquardt

`lm` trains with Levenberg-Marquardt at a size 2 cores train in minutes: D = 4, L = 8, 2 blocks, no MLP,
width 17 for BaseConv and 16 for either attention, so that the three mixers hold about the same number of
parameters (multiply: P = 2,403, 2,418, 2,418); one fixed batch of problems with 12,000 residuals (about
5 P), isotropic damping with geodesic acceleration, 100 iterations (docs/performance.md).
"""
import math

from lsq_jax.config import defaults

PRIMITIVES = {"read": "read", "linear": "linear", "multiply": "elementwise_multiply", "square": "square",
              "identity": "identity"}
MIXERS = ("baseconv", "attention", "linear_attention")
VARIANTS = ("cpu", "smoke", "lm")
LM_DIMS, LM_POINTS = 4, 8
# width per mixer under lm, matching the parameter counts: 2,403 (BaseConv), 2,418 (either attention) at
# multiply's read width
LM_WIDTH = {"baseconv": 17, "attention": 16, "linear_attention": 16}
LM_RESIDUALS = 12_000


def _read_width(primitive: str, n_dims: int) -> int:
    return {"linear": 1, "multiply": n_dims // 2}.get(primitive, n_dims)


def get_config(arg=None):
    parts = defaults.split_arg(arg) or ["multiply"]
    allowed = set(PRIMITIVES) | set(MIXERS) | set(VARIANTS)
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise ValueError(f"config argument {unknown[0]!r} is not allowed: use one of {', '.join(sorted(allowed))}")
    primitive = next((p for p in parts if p in PRIMITIVES), "multiply")
    mixer = next((p for p in parts if p in MIXERS), "baseconv")
    variant = "".join(p for p in parts if p in VARIANTS)
    c = defaults.base_config()
    c.name = f"primitives_{primitive}_{mixer}"
    c.task.update(name=PRIMITIVES[primitive], n_dims=20, n_points=40)
    c.model.update(mixer=mixer, n_layer=2, n_embd=64, n_head=2, use_mlps=True, mlp_upfactor=4,
                   out_dims=_read_width(primitive, 20))
    c.optim.update(lr=1e-3, schedule="step", step_rate=10_000, gamma=0.9)
    c.train.update(batch_size=1024, num_steps=1_000_000)
    lm_problems = math.ceil(LM_RESIDUALS / (LM_POINTS * _read_width(primitive, LM_DIMS)))
    return defaults.apply_variant(
        c, variant,
        cpu={"train.batch_size": 64, "train.num_steps": 3000, "train.log_every": 250, "optim.step_rate": 1000,
             "train.grad_stats_batches": 16, "train.checkpoint_every": 1000},
        smoke={"train.batch_size": 16, "train.num_steps": 100, "train.log_every": 25, "optim.step_rate": 50,
               "train.grad_stats_batches": 4, "train.eval_batch_size": 256, "train.eval_problems": 32, "train.eval_iters": 100, "train.checkpoint_every": 50},
        # lm: one fixed batch with LM_RESIDUALS residuals (L x read width per problem), isotropic damping with
        # geodesic acceleration, as configs/baseconv.py:lm
        lm={"task.n_dims": LM_DIMS, "task.n_points": LM_POINTS, "model.n_embd": LM_WIDTH[mixer],
            "model.out_dims": _read_width(primitive, LM_DIMS),
            "model.use_mlps": False, "optim.optimizer": "lm", "optim.lm_geodesic": True,
            "train.batch_size": lm_problems, "train.num_steps": 100, "train.log_every": 10,
            "train.checkpoint_every": 25, "train.grad_stats_batches": 0,
            # read's pair at L = 8: task seed 0 draws (7, 7), a position read into itself (the identity
            # task); 1 draws (4, 5)
            **({"task.task_seed": 1} if primitive == "read" else {})})
