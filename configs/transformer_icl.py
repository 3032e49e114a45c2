"""In-context least squares: a softmax Transformer predicts each b_i from the tokens before it.

least_squares_icl 'neighboring' (2L-1 tokens), L_max 39, read-out width 1; Transformer as in
transformer_lsq.py; Adam lr 1e-4, step-threshold 10000 x 0.9, 1M steps; curriculum over points 6 -> 20,
+2 every 10,000 steps, dims fixed at 5.

    python -m lsq_jax.main --config=configs/transformer_icl.py[:cpu|:smoke]
    python -m lsq_jax.main --config=configs/transformer_icl.py:lm     # Levenberg-Marquardt, D = 3, L = 10

`lm`: Levenberg-Marquardt at the size of configs/transformer_lsq.py:lm (2 blocks, width 12, 2 heads,
MLP x4: P = 4,093) on D = 3, L = 10 (19 tokens, 10 answers read); one fixed batch of 1,400 problems
(14,000 residuals = 3.4 P), isotropic damping with geodesic acceleration, 200 iterations. Without the
curriculum: it eases stochastic gradient descent into the task by growing L; LM fits one fixed batch at
its final size from the first iteration, and a batch whose L changed would restart LM's damping on a new
objective. The first D answers of a prompt are not determined by the points before them, so the training
loss has a floor above zero (the mean over prompts of what a posterior mean still misses).
"""
from lsq_jax.config import defaults


def get_config(arg=None):
    c = defaults.base_config()
    c.name = "transformer_icl"
    c.task.update(name="least_squares_icl", setting="neighboring", n_dims=5, n_points=20)
    c.model.update(mixer="attention", n_layer=12, n_embd=256, n_head=8, causal=True, use_mlps=True,
                   mlp_activ="relu", use_seqop_ln=True, use_mlp_ln=True, use_final_ln=True, n_positions=39,
                   out_dims=1)
    c.optim.update(lr=1e-4, schedule="step", step_rate=10_000, gamma=0.9)
    c.curriculum.points.update(start=6, inc=2, interval=10_000)
    c.train.update(batch_size=1024, num_steps=1_000_000)
    return defaults.apply_variant(
        c, arg,
        cpu={"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "train.batch_size": 128,
             "train.num_steps": 3000, "train.log_every": 250, "optim.step_rate": 1000, "optim.lr": 1e-3,
             "curriculum.points.interval": 300, "train.grad_stats_batches": 16,
             "train.checkpoint_every": 1000},
        smoke={"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "train.batch_size": 32,
               "train.num_steps": 100, "train.log_every": 25, "optim.step_rate": 50,
               "curriculum.points.interval": 40, "train.grad_stats_batches": 4,
               "train.eval_batch_size": 256, "train.eval_problems": 32, "train.eval_iters": 100, "train.checkpoint_every": 50},
        # lm: see the docstring
        lm={"task.n_dims": 3, "task.n_points": 10, "model.n_layer": 2, "model.n_embd": 12, "model.n_head": 2,
            "model.n_positions": 19, "curriculum.points.start": None, "optim.optimizer": "lm",
            "optim.lm_geodesic": True, "train.batch_size": 1400, "train.num_steps": 200, "train.log_every": 10,
            "train.checkpoint_every": 25, "train.grad_stats_batches": 0})
