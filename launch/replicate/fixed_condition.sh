#!/usr/bin/env bash
# Least squares with a fixed condition number: kappa(A) = 5, the 12-layer Transformer.
set -euo pipefail
FAMILY=fixed_condition
DESCRIPTION="Least squares with condition number 5 (configs/transformer_lsq.py:kappa5): 12-layer
Transformer, lr 1e-4, step-threshold 10000 x 0.9, 1M steps."
# shellcheck source=launch/replicate/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
replicate_init "$@"

run kappa5 transformer_lsq.py:kappa5 --config.task.scale_cond=5.0 --config.model.n_layer=12 \
  --config.optim.lr=1e-4 --config.optim.schedule=step --config.optim.step_rate=10000 \
  --config.train.num_steps=1000000

replicate_done
