"""Least squares solved end to end by a softmax Transformer: predict x* from [a_i, b_i].

Causal, 12 layers, width 256, 8 heads, MLP x4 relu, all LayerNorms; Adam lr 1e-4, step-threshold LR
10000 x 0.9, 1M steps. `kappa5` trains on A with condition number 5; `baseconv` swaps the mixer (the
paper's layer sweep runs both with --config.model.n_layer=N).

    python -m lsq_jax.main --config=configs/transformer_lsq.py[:kappa5][,baseconv][,cpu|,smoke|,lm]

`lm`: Levenberg-Marquardt at the size of configs/linear_attention.py:lm (D = 3, L = 10), with a parameter
count close to its 3,571: 2 blocks of width 12, 2 heads, MLP x4 (P = 4,011); one fixed batch of 4,000
problems (12,000 residuals = 3.0 P), isotropic damping with geodesic acceleration, 200 iterations.
"""
from lsq_jax.config import defaults


def get_config(arg=None):
    parts = defaults.split_arg(arg)
    variant = "".join(p for p in parts if p in ("cpu", "smoke", "lm"))
    unknown = [p for p in parts if p not in ("cpu", "smoke", "lm", "kappa5", "baseconv")]
    if unknown:
        raise ValueError(f"config argument {unknown[0]!r} is not allowed: use kappa5, baseconv, cpu, smoke, lm")
    c = defaults.base_config()
    c.name = "transformer_lsq"
    c.task.name = "least_squares"
    if "kappa5" in parts:
        c.task.scale_cond = 5.0
        c.name += "_kappa5"
    c.model.update(mixer="attention", n_layer=12, n_embd=256, n_head=8, causal=True, use_mlps=True,
                   mlp_activ="relu", use_seqop_ln=True, use_mlp_ln=True, use_final_ln=True)
    if "baseconv" in parts:
        c.model.mixer = "baseconv"
        c.name += "_baseconv"
    c.optim.update(lr=1e-4, schedule="step", step_rate=10_000, gamma=0.9)
    c.train.update(batch_size=1024, num_steps=1_000_000)
    return defaults.apply_variant(
        c, variant,
        cpu={"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "train.batch_size": 128,
             "train.num_steps": 3000, "train.log_every": 250, "optim.step_rate": 1000, "optim.lr": 1e-3,
             "train.grad_stats_batches": 16, "train.checkpoint_every": 1000},
        smoke={"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "train.batch_size": 32,
               "train.num_steps": 100, "train.log_every": 25, "optim.step_rate": 50,
               "train.grad_stats_batches": 4, "train.eval_batch_size": 256, "train.eval_problems": 32, "train.eval_iters": 100, "train.checkpoint_every": 50},
        # lm: see the docstring
        lm={"task.n_dims": 3, "task.n_points": 10, "model.n_layer": 2, "model.n_embd": 12, "model.n_head": 2,
            "optim.optimizer": "lm", "optim.lm_geodesic": True, "train.batch_size": 4000,
            "train.num_steps": 200, "train.log_every": 10, "train.checkpoint_every": 25,
            "train.grad_stats_batches": 0})
