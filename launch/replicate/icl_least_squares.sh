#!/usr/bin/env bash
# In-context least squares: the 12-layer Transformer predicts each b_i from the tokens before it.
set -euo pipefail
FAMILY=icl_least_squares
DESCRIPTION="In-context least squares (configs/transformer_icl.py): 12-layer Transformer, 'neighboring'
tokens, curriculum over points 6 -> 20 (+2 every 10,000 steps); lr 1e-4, step-threshold 10000 x 0.9, 1M steps."
# shellcheck source=launch/replicate/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
replicate_init "$@"

run transformer_layers12 transformer_icl.py --config.model.n_layer=12 --config.model.mixer=attention \
  --config.optim.lr=1e-4 --config.optim.schedule=step --config.optim.step_rate=10000 \
  --config.train.num_steps=1000000

replicate_done
