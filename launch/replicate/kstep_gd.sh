#!/usr/bin/env bash
# k-step GD: BaseConv, 6 layers, learns x_4 of gradient descent (eta 0.5).
set -euo pipefail
FAMILY=kstep_gd
DESCRIPTION="k-step GD (configs/multistep_gd.py): k = 4, eta = 0.5, data seed 1; lr 1e-2, step-threshold
3000 x 0.9, EMA off, 1M steps (the published command line, which overrode the yaml)."
# shellcheck source=launch/replicate/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
replicate_init "$@"

run k4 multistep_gd.py --config.task.num_iters=4 --config.task.eta=0.5 --config.optim.schedule=step \
  --config.optim.lr=1e-2 --config.optim.step_rate=3000 --config.optim.ema_lambda=0.0 \
  --config.train.num_steps=1000000

replicate_done
