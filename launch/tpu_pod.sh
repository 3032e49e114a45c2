#!/usr/bin/env bash
# Train lsq_jax on a Cloud TPU VM pod slice: create (or reuse) it, install the package on every worker,
# and run the same `python -m lsq_jax.main ... --distributed=auto` on all workers at once.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/PATH [options] [main args...] [-- main args...]

Steps (each printed before it runs; --dry-run prints them and stops):
  1. gcloud compute tpus tpu-vm describe NAME; if it does not exist, create it; with --spot, if it was
     preempted, delete and create it again (the run then resumes from the workdir's checkpoints)
  2. pack this source tree, copy it to every worker (--worker=all) and install it with "jax[tpu]" and the
     workdir's filesystem (gcsfs for gs://, s3fs for s3://) into ~/lsq_jax_venv (a Python >= 3.11 from uv:
     the TPU images ship Python 3.10)
  3. run python -m lsq_jax.main --config=CONFIG --workdir=WORKDIR --distributed=auto [main args...] on
     every worker; JAX finds the other workers from the TPU metadata

Options:
  --name=NAME                TPU VM name (default: $TPU_NAME, else lsq-jax)
  --zone=ZONE                zone (default: $TPU_ZONE, else us-central2-b)
  --project=PROJECT          GCP project (default: gcloud's configured one)
  --accelerator-type=TYPE    slice type when creating it, e.g. v4-32, v5litepod-16, v5p-8, v6e-8 (default v4-32)
  --version=RUNTIME          TPU software version when creating it (default: the one for the type:
                             tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite for v5litepod,
                             v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e; another is refused)
  --spot                     create a Spot slice (preemptible: after a preemption, run the same command
                             again: it deletes and recreates the slice, reinstalls and resumes)
  --config=FILE[:ARG]        config file, relative to the repository root (default configs/baseconv.py)
  --workdir=URL              output directory; must be cloud storage every worker can write (gs://...
                             or s3://...)
  --skip-install             reuse the install of an earlier call
  --detach                   start the run in the background on every worker (log: ~/lsq_jax_run.log)
                             instead of streaming its output here
  --delete-after             delete the slice when the run ends (not with --detach)
  --dry-run                  print the commands and stop
  -h, --help                 this text
Any other argument (e.g. --config.optim.lr=1e-3), and everything after --, goes to lsq_jax.main.

Example:
  launch/tpu_pod.sh --name=lsq --zone=us-central2-b --accelerator-type=v4-32 \
      --workdir=gs://my-bucket/lsq/baseconv --config=configs/baseconv.py --config.train.num_steps=100000
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name="${TPU_NAME:-lsq-jax}"
zone="${TPU_ZONE:-us-central2-b}"
project=""
accelerator_type="v4-32"
runtime_version=""
spot=0
config="configs/baseconv.py"
workdir=""
skip_install=0
detach=0
delete_after=0
dry_run=0
main_args=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --skip-install) skip_install=1 ;;
    --detach) detach=1 ;;
    --delete-after) delete_after=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator-type=*) accelerator_type="${1#*=}" ;;
    --version=*) runtime_version="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --name|--zone|--project|--accelerator-type|--version|--config|--workdir)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue ;;
    --distributed*|--coordinator_address*|--num_processes*|--process_id*)
      die "$1 is set by this launcher (--distributed=auto); leave it out" ;;
    --) shift; main_args+=("$@"); break ;;
    *) main_args+=("$1") ;;
  esac
  shift
done

[[ -n "$workdir" ]] || die "--workdir is required: a cloud storage URL every worker can write, e.g. gs://BUCKET/runs/NAME"
[[ "$workdir" =~ ^(gs|s3)://[^/]+ ]] || die "--workdir=$workdir is not allowed: must be a cloud storage URL (gs://BUCKET/PATH); every worker writes its part of the checkpoints there"
[[ -n "$name" && -n "$zone" ]] || die "--name and --zone must not be empty"
case "$accelerator_type" in  # the TPU software version each generation runs
  v2-*|v3-*|v4-*) type_runtime="tpu-ubuntu2204-base" ;;
  v5litepod-*|v5e-*) type_runtime="v2-alpha-tpuv5-lite" ;;
  v5p-*) type_runtime="v2-alpha-tpuv5" ;;
  v6e-*) type_runtime="v2-alpha-tpuv6e" ;;
  *) type_runtime="" ;;
esac
if [[ -z "$runtime_version" ]]; then
  [[ -n "$type_runtime" ]] || die "--accelerator-type=$accelerator_type: unknown type; allowed v2-*, v3-*, v4-*, v5litepod-*, v5p-*, v6e-*, or give --version=RUNTIME for it"
  runtime_version="$type_runtime"
