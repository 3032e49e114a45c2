"""Multi-process JAX on one machine: the flags' checks, and two processes x two devices == one process,
through the Adam recipe and then Levenberg-Marquardt (the hybrid).

The slow test starts real JAX processes on 127.0.0.1 (gloo collectives between them). A process whose
peer never arrives ABORTS (exit 134) instead of raising, so every child runs in its own session with a
deadline, and whatever is left is killed by its process-group id.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lsq_jax import main
from lsq_jax.checkpoint import Checkpointer, abstract_like
from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.eval.plots import read_metrics
from lsq_jax.mesh import _slurm_local_device_ids, initialize_distributed, make_mesh, replicated

from config_files import SMALL_REPORT_FLAGS, get_config
from steps import initial_state
from xla_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

NUM_STEPS = 10
# the hybrid: the Adam recipe for 8 steps, then 2 LM iterations (Cholesky, each device building J^T J from its
# own problems, one reduction across the devices of both processes; or CG, each product summed across them);
# narrow enough for a P x P solve, and damped enough (lm_damping) that few solves are rejected: emulated
# devices share 2 cores
HYBRID = {"model.n_embd": 8, "model.n_layer": 1, "optim.optimizer": "lm", "optim.lm_after": 8,
          "optim.lm_damping": 1.0}
DEADLINE_S = 240
# emulated devices are threads: on a loaded machine one may reach a collective long after another, and
# XLA's default 40 s rendezvous limit would abort the process
SLOW_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=600"


# --- the flags, checked before JAX is touched -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    ({"mode": "sometimes"}, "--distributed='sometimes' is not allowed"),
    ({"mode": "explicit"}, "--distributed=explicit needs --coordinator_address, --num_processes, --process_id"),
    ({"mode": "explicit", "coordinator_address": "127.0.0.1:1", "num_processes": 2},
     "--distributed=explicit needs --process_id"),
    ({"mode": "explicit", "coordinator_address": "127.0.0.1", "num_processes": 2, "process_id": 0},
     "--coordinator_address='127.0.0.1' is not allowed"),
    ({"mode": "explicit", "coordinator_address": "host:99999", "num_processes": 2, "process_id": 0},
     "--coordinator_address='host:99999' is not allowed"),
    ({"mode": "explicit", "coordinator_address": "h:1", "num_processes": 0, "process_id": 0},
     "--num_processes=0 is not allowed"),
    ({"mode": "explicit", "coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     "--process_id=2 is not allowed: must be less than --num_processes=2"),
    ({"mode": "explicit", "coordinator_address": "h:1", "num_processes": 2, "process_id": -1},
     "--process_id=-1 is not allowed"),
    ({"mode": "off", "num_processes": 2}, "--num_processes needs --distributed=explicit"),
])
def test_bad_distributed_flags_are_one_line_value_errors(kwargs, needle):
    with pytest.raises(ValueError) as info:
        initialize_distributed(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message, message


def test_mesh_over_all_or_the_first_n_devices():
    assert make_mesh().devices.size == jax.device_count()
    assert list(make_mesh(1).devices.flat) == jax.devices()[:1]
    with pytest.raises(ValueError, match="n_devices=.* is not allowed"):
        make_mesh(jax.device_count() + 1)


def test_off_does_nothing():
    assert initialize_distributed("off") is None


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_LOCALID": "3"}, None),  # every task sees all GPUs: JAX picks GPU SLURM_LOCALID itself
    ({"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, None),
    ({"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3"}, [0]),  # --gpus-per-task=1: the one GPU is number 0
    ({"CUDA_VISIBLE_DEVICES": "3"}, None),  # not under SLURM: leave JAX alone
])
def test_slurm_local_device_ids(monkeypatch, env, expected):
    for name in ("SLURM_LOCALID", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _slurm_local_device_ids() == expected


def test_cli_reports_bad_distributed_flags_on_one_line(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    status = main.run(["lsq_jax.main", "--config=configs/baseconv.py:smoke", "--distributed=explicit",
                       "--num_processes=2"], log=lambda _: None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert "--coordinator_address" in lines[0] and "--process_id" in lines[0]


# --- two processes x two devices against one process -------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(workdir, solver) -> list[str]:
    return ["--config=configs/baseconv.py:smoke", f"--config.train.num_steps={NUM_STEPS}",
            "--config.train.checkpoint_every=1000", f"--workdir={workdir}", *SMALL_REPORT_FLAGS,
            *(f"--config.{k}={v}" for k, v in HYBRID.items()), f"--config.optim.lm_solver={solver}"]


def _run_together(commands, log_dir, meanwhile, deadline=DEADLINE_S) -> list[int]:
    """Start every (argv, env) at once, each in its own session; call `meanwhile`; wait for all; kill them all
    on the deadline."""
    procs = []
    try:
        for i, (cmd, env) in enumerate(commands):
            log = open(log_dir / f"process_{i}.log", "w")
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            log.close()
        end = time.monotonic() + deadline
        meanwhile()
        return [p.wait(timeout=max(1.0, end - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _logs(log_dir) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log")))


def _experiment(solver):
    c = get_config("baseconv", "smoke")
    c.update_from_flattened_dict({"train.num_steps": NUM_STEPS, "train.checkpoint_every": 1000, **HYBRID,
                                  "optim.lm_solver": solver})
    return experiment_from_config(c)


def _restore_final(workdir, exp):
    """The final TrainState of a workdir, restored in this (one-device) process."""
    abstract = abstract_like(jax.eval_shape(lambda: initial_state(exp)),
                             replicated(make_mesh()))
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        assert ckpt.steps()[-1] == NUM_STEPS, ckpt.steps()
        return ckpt.restore(NUM_STEPS, abstract)
    finally:
        ckpt.close()


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def _first_loss(workdir) -> float:
    lines = read_metrics(workdir / "metrics.jsonl")
    return next(r["loss"] for r in lines if r["step"] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_two_processes_train_like_one_process(tmp_path, solver):
    """Two processes of two devices each train like this (one-device) process: the same batches, the same
    LM steps accepted (Cholesky or CG), the same parameters to round-off. (One device against four in one
    process: tests/test_train.py and tests/test_lm_training.py.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_COORDINATOR"))}
    env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2", SLOW_COLLECTIVES))
    python = [sys.executable, "-m", "lsq_jax.main"]

    # this process trains the reference while the two processes run: they spend much of their time waiting
    # on each other
    two, one, logs = tmp_path / "two_processes", tmp_path / "one_process", tmp_path / "logs"
    logs.mkdir()
    address = f"--coordinator_address=127.0.0.1:{_free_port()}"
    statuses = []
    codes = _run_together(
        [(python + _train_args(two, solver) + ["--distributed=explicit", address, "--num_processes=2",
                                               f"--process_id={i}"], env) for i in range(2)], logs,
        meanwhile=lambda: statuses.append(main.run(["lsq_jax.main", *_train_args(one, solver), "--noreport"],
                                                   log=lambda _: None)))
    assert codes == [0, 0] and statuses == [0], (statuses, _logs(logs))

    # both processes wrote their part of the checkpoint; only process 0 wrote the metrics and the report
    final = two / "checkpoints" / str(NUM_STEPS) / "state"
    assert (final / "ocdbt.process_0").exists() and (final / "ocdbt.process_1").exists()
    assert json.loads((two / "eval" / "report.json").read_text())["iterated"]["methods"]["learned"]
    assert "step 0/" in (logs / "process_0.log").read_text()
    assert "step 0/" not in (logs / "process_1.log").read_text()

    # the same global batch: the step-0 loss (before any update) agrees to round-off
    np.testing.assert_allclose(_first_loss(two), _first_loss(one), rtol=1e-13)

    exp = _experiment(solver)
    # this one-device process restores the checkpoint the two processes wrote
    state2, state1 = _restore_final(two, exp), _restore_final(one, exp)
    p2, p1, p0 = _flat(state2.params), _flat(state1.params), _flat(initial_state(exp).params)
    assert int(state2.step) == int(state1.step) == NUM_STEPS
    assert np.linalg.norm(p1 - p0) > 1e-3 * np.linalg.norm(p0)  # training moved the parameters
    lm2, lm1 = state2.opt_state["lm"], state1.opt_state["lm"]
    assert int(lm1.accepted) >= 1  # LM moved them too
    assert (int(lm2.accepted), int(lm2.rejected)) == (int(lm1.accepted), int(lm1.rejected))
    # the gradient and J^T J reductions sum in another order: round-off, not bitwise (STYLE.md)
    assert np.linalg.norm(p2 - p1) <= 1e-12 * np.linalg.norm(p1), np.linalg.norm(p2 - p1) / np.linalg.norm(p1)
