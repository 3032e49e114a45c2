"""The launchers and replication scripts of launch/: syntax, shellcheck, dry runs, and every printed
command's config overrides parsed exactly as lsq_jax.main parses them.

Nothing here needs a TPU, SLURM or gcloud: the dry runs only print, and the SLURM script's per-task
command is run through a stand-in `srun` that starts the tasks locally with a stand-in Python.
"""
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from lsq_jax.config.experiment import experiment_from_config

# ml_collections loads config files with the deprecated load_module
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
LAUNCHERS = [LAUNCH / "tpu_pod.sh", LAUNCH / "slurm_gpu.sbatch", LAUNCH / "local_multiprocess.sh",
             LAUNCH / "gpu_check.sh"]
FAMILIES = {  # script -> runs (the reference's and the published replication scripts)
    "explicit_gradient": 8 + 4 + 4 + 4 + 2,
    "kstep_gd": 1,
    "least_squares_layers": 2 * 10,
    "fixed_condition": 1,
    "icl_least_squares": 1,
    "primitives": 3 * 2 * 2 * 4 + 3 * 4 + 2 * 4,
}
REPLICATE = [LAUNCH / "replicate" / f"{name}.sh" for name in FAMILIES]
ALL_SCRIPTS = LAUNCHERS + REPLICATE + [LAUNCH / "replicate" / "_lib.sh"]


