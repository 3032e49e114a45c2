"""Checkpoints: round trip, resume after SIGKILL bit for bit, SIGTERM, damaged and mismatched checkpoints."""
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lsq_jax.checkpoint import Checkpointer, CheckpointError, abstract_like, restore_params
from lsq_jax.config.experiment import experiment_from_dict
from lsq_jax.eval import report as eval_report
from lsq_jax.mesh import make_mesh, replicated
from lsq_jax.models.backbone import abstract_params
from lsq_jax.train.state import place_state
from lsq_jax.train.step import advance
from steps import full_size_fns, initial_state

from config_files import SMALL_REPORT_FLAGS, get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parent / "data"
SMOKE = ["--config=configs/baseconv.py:smoke", "--config.train.log_every=20", "--config.train.checkpoint_every=40",
         *SMALL_REPORT_FLAGS]


def _main(workdir, *extra, steps=200):
    return [sys.executable, "-m", "lsq_jax.main", *SMOKE, f"--config.train.num_steps={steps}",
            f"--workdir={workdir}", *extra]


def restore(workdir, step=None):
    """(experiment, state) of a workdir's checkpoint (the newest by default), restored in this process."""
    ckpt = Checkpointer(workdir, read_only=True)
    step = ckpt.steps()[-1] if step is None else step
    exp = experiment_from_dict(ckpt.saved_config(step))
    mesh = make_mesh()
    abstract = abstract_like(jax.eval_shape(lambda: initial_state(exp)), replicated(mesh))
    state = ckpt.restore(step, abstract)
    ckpt.close()
    return exp, state


def leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def test_round_trip_of_the_full_state(tmp_path):

    from lsq_jax.config.experiment import experiment_from_config, experiment_to_dict
    exp = experiment_from_config(get_config("baseconv", "smoke"))
    mesh = make_mesh()
    state = place_state(initial_state(exp), mesh)
    fns = full_size_fns(exp, mesh)
    for i in range(3):
        state, _ = advance(fns, state, i)
    expected = leaves(state)
    ckpt = Checkpointer(tmp_path, save_every=1)
    ckpt.save(3, state, experiment_to_dict(exp), force=True)
    ckpt.close()
    exp2, restored = restore(tmp_path)
    assert exp2 == exp
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(expected, leaves(restored)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="step 7"):
        Checkpointer(tmp_path, read_only=True).restore(7, None)


@pytest.mark.parametrize("name", ["workdir_adam", "workdir_lm"])
def test_restore_params_reads_the_parameters_of_the_whole_state(name):
    """Evaluation restores the parameters alone (no optimizer state, no TrainState): bit for bit, dtype and
    placement those of the whole state's restore, for checkpoints written by an earlier version."""
    exp, full = restore(DATA / name)
    sharding = replicated(make_mesh())
    exp2, step, params = restore_params(DATA / name, None, lambda e: abstract_params(e.model), sharding,
                                        log=lambda _: None)
    assert exp2 == exp and step == int(full.step)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(full.params)
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(params), strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _run_until(cmd, needle, timeout=240):
    """Start cmd, return the process once `needle` appears on its stdout."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + timeout
    for line in proc.stdout:
        if needle in line or time.time() > deadline:
            break
    return proc


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # --noreport: the runs train only (the parameters are what this test compares)
    assert subprocess.run(_main(full, "--noreport"), cwd=REPO, capture_output=True, timeout=300).returncode == 0
    assert (full / "checkpoints").is_dir() and not (full / "eval").exists()
    proc = _run_until(_main(killed), "step 120/")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert Checkpointer(killed, read_only=True).steps()[-1] < 200
    resumed = subprocess.run(_main(killed, "--noreport"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout
    _, a = restore(full)
    _, b = restore(killed)
    assert int(a.step) == int(b.step) == 200
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_saves_and_stops_cleanly(tmp_path):
    proc = _run_until(_main(tmp_path, steps=100_000), "step 60/")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "preempted" in out
    last = Checkpointer(tmp_path, read_only=True).steps()[-1]
    _, state = restore(tmp_path)
    assert int(state.step) == last >= 60  # saved at the step where the signal was seen


def _damage(workdir, step):
    """Truncate every data file of the state of checkpoint `step`."""
    for path in (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.slow
def test_refuses_a_workdir_of_another_config_and_all_damaged(tmp_path, monkeypatch, capsys):
    """In-process through main.run: a different config is refused naming the fields; a workdir whose every
    checkpoint is damaged is refused, and nothing is moved aside (there is no good one to resume from)."""
    from lsq_jax import main

    monkeypatch.setattr(eval_report, "write_evaluation", lambda *a, **k: {})
    monkeypatch.chdir(REPO)
    run = lambda *extra, steps: main.run(["lsq_jax.main", *_main(tmp_path, *extra, steps=steps)[3:]],
                                         log=lambda _: None)
    assert run(steps=40) == 0
    capsys.readouterr()
    assert run("--config.optim.lr=0.5", "--config.model.n_layer=2", steps=40) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "model.n_layer" in err and "optim.lr" in err
    steps = Checkpointer(tmp_path, read_only=True).steps()
    for step in steps:
        _damage(tmp_path, step)
    assert run(steps=80) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "can be restored" in err, err
    assert Checkpointer(tmp_path, read_only=True).steps() == steps and not (tmp_path / "unrestorable").exists()


QUIETING = '''
import logging, sys
import jax, orbax.checkpoint  # what they install on import is theirs


def process_wide():
    return (sys.excepthook, sys.unraisablehook, *(tuple(logging.getLogger(name).filters)
                                                  for name in ("absl", "asyncio")))


before = process_wide()
from lsq_jax import checkpoint
assert process_wide() == before, "importing lsq_jax.checkpoint changed process-wide state"
checkpoint.quiet_orbax_failures()
quiet = process_wide()
checkpoint.quiet_orbax_failures()
assert process_wide() == quiet != before
sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
sys.excepthook(ValueError, ValueError("any other error"), None)
'''


def test_importing_checkpoint_installs_nothing_and_the_quieting_hides_only_orbax_leftovers():
    proc = subprocess.run([sys.executable, "-c", QUIETING], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ValueError: any other error" in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr
