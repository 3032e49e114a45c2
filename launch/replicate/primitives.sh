#!/usr/bin/env bash
# Numerical primitives: depth x LayerNorm sweeps, and width / heads / MLP / training-length
# sweeps on elementwise multiplication.
set -euo pipefail
FAMILY=primitives
DESCRIPTION="Primitives (configs/primitives.py; lr 1e-3, step-threshold 10000 x 0.9, 1M steps unless
stated): read, linear, multiply x attention, BaseConv x LN1 on/off x 1, 2, 4, 8 layers; on multiply with
2-layer attention (width 256, 1 head, LN1 on): width 32..256, heads 1..8, MLP factor 1..8; training length
1e5..1e8 steps (step_rate = steps / 100, LN1 off) for attention and BaseConv."
# shellcheck source=launch/replicate/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
replicate_init "$@"

recipe=(--config.optim.lr=1e-3 --config.optim.schedule=step --config.optim.step_rate=10000)

# Depth x LN1 (the LayerNorm before the sequence mixer), 1M steps.
for primitive in read linear multiply; do
  for mixer in attention baseconv; do
    for ln in true false; do
      for layers in 1 2 4 8; do
        run "${primitive}_${mixer}_ln_${ln}_layers$layers" "primitives.py:$primitive,$mixer" \
          --config.model.n_layer=$layers --config.model.use_seqop_ln=$ln "${recipe[@]}" \
          --config.train.num_steps=1000000
      done
    done
  done
done

# Multiply, 2-layer attention with LN1: width, then heads, then MLP width.
multiply=(--config.model.n_layer=2 --config.model.use_seqop_ln=true "${recipe[@]}" --config.train.num_steps=1000000)
for width in 32 64 128 256; do
  run "multiply_attention_width$width" primitives.py:multiply,attention \
    --config.model.n_embd=$width --config.model.n_head=1 "${multiply[@]}"
done
for heads in 1 2 4 8; do
  run "multiply_attention_heads$heads" primitives.py:multiply,attention \
    --config.model.n_embd=256 --config.model.n_head=$heads "${multiply[@]}"
done
for factor in 1 2 4 8; do
  run "multiply_attention_mlp$factor" primitives.py:multiply,attention \
    --config.model.n_embd=256 --config.model.n_head=1 --config.model.mlp_upfactor=$factor "${multiply[@]}"
done

# Training length, LN1 off: the LR steps 100 times over the run whatever its length.
for mixer in attention baseconv; do
  for steps in 100000 1000000 10000000 100000000; do
    run "multiply_${mixer}_steps$steps" "primitives.py:multiply,$mixer" --config.model.n_layer=2 \
      --config.model.use_seqop_ln=false --config.model.n_embd=256 --config.model.n_head=1 \
      --config.optim.lr=1e-3 --config.optim.schedule=step --config.optim.step_rate=$((steps / 100)) \
      --config.train.num_steps=$steps
  done
done

replicate_done
