#!/usr/bin/env bash
# Run lsq_jax as N cooperating JAX processes on this machine (127.0.0.1), CPU devices, gloo collectives.
#
# The same multi-controller program as on a TPU pod or a GPU cluster, without one: process 0 hosts the
# coordinator on a free local port, every process trains on its share of the global batch, and the
# gradient all-reduce goes through gloo. Useful to try a multi-process run, or to debug one.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [options] N [main args...]

Starts N processes of `python -m lsq_jax.main [main args...] --distributed=explicit
--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I` on this machine, waits for all of
them, and exits with the first non-zero status (after stopping the others) or 0.

Options (before N):
  --devices-per-process=K  emulate K CPU devices in each process (XLA_FLAGS=
                           --xla_force_host_platform_device_count=K); default 1, or $LSQ_DEVICES_PER_PROCESS
  --port=P                 coordinator port (default: a free one, or $LSQ_PORT)
  --log-dir=DIR            where processes 1..N-1 write process_I.log (default: a new temporary folder);
                           process 0 writes to this terminal
  --timeout=S              stop every process after S seconds (default 0: no limit)
  --dry-run                print the N commands instead of running them
  -h, --help               this text

Environment: PYTHON (default: python), JAX_PLATFORMS (default: cpu),
JAX_CPU_COLLECTIVES_IMPLEMENTATION (default: gloo). The workdir (--workdir=...) is shared by all processes.

Example:
  launch/local_multiprocess.sh --devices-per-process=2 2 --config=configs/baseconv.py:smoke --workdir=/tmp/mp
EOF
}

die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }

devices="${LSQ_DEVICES_PER_PROCESS:-1}"
port="${LSQ_PORT:-}"
log_dir=""
timeout_s=0
dry_run=0
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --devices-per-process=*) devices="${1#*=}"; shift ;;
    --port=*) port="${1#*=}"; shift ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --timeout=*) timeout_s="${1#*=}"; shift ;;
    --devices-per-process|--port|--log-dir|--timeout)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}" ;;
    -*) die "unknown option $1 (options come before N; see --help)" ;;
    *) break ;;
  esac
done
(($#)) || { usage >&2; exit 2; }
num_processes="$1"; shift
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "N=$num_processes is not allowed: must be a positive integer"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process=$devices is not allowed: must be a positive integer"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "--timeout=$timeout_s is not allowed: must be a whole number of seconds"
for arg in "$@"; do
  case "$arg" in
    --distributed*|--coordinator_address*|--num_processes*|--process_id*)
      die "$arg is set by this launcher; leave it out" ;;
  esac
done

python="${PYTHON:-python}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "$port" ]]; then
  if ((dry_run)); then
    port=PORT
  else
    # a port the system just handed out (bind to port 0), so almost surely still free
    finder=python3
    command -v "$finder" >/dev/null 2>&1 || finder="$python"
    port="$("$finder" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
[[ "$port" == PORT || "$port" =~ ^[0-9]+$ ]] || die "--port=$port is not allowed: must be a port number"

xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
# emulated devices are threads of one process: on a busy machine one may reach a collective long after
# another, and XLA's default 40 s rendezvous limit would abort the run
((devices == 1)) || xla_flags+=" --xla_cpu_collective_call_terminate_timeout_seconds=600"
run_env=(
  "PYTHONPATH=$repo_root${PYTHONPATH:+:$PYTHONPATH}"
  "JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}"
  "JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}"
  "XLA_FLAGS=$xla_flags"
)

command_for() {  # the argv of process $1
  cmd=(env "${run_env[@]}" "$python" -m lsq_jax.main "${@:2}" --distributed=explicit
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes" "--process_id=$1")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    command_for "$i" "$@"
    printf '%q ' "${cmd[@]}"; echo
  done
  exit 0
fi

if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/lsq_jax_mp.XXXXXX")"
fi
mkdir -p "$log_dir"

pids=()
stop_all() {  # TERM (main.py saves a checkpoint at the next step if it can), then KILL what is left
  local pid alive
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 1 20); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.5 || true
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap 'echo "local_multiprocess.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

# Job control while starting them: each process (and anything it starts) gets its own process group, with
# id = its pid, so that stopping it reaches its children too. Off again to keep bash's job notices quiet.
set -m
for ((i = 0; i < num_processes; i++)); do
  command_for "$i" "$@"
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
set +m
((num_processes == 1)) || echo "local_multiprocess.sh: $num_processes processes on 127.0.0.1:$port; logs of processes 1..$((num_processes - 1)) in $log_dir" >&2

# Poll rather than `wait`: a process whose peer died blocks in a collective (or aborts after the
# coordinator's timeout), so the first failure has to stop the others.
remaining=("${!pids[@]}")
start=$SECONDS
while ((${#remaining[@]})); do
  still=()
  for i in "${remaining[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    rc=0
    wait "${pids[$i]}" || rc=$?
    if ((rc != 0)); then
      echo "local_multiprocess.sh: process $i exited with status $rc; stopping the others" >&2
      if ((i > 0)); then tail -n 20 "$log_dir/process_$i.log" >&2 || true; fi
      stop_all
      exit "$rc"
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if ((timeout_s > 0 && SECONDS - start >= timeout_s && ${#remaining[@]})); then
    echo "local_multiprocess.sh: --timeout=$timeout_s reached; stopping all processes" >&2
    stop_all
    exit 124
  fi
  if ((${#remaining[@]})); then sleep 0.2 || true; fi
done
exit 0