def _bash(args, env_extra=None, timeout=60, env_drop=("SLURM_", "LAUNCHER", "LSQ_", "PYTHON")):
    env = {k: v for k, v in os.environ.items() if not k.startswith(env_drop)}
    env.update(env_extra or {})
    return subprocess.run(["bash", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


# --- syntax ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", "-x", *map(str, ALL_SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", LAUNCHERS + REPLICATE, ids=lambda p: p.name)
def test_help(script):
    proc = _bash([script, "--help"])
    assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr


@pytest.mark.parametrize("script", LAUNCHERS + REPLICATE, ids=lambda p: p.name)
def test_executable(script):
    assert os.access(script, os.X_OK)


# --- TPU pod -----------------------------------------------------------------------------------------------

def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_pod_dry_run():
    proc = _bash([LAUNCH / "tpu_pod.sh", "--dry-run", "--name=pod", "--zone=us-central2-b", "--accelerator-type=v4-32",
                  "--workdir=gs://bucket/runs/x", "--config=configs/primitives.py:read,attention",
                  "--config.optim.lr=1e-3", "--", "--config.name=it's mine"])
    assert proc.returncode == 0, proc.stderr
    commands = _commands(proc.stdout)
    assert commands[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    create = commands[1]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
    assert "--accelerator-type=v4-32" in create and "--zone=us-central2-b" in create
    ssh = [c for c in commands if c[4:5] == ["ssh"]]
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)  # install, then run, on every worker
    scp = [c for c in commands if c[4:5] == ["scp"]]
    assert len(scp) == 1 and "--worker=all" in scp[0]
    remote = next(a for a in ssh[1] if a.startswith("--command=")).removeprefix("--command=")
    words = shlex.split(remote)  # the worker's shell sees exactly these arguments
    main = words[words.index("lsq_jax.main") + 1:]
    assert main == ["--config=configs/primitives.py:read,attention", "--workdir=gs://bucket/runs/x",
                    "--distributed=auto", "--config.optim.lr=1e-3", "--config.name=it's mine"]
    assert "--distributed=auto" in proc.stdout and "--worker=all" in proc.stdout


def test_tpu_pod_reuse_skips_install_and_detaches():
    proc = _bash([LAUNCH / "tpu_pod.sh", "--dry-run", "--skip-install", "--detach", "--workdir=gs://b/w"])
    assert proc.returncode == 0, proc.stderr
    commands = _commands(proc.stdout)
    assert [c[4] for c in commands] == ["describe", "create", "ssh"]
    assert "nohup" in commands[-1][-1] and "lsq_jax_run.log" in commands[-1][-1]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_pod_runtime_follows_the_accelerator_type(accelerator, runtime):
    proc = _bash([LAUNCH / "tpu_pod.sh", "--dry-run", "--workdir=gs://b/w", f"--accelerator-type={accelerator}"])
    assert proc.returncode == 0, proc.stderr
    create = next(c for c in _commands(proc.stdout) if c[4] == "create")
    assert f"--accelerator-type={accelerator}" in create and f"--version={runtime}" in create


def test_tpu_pod_installs_the_workdirs_filesystem():
    for workdir, package, other in (("gs://b/w", "gcsfs", "s3fs"), ("s3://b/w", "s3fs", "gcsfs")):
        proc = _bash([LAUNCH / "tpu_pod.sh", "--dry-run", f"--workdir={workdir}"])
        install = next(c for c in _commands(proc.stdout) if c[4] == "ssh" and "uv pip install" in c[-1])[-1]
        assert proc.returncode == 0 and package in install and other not in install, proc.stderr


FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$GCLOUD_LOG"
if [[ "$4" == describe ]]; then echo "$GCLOUD_STATE"; fi
"""


@pytest.mark.parametrize("spot", [True, False])
def test_tpu_pod_after_a_spot_preemption_recreates_the_slice(tmp_path, spot):
    """A stand-in gcloud answers that the slice was preempted: with --spot the same command deletes it,
    creates it again, installs (even with --skip-install: a new slice has nothing) and runs; without
    --spot it stops in one line that names what to do."""
    (tmp_path / "gcloud").write_text(FAKE_GCLOUD)
    (tmp_path / "gcloud").chmod(0o755)
    log = tmp_path / "calls"
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "GCLOUD_LOG": str(log), "GCLOUD_STATE": "PREEMPTED",
           "TMPDIR": str(tmp_path)}
    proc = _bash([LAUNCH / "tpu_pod.sh", "--name=pod", "--workdir=gs://b/w", "--skip-install",
                  *(["--spot"] if spot else [])], env_extra=env)
    calls = [line.split()[3] for line in log.read_text().splitlines()]
    if spot:
        assert proc.returncode == 0, proc.stderr
        assert calls == ["describe", "delete", "create", "scp", "ssh", "ssh"]
        assert "--spot" in log.read_text().splitlines()[2]
    else:
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "state PREEMPTED" in proc.stderr and "--spot" in proc.stderr and calls == ["describe"]


@pytest.mark.parametrize("args, needle", [
    ([], "--workdir is required"),
    (["--workdir=/tmp/local"], "must be a cloud storage URL"),
    (["--workdir=gs://b/w", "--accelerator-type=v5litepod-16", "--version=tpu-ubuntu2204-base"],
     "allowed --version=v2-alpha-tpuv5-lite"),
    (["--workdir=gs://b/w", "--accelerator-type=v7x-8"], "--accelerator-type=v7x-8: unknown type"),
    (["--workdir=gs://b/w", "--config=configs/nope.py"], "no file configs/nope.py"),
    (["--workdir=gs://b/w", "--distributed=explicit"], "is set by this launcher"),
])
def test_tpu_pod_bad_arguments(args, needle):
    proc = _bash([LAUNCH / "tpu_pod.sh", "--dry-run", *args])
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- SLURM -------------------------------------------------------------------------------------------------

def test_slurm_dry_run_outside_slurm():
    proc = _bash([LAUNCH / "slurm_gpu.sbatch", "--dry-run", "--config.optim.lr=1e-3"],
                 {"SLURM_JOB_NODELIST": "gpu[007-009,011],cpu1", "SLURM_NTASKS": "32", "LSQ_PORT": "23456",
                  "LSQ_CONFIG": "configs/transformer_lsq.py:kappa5", "LSQ_WORKDIR": "/shared/runs/k5"})
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks=32"]
    assert "--process_id=$SLURM_PROCID" in cmd[5]  # expanded by each task, not by the batch script
    main = cmd[cmd.index("lsq_jax.main") + 1:]
    assert main == ["--config=configs/transformer_lsq.py:kappa5", "--config.optim.lr=1e-3",
                    "--workdir=/shared/runs/k5", "--distributed=explicit",
                    "--coordinator_address=gpu007:23456", "--num_processes=32"]


def test_slurm_arguments_win_over_environment_and_auto_mode():
    proc = _bash([LAUNCH / "slurm_gpu.sbatch", "--dry-run", "--config=configs/multistep_gd.py", "--workdir=/w"],
                 {"LSQ_CONFIG": "configs/baseconv.py", "LSQ_WORKDIR": "/other", "LSQ_DISTRIBUTED": "auto"})
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert cmd[cmd.index("lsq_jax.main") + 1:] == ["--config=configs/multistep_gd.py", "--workdir=/w",
                                                     "--distributed=auto"]


def test_slurm_refuses_to_run_outside_a_job():
    proc = _bash([LAUNCH / "slurm_gpu.sbatch"])
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun: start --ntasks=N copies of the command here, each with its own SLURM_PROCID
n=1
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks=* ]] && n="${1#*=}"; shift; done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & done
wait
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# stand-in for python: record the arguments
printf '%s\\n' "$@" > "$RECORD_DIR/task_$SLURM_PROCID.args"
"""


def test_slurm_each_task_gets_its_process_id(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("fakepython", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    proc = _bash([LAUNCH / "slurm_gpu.sbatch", "--config.optim.lr=1e-3"],
                 {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "t",
                  "SLURM_JOB_NODELIST": "node[3-4]", "SLURM_NTASKS": "3", "LSQ_PYTHON": str(bin_dir / "fakepython"),
                  "RECORD_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    port = 20000 + 4242 % 20000
    for i in range(3):
        args = (tmp_path / f"task_{i}.args").read_text().splitlines()
        assert args == ["-m", "lsq_jax.main", "--config=configs/baseconv.py", "--config.optim.lr=1e-3",
                        "--workdir=runs/t-4242", "--distributed=explicit", f"--coordinator_address=node3:{port}",
                        "--num_processes=3", f"--process_id={i}"]


# --- local multi-process -----------------------------------------------------------------------------------

def test_local_multiprocess_dry_run():
    proc = _bash([LAUNCH / "local_multiprocess.sh", "--dry-run", "--devices-per-process=2", "--port=4321", "3",
                  "--config=configs/baseconv.py:smoke", "--workdir=/tmp/w"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        cmd = shlex.split(line)
        assert "JAX_PLATFORMS=cpu" in cmd and "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in cmd
        xla = [a.removeprefix("XLA_FLAGS=").split() for a in cmd if a.startswith("XLA_FLAGS=")]
        assert len(xla) == 1 and "--xla_force_host_platform_device_count=2" in xla[0], cmd
        assert cmd[cmd.index("lsq_jax.main") + 1:] == [
            "--config=configs/baseconv.py:smoke", "--workdir=/tmp/w", "--distributed=explicit",
            "--coordinator_address=127.0.0.1:4321", "--num_processes=3", f"--process_id={i}"]


@pytest.mark.parametrize("args, needle", [
    (["0"], "N=0 is not allowed"),
    (["2", "--distributed=off"], "is set by this launcher"),
    (["--devices-per-process=x", "2"], "--devices-per-process=x is not allowed"),
    (["--bogus", "2"], "unknown option --bogus"),
])
def test_local_multiprocess_bad_arguments(args, needle):
    proc = _bash([LAUNCH / "local_multiprocess.sh", "--dry-run", *args])
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


FAKE_WORKER = """#!/usr/bin/env bash
# stand-in for python: process 1 fails after a moment, the others would run for a long time
for a in "$@"; do case "$a" in --process_id=*) id="${a#*=}" ;; esac; done
echo $$ > "$RECORD_DIR/pid_$id"
if [[ "$id" == 1 ]]; then sleep 1; exit 3; fi
sleep 300
"""


@pytest.mark.slow
def test_local_multiprocess_stops_everything_when_one_process_fails(tmp_path):
    worker = tmp_path / "worker"
    worker.write_text(FAKE_WORKER)
    worker.chmod(0o755)
    proc = _bash([LAUNCH / "local_multiprocess.sh", f"--log-dir={tmp_path / 'logs'}", "3", "--workdir=/tmp/w"],
                 {"PYTHON": str(worker), "RECORD_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "process 1 exited with status 3" in proc.stderr
    for i in (0, 2):  # the ones that would have waited on their peer are gone
        pid = int((tmp_path / f"pid_{i}").read_text())
        assert not _alive(pid), f"process {i} (pid {pid}) was left running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_local_multiprocess_timeout(tmp_path):
    worker = tmp_path / "worker"
    worker.write_text("#!/usr/bin/env bash\nsleep 300\n")
    worker.chmod(0o755)
    proc = _bash([LAUNCH / "local_multiprocess.sh", "--timeout=1", "2"], {"PYTHON": str(worker)}, timeout=60)
    assert proc.returncode == 124 and "--timeout=1 reached" in proc.stderr


# --- replication -------------------------------------------------------------------------------------------

def _dry_run(script, *args, env_extra=None) -> list[list[str]]:
    proc = _bash([script, "--dry-run", *args], env_extra)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def _parse_like_main(argv: list[str]):
    """The config that `python -m lsq_jax.main argv` would train: ml_collections' own flag parser, then the
    conversion into validated dataclasses (an unknown key, a bad value or a contradiction raises)."""
    values = flags.FlagValues()
    # the overrides are found in sys_argv (sys.argv by default), not in the list given to the parser
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=["main", *argv])
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(["main", *argv])
    return values.config, experiment_from_config(values.config)


@pytest.fixture(scope="module")
def replication_commands():
    return {script.stem: _dry_run(script) for script in REPLICATE}


@pytest.mark.parametrize("family", FAMILIES)
def test_replication_commands_parse(family, replication_commands, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = replication_commands[family]
    assert len(commands) == FAMILIES[family]
    for cmd in commands:
        assert cmd[:3] == ["python", "-m", "lsq_jax.main"], cmd
        argv = cmd[3:]
        assert argv[0].startswith("--config=configs/") and argv[-1].startswith(f"--workdir=runs/replicate/{family}/")
        try:
            config, _ = _parse_like_main(argv)
        except Exception as err:  # noqa: BLE001 -- name the command that failed
            pytest.fail(f"{shlex.join(cmd)}\n  -> {type(err).__name__}: {err}")
        for arg in argv[1:-1]:  # every override took effect, with its type
            key, value = arg.removeprefix("--config.").split("=", 1)
            got = config
            for part in key.split("."):
                got = got[part]
            assert str(got).lower() == value.lower() or float(got) == float(value), (arg, got)


def test_replication_workdirs_are_distinct(replication_commands):
    workdirs = [cmd[-1] for commands in replication_commands.values() for cmd in commands]
    assert len(workdirs) == len(set(workdirs)) == sum(FAMILIES.values())


def _overrides(cmd) -> dict[str, str]:
    return dict(a.removeprefix("--config.").split("=", 1) for a in cmd if a.startswith("--config."))


def test_replication_sweeps_cover_the_published_grids(replication_commands):
    layers = {}
    for cmd in replication_commands["least_squares_layers"]:
        mixer = "baseconv" if cmd[3].endswith(":baseconv") else "attention"
        layers.setdefault(mixer, []).append(int(_overrides(cmd)["model.n_layer"]))
    assert layers == {m: [1, 2, 4, 8, 12, 16, 24, 32, 48, 64] for m in ("attention", "baseconv")}

    lengths = [_overrides(c) for c in replication_commands["primitives"] if "steps" in c[-1].rsplit("/", 1)[-1]]
    assert sorted({int(o["train.num_steps"]) for o in lengths}) == [10**5, 10**6, 10**7, 10**8]
    assert all(int(o["optim.step_rate"]) * 100 == int(o["train.num_steps"]) for o in lengths)
    multiply = {c[-1].rsplit("/", 1)[-1]: _overrides(c) for c in replication_commands["primitives"]}
    assert [multiply[f"multiply_attention_width{w}"]["model.n_embd"] for w in (32, 64, 128, 256)] == ["32", "64", "128", "256"]
    assert [multiply[f"multiply_attention_heads{h}"]["model.n_head"] for h in (1, 2, 4, 8)] == ["1", "2", "4", "8"]
    assert [multiply[f"multiply_attention_mlp{f}"]["model.mlp_upfactor"] for f in (1, 2, 4, 8)] == ["1", "2", "4", "8"]

    explicit = {c[-1].rsplit("/", 1)[-1]: (c[3], _overrides(c)) for c in replication_commands["explicit_gradient"]}
    for lr in ("1e-2", "3e-3", "1e-3", "3e-4"):
        assert explicit[f"step_lr{lr}"][1]["optim.schedule"] == "step"
        assert explicit[f"adaptive_lr{lr}"][1]["optim.schedule"] == "adaptive"
    assert explicit["noema_step_lr1e-2"][1]["optim.ema_lambda"] == "0.0"
    assert explicit["softmax_attention"][0] == "--config=configs/linear_attention.py:softmax"


def test_replication_options(monkeypatch):
    monkeypatch.chdir(REPO)
    commands = _dry_run(LAUNCH / "replicate" / "primitives.sh", "--only=^multiply_baseconv_steps",
                        "--variant=smoke", "--float32", "--workdir-root=gs://b/r", "--", "--config.seed=3",
                        env_extra={"LAUNCHER": "launch/slurm_gpu.sbatch"})
    assert len(commands) == 4
    for cmd in commands:
        assert cmd[0] == "launch/slurm_gpu.sbatch" and cmd[1] == "--config=configs/primitives.py:multiply,baseconv,smoke"
        assert "--config.dtype=float32" in cmd and "--config.seed=3" in cmd
        assert not any(a.startswith(("--config.train.num_steps", "--config.optim.step_rate")) for a in cmd)
        assert re.fullmatch(r"--workdir=gs://b/r/primitives/multiply_baseconv_steps\d+", cmd[-1])
        _, exp = _parse_like_main(cmd[1:])
        assert exp.train.num_steps == 100  # the smoke size


def test_replication_rejects_unknown_options():
    proc = _bash([LAUNCH / "replicate" / "kstep_gd.sh", "--dry-run", "--bogus"])
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    proc = _bash([LAUNCH / "replicate" / "kstep_gd.sh", "--dry-run", "--only=nothing-matches"])
    assert proc.returncode == 2 and "no run matches" in proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# --- the GPU check ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [(["--bogus"], "unknown argument"), (["--steps=0"], "--steps=0"),
                                          (["--out="], "--out")])
def test_gpu_check_bad_arguments(args, needle):
    proc = _bash([LAUNCH / "gpu_check.sh", *args])
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_gpu_check_cpu_fallback_prints_every_figure(tmp_path):
    proc = _bash([LAUNCH / "gpu_check.sh", f"--out={tmp_path / 'check'}"], env_extra={"PYTHON": sys.executable},
                 timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the CPU fallback" in proc.stdout
    assert re.search(r"^throughput float64: [0-9.]+ steps/s$", proc.stdout, re.M), proc.stdout[-2000:]
    for run, steps in (("lm", 2), ("published", 10)):
        assert re.search(rf"^{run}: \d+ s in all, steps {steps}, test MSE [0-9.e+-]+, iterated final error ",
                         proc.stdout, re.M), proc.stdout[-2000:]
