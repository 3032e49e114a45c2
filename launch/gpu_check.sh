#!/usr/bin/env bash
# The GPU check: the throughput benchmark in float64 and float32, the :lm config, and the published config
# for a few thousand steps, each with its figures printed at the end. Without a GPU it runs the same three
# steps at toy sizes on the CPU (float64 only; under a minute): a check of the script, not of a GPU.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_check.sh [--out=DIR] [--steps=N]

From the repository root, on a machine with a GPU (after pip install -e '.[test]' and jax[cuda12]):
  1. python -m lsq_jax.bench --bench=throughput --dtypes=float64,float32 (the published config)
  2. python -m lsq_jax.main --config=configs/baseconv.py:lm                 (LM, to its 200 iterations)
  3. python -m lsq_jax.main --config=configs/baseconv.py for N steps        (Adam, published size)
then prints steps/s, wall-clock and test MSE of each, and the learned solver's iterated error.

Options:
  --out=DIR    where the workdirs and bench JSON go (default: gpu_check); it is replaced
  --steps=N    steps of the published config (default 3000)
  -h, --help   this text

Environment: PYTHON (default: python). With no GPU visible to JAX, toy sizes on the CPU.
EOF
}

die() { echo "gpu_check.sh: $*" >&2; exit 2; }

out="gpu_check"
steps=3000
for arg in "$@"; do
  case "$arg" in
    --out=*) out="${arg#--out=}" ;;
    --steps=*) steps="${arg#--steps=}" ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$arg' (allowed: --out=DIR, --steps=N, --help)" ;;
  esac
done
[[ -n "$out" ]] || die "--out is empty (allowed: a directory)"
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || die "--steps=$steps is not allowed (allowed: an integer >= 1)"

cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
backend="$("$py" -c 'import jax; print(jax.default_backend())')"
"$py" -c 'import jax; print("jax", jax.__version__, "devices:", jax.devices())'

if [[ "$backend" == "gpu" ]]; then
  throughput=(--config=configs/baseconv.py --dtypes=float64,float32)
  lm=(--config=configs/baseconv.py:lm)
  published=(--config=configs/baseconv.py "--config.train.num_steps=$steps" --config.train.log_every=500
             --config.train.checkpoint_every=1000)
else
  echo "no GPU (JAX backend: $backend): the CPU fallback at toy sizes"
  # one model and task size for both runs (the :lm variant's): with a compilation cache
  # (JAX_COMPILATION_CACHE_DIR) the second run's report reuses everything the first's compiled
  toy=(--config.model.n_layer=1 --config.model.n_embd=16 --config.task.n_dims=3 --config.task.n_points=10
       --config.train.eval_problems=4 --config.train.eval_iters=5 --config.train.eval_batch_size=32)
  throughput=(--config=configs/baseconv.py:smoke --config.model.n_layer=1 --dtypes=float64 --windows=1
              --window_s=0.1)
  lm=(--config=configs/baseconv.py:lm --config.train.num_steps=2 --config.train.batch_size=64 "${toy[@]}")
  published=(--config=configs/baseconv.py:smoke --config.train.num_steps=10 --config.train.log_every=5 "${toy[@]}")
fi

rm -rf "$out"
mkdir -p "$out"
"$py" -m lsq_jax.bench --bench=throughput "${throughput[@]}" --out="$out/throughput.json"
for run in lm published; do
  declare -n run_args="$run"
  start=$SECONDS
  "$py" -m lsq_jax.main "${run_args[@]}" --workdir="$out/$run"
  echo "$((SECONDS - start))" > "$out/$run/wall_s"
done

"$py" - "$out" <<'EOF'
"""The figures of the three steps, from what they wrote."""
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
for row in json.loads((out / "throughput.json").read_text()).get("throughput", []):
    print(f"throughput {row.get('dtype')}: {row.get('steps_per_s')} steps/s")
for run in ("lm", "published"):
    work = out / run
    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [line for line in lines if "eval_mse" in line]
    report = json.loads((work / "eval" / "report.json").read_text())
    learned = report.get("iterated", {}).get("methods", {}).get("learned", {})
    print(f"{run}: {(work / 'wall_s').read_text().strip()} s in all, steps {final[-1]['step'] if final else '?'}, "
          f"test MSE {final[-1]['eval_mse'] if final else '?'}, iterated final error "
          f"{learned.get('final_forward_error')}, contraction {learned.get('contraction')}")
EOF
