#!/usr/bin/env bash
# Least squares end to end: depth sweep for softmax attention and for BaseConv, same recipe.
set -euo pipefail
FAMILY=least_squares_layers
DESCRIPTION="Least squares (configs/transformer_lsq.py): a Transformer (causal, width 256, 8 heads, MLP x4,
all LayerNorms) and the same network with BaseConv as the mixer, 1 to 64 layers; lr 1e-4, step-threshold
10000 x 0.9, 1M steps."
# shellcheck source=launch/replicate/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
replicate_init "$@"

for mixer in attention baseconv; do
  config=transformer_lsq.py
  [[ $mixer == attention ]] || config=transformer_lsq.py:baseconv
  for layers in 1 2 4 8 12 16 24 32 48 64; do
    run "${mixer}_layers$layers" "$config" --config.model.n_layer=$layers --config.optim.lr=1e-4 \
      --config.optim.schedule=step --config.optim.step_rate=10000 --config.train.num_steps=1000000
  done
done

replicate_done