elif [[ -n "$type_runtime" && "$runtime_version" != "$type_runtime" ]]; then
  die "--version=$runtime_version does not match --accelerator-type=$accelerator_type: allowed --version=$type_runtime (or leave --version out)"
fi
case "$workdir" in
  gs://*) fs_package="gcsfs" ;;
  *) fs_package="s3fs" ;;
esac
((delete_after == 0 || detach == 0)) || die "--delete-after cannot be combined with --detach"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config_file="${config%%:*}"
[[ -f "$repo_root/$config_file" ]] || die "--config=$config: no file $config_file in $repo_root (give the path relative to the repository root)"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z "$project" ]] || where+=("--project=$project")
tarball="${TMPDIR:-/tmp}/lsq_jax-$name.tar.gz"
remote_src="lsq_jax"       # in each worker's home directory
remote_venv="lsq_jax_venv"

quote() {  # shell words, single-quoted only where needed (readable in the printed commands)
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}
show() { echo "+ $(quote "$@")"; }
run() { show "$@"; ((dry_run)) || "$@"; }

# 1. the slice
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator_type"
        "--version=$runtime_version")
((spot == 0)) || create+=(--spot)
describe=("${gcloud_tpu[@]}" describe "$name" "${where[@]}" "--format=value(state)")
if ((dry_run)); then
  show "${describe[@]}"
  echo "# if it does not exist (with --spot, also once it was preempted, after deleting it):"
  show "${create[@]}"
else
  show "${describe[@]}"
  if state="$("${describe[@]}" 2>/dev/null)"; then
    if [[ "$state" == PREEMPTED || "$state" == TERMINATED ]]; then
      ((spot)) || die "$name is in state $state; run this command again with --spot to recreate it, or delete it: ${gcloud_tpu[*]} delete $name ${where[*]} --quiet"
      echo "tpu_pod.sh: $name is $state; deleting and creating it again (the run resumes from $workdir)"
      run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
      run "${create[@]}"
      ((skip_install == 0)) || echo "tpu_pod.sh: a new slice has no install: installing despite --skip-install"
      skip_install=0
    else
      echo "tpu_pod.sh: reusing $name (state ${state:-unknown})"
      [[ "$state" == READY ]] || die "$name is in state $state, not READY; wait, or delete it: ${gcloud_tpu[*]} delete $name ${where[*]} --quiet"
    fi
  else
    run "${create[@]}"
  fi
fi

# 2. the package on every worker
# shellcheck disable=SC2088  # ~ is for the worker's shell to expand
install_script="set -euo pipefail; rm -rf ~/$remote_src; mkdir -p ~/$remote_src; tar -xzf ~/lsq_jax.tar.gz -C ~/$remote_src; \
export PATH=~/.local/bin:\$PATH; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
[ -x ~/$remote_venv/bin/python ] || uv venv --python 3.12 ~/$remote_venv; \
uv pip install --python ~/$remote_venv/bin/python 'jax[tpu]>=0.10.2' $fs_package -e ~/$remote_src"
if ((skip_install == 0)); then
  pack=(tar -czf "$tarball" -C "$repo_root" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__
        --exclude='*.egg-info' .)
  run "${pack[@]}"
  run "${gcloud_tpu[@]}" scp "$tarball" "$name:lsq_jax.tar.gz" --worker=all "${where[@]}"
  run "${gcloud_tpu[@]}" ssh "$name" --worker=all "${where[@]}" "--command=$install_script"
fi

# 3. the same command on every worker; JAX reads the slice's workers from the TPU metadata
main_args=("--config=$config" "--workdir=$workdir" --distributed=auto "${main_args[@]+"${main_args[@]}"}")
# ~ unquoted so that each worker's shell expands it; every argument of main quoted for that shell
# shellcheck disable=SC2088
main_line="~/$remote_venv/bin/python -m lsq_jax.main $(quote "${main_args[@]}")"
if ((detach)); then
  remote="cd ~/$remote_src && (setsid nohup $main_line >~/lsq_jax_run.log 2>&1 </dev/null &)"
else
  remote="cd ~/$remote_src && $main_line"
fi
run "${gcloud_tpu[@]}" ssh "$name" --worker=all "${where[@]}" "--command=$remote"
if ((detach)); then
  echo "tpu_pod.sh: started on every worker of $name; follow it with:"
  echo "  ${gcloud_tpu[*]} ssh $name --worker=0 ${where[*]} --command='tail -f ~/lsq_jax_run.log'"
fi

if ((delete_after)); then
  run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
