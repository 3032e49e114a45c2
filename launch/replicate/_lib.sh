# shellcheck shell=bash
# Shared by the replication scripts of launch/replicate/: options, and `run NAME CONFIG [overrides...]`,
# which prints or runs one training command. Sourced, not executed.
#
# A script sets FAMILY and DESCRIPTION, sources this file, calls `replicate_init "$@"`, then `run` once per
# training run of its family.

replicate_usage() {
  cat <<EOF
Usage: launch/replicate/$FAMILY.sh [options] [-- main args for every run...]

$DESCRIPTION

Each run is one command
  python -m lsq_jax.main --config=configs/X.py[:ARG] [--config.a.b=v ...] --workdir=ROOT/$FAMILY/RUN
run one after the other here, or handed to a launcher (LAUNCHER="launch/slurm_gpu.sbatch" submits each with
sbatch; LAUNCHER="launch/local_multiprocess.sh 2" runs each as 2 local processes; LAUNCHER="launch/tpu_pod.sh
--name=NAME --zone=ZONE" runs each on a TPU pod, with a gs:// ROOT). A run whose workdir already holds
checkpoints resumes; a finished run is only evaluated again.

Options:
  --dry-run           print the commands and stop
  --only=REGEX        only the runs whose name matches (bash regex), e.g. --only='^adaptive_'
  --workdir-root=DIR  ROOT (default \$LSQ_WORKDIR_ROOT, else runs/replicate)
  --variant=V         append V (cpu or smoke) to every config argument: the same sweep, laptop-sized
                      (the variant's num_steps and step_rate replace the sweep's; its model sizes stay)
  --float32           --config.dtype=float32 on every run: the reference's precision (ours is float64)
  -h, --help          this text
Environment: PYTHON (default python), LAUNCHER (default: none, run here).
EOF
}

replicate_init() {
  DRY_RUN=0
  ONLY=""
  ROOT="${LSQ_WORKDIR_ROOT:-runs/replicate}"
  VARIANT=""
  EXTRA=()
  while (($#)); do
    case "$1" in
      -h|--help) replicate_usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --only=*) ONLY="${1#*=}" ;;
      --workdir-root=*) ROOT="${1#*=}" ;;
      --variant=*) VARIANT="${1#*=}" ;;
      --float32) EXTRA+=(--config.dtype=float32) ;;
      --) shift; EXTRA+=("$@"); break ;;
      *) echo "$FAMILY.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  case "$VARIANT" in
    ""|cpu|smoke) ;;
    *) echo "$FAMILY.sh: --variant=$VARIANT is not allowed: must be cpu or smoke" >&2; exit 2 ;;
  esac
  read -r -a LAUNCHER_CMD <<<"${LAUNCHER:-}"
  PYTHON_CMD="${PYTHON:-python}"
  RUNS=0
}

quote_words() {  # one line of shell words, single-quoted only where needed
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s\n' "${out[*]}"
}

# run NAME CONFIG [--config.a.b=v ...]: the run ROOT/FAMILY/NAME of configs/CONFIG
run() {
  local name="$1" config="$2"
  shift 2
  if [[ -n "$ONLY" && ! "$name" =~ $ONLY ]]; then
    return 0
  fi
  if [[ -n "$VARIANT" ]]; then
    if [[ "$config" == *:* ]]; then config="$config,$VARIANT"; else config="$config:$VARIANT"; fi
  fi
  local args=("--config=configs/$config") arg
  for arg in "$@"; do
    # a variant's own run length and LR step rate win over the sweep's (the sweep's model sizes stay)
    if [[ -n "$VARIANT" && ( "$arg" == --config.train.num_steps=* || "$arg" == --config.optim.step_rate=* ) ]]; then
      continue
    fi
    args+=("$arg")
  done
  args+=("${EXTRA[@]+"${EXTRA[@]}"}" "--workdir=$ROOT/$FAMILY/$name")
  local cmd
  if ((${#LAUNCHER_CMD[@]})); then
    cmd=("${LAUNCHER_CMD[@]}" "${args[@]}")
  else
    cmd=("$PYTHON_CMD" -m lsq_jax.main "${args[@]}")
  fi
  RUNS=$((RUNS + 1))
  quote_words "${cmd[@]}"
  if ((DRY_RUN == 0)); then
    "${cmd[@]}" || { echo "$FAMILY.sh: run $name failed (status $?)" >&2; exit 1; }
  fi
}

replicate_done() {
  ((RUNS > 0)) || { echo "$FAMILY.sh: no run matches --only=$ONLY" >&2; exit 2; }
  echo "# $FAMILY: $RUNS runs" >&2
}
