#!/usr/bin/env bash
# Explicit gradient (the paper's "learning one GD step" runs and their ablations).
set -euo pipefail
FAMILY=explicit_gradient
DESCRIPTION="Explicit gradient, BaseConv (configs/baseconv.py): step-threshold vs adaptive LR over initial
learning rates (EMA over gradients on); EMA off over initial learning rates; the step-rate ablation; MLPs
and LayerNorm on/off; linear attention (configs/linear_attention.py) and its softmax sanity check."
# shellcheck source=launch/replicate/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
replicate_init "$@"

# Step-threshold vs adaptive LR (step_rate 3000, gamma 0.9), EMA 0.98 / 2.0, the config's 2.5M steps.
for lr in 1e-2 3e-3 1e-3 3e-4; do
  for schedule in step adaptive; do
    run "${schedule}_lr$lr" baseconv.py --config.optim.schedule=$schedule --config.optim.lr=$lr \
      --config.optim.step_rate=3000 --config.optim.gamma=0.9
  done
done

# EMA over gradients off, step-threshold LR, 1M steps, over initial learning rates.
for lr in 1e-2 1e-3 1e-4 1e-5; do
  run "noema_step_lr$lr" baseconv.py --config.optim.schedule=step --config.optim.lr=$lr \
    --config.optim.step_rate=3000 --config.optim.gamma=0.9 --config.optim.ema_lambda=0.0 \
    --config.train.num_steps=1000000
done

# Step-rate ablation, EMA off, 1M steps. lr 1e-5 as in the published script (its loop reused the last
# initial lr of the sweep above).
for rate in 1000 3000 10000 30000; do
  run "noema_step_lr1e-5_rate$rate" baseconv.py --config.optim.schedule=step --config.optim.lr=1e-5 \
    --config.optim.step_rate=$rate --config.optim.gamma=0.9 --config.optim.ema_lambda=0.0 \
    --config.train.num_steps=1000000
done

# MLPs and the LayerNorm before the mixer (LN1) on/off: lr 1e-3, step-threshold 10000 x 0.9, EMA on, 1M steps.
for mlp in true false; do
  for ln in true false; do
    run "mlp_${mlp}_ln_${ln}" baseconv.py --config.model.use_mlps=$mlp --config.model.use_seqop_ln=$ln \
      --config.optim.schedule=step --config.optim.lr=1e-3 --config.optim.step_rate=10000 \
      --config.optim.gamma=0.9 --config.train.num_steps=1000000
  done
done

# Linear attention (3 layers, width 256, 16 heads, non-causal), and softmax attention as a sanity check.
run linear_attention linear_attention.py
run softmax_attention linear_attention.py:softmax

replicate_done
