"""Explicit gradient (the default run, ): BaseConv short, 3 layers, width 64, learns one GD step.

Task explicit_gradient 'last', D = 5, L = 20 (L_max 21): from tokens [x0, 0], [a_i, b_i] predict
A^T (A x0 - b) / L. Recipe: Adam lr 1e-2 (eps 1e-16), adaptive LR step_rate 3000 gamma 0.9, EMA over
gradients 0.98 / 2.0, 2.5M steps of batch 1024.

    python -m lsq_jax.main --config=configs/baseconv.py            # published size
    python -m lsq_jax.main --config=configs/baseconv.py:cpu        # batch 128, lr 3e-3: ~3 min on 2 cores
    python -m lsq_jax.main --config=configs/baseconv.py:smoke      # < 60 s
    python -m lsq_jax.main --config=configs/baseconv.py:lm         # Levenberg-Marquardt, D = 3, width 16
    python -m lsq_jax.main --config=configs/baseconv.py:lm_general # the same over rows, kappa and scale
"""
from lsq_jax.config import defaults


def get_config(arg=None):
    c = defaults.base_config()
    c.name = "baseconv"
    c.task.name = "explicit_gradient"
    c.task.setting = "last"
    c.model.update(mixer="baseconv", conv_type="short", n_layer=3, n_embd=64)
    c.optim.update(lr=1e-2, schedule="adaptive", step_rate=3000, gamma=0.9, ema_alpha=0.98, ema_lambda=2.0)
    c.train.update(batch_size=1024, num_steps=2_500_000, log_every=1000)
    # lm: Levenberg-Marquardt from random initialisation on a size it trains in minutes on 2 cores: D = 3,
    # L = 10, width 16 (P = 3,337 parameters); one fixed batch of 4,000 problems, N x D = 12,000 residuals
    # = 3.6 P (fewer overfit the batch: the test MSE then stalls above the training loss); isotropic
    # damping (the default) with geodesic acceleration (docs/performance.md compares the variants).
    lm = {"task.n_dims": 3, "task.n_points": 10, "model.n_embd": 16, "optim.optimizer": "lm",
          "optim.lm_geodesic": True, "train.batch_size": 4000, "train.num_steps": 200, "train.log_every": 10,
          "train.checkpoint_every": 25, "train.grad_stats_batches": 0, "optim.schedule": "step"}
    return defaults.apply_variant(
        c, arg,
        # cpu: batch 128 instead of 1024, so a smaller lr (3e-3: 1e-2 stalls near MSE 0.3 at this batch)
        cpu={"train.batch_size": 128, "train.num_steps": 16_000, "train.log_every": 500, "optim.lr": 3e-3,
             "optim.step_rate": 1500, "train.grad_stats_batches": 16, "train.checkpoint_every": 2000},
        smoke={"train.batch_size": 32, "train.num_steps": 200, "train.log_every": 50, "optim.step_rate": 50,
               "optim.no_increase_length": 50, "train.grad_stats_batches": 4, "train.eval_batch_size": 256, "train.eval_problems": 32, "train.eval_iters": 100,
               "train.checkpoint_every": 100},
        lm=lm,
        # lm_general: the same over rows, kappa and target scale (defaults.GENERAL_RANGES)
        lm_general={**lm, **defaults.GENERAL_RANGES})
