"""Workdirs written by an earlier version of the code (tests/data/workdir_*: two steps of a tiny Adam run,
and of a tiny run that switches from Adam to Levenberg-Marquardt after one step) still resume like a fresh
run of the current code, and still evaluate.

They were written on another machine: XLA's CPU code and LAPACK choose kernels per CPU (vector width, FMA,
summation order), so the same steps round differently there and here, and the resumed parameters equal a
fresh run's to round-off, not bit for bit. Bit-identity of a resume is a property of one machine and one
device layout; tests/test_checkpoint.py and the kill -9 tests check it with both runs made in the test."""
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from lsq_jax import checkpoint, main
from lsq_jax.workdir import resolve_workdir
from lsq_jax.eval import report as eval_report
from lsq_jax.mesh import make_mesh, replicated
from lsq_jax.models.backbone import abstract_params

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parent / "data"
TINY = ["--config.train.log_every=2", "--config.model.n_embd=8", "--config.task.n_dims=2",
        "--config.task.n_points=6", "--config.train.batch_size=16", "--config.train.eval_problems=8",
        "--config.train.eval_iters=20", "--config.train.eval_batch_size=16", "--config.train.checkpoint_every=2",
        "--config.train.grad_stats_batches=4"]
STEPS = 4  # the old runs' 2 steps resumed to 4
# Round-off bound for the resumed parameters against a fresh run's, per leaf, relative to the leaf's norm:
# each step's arithmetic may differ by a few ulps per operation between CPUs, and a step's reductions and
# (for LM) its solve can grow that by up to a factor of 2^7, so 2^7 eps per step, accumulated over STEPS.
# A resume that went wrong (another step, another optimizer state) differs by the size of an update, about
# the learning rate (1e-2) relative, eleven orders above.
RESUME_RTOL = STEPS * 2**7 * float(np.finfo(np.float64).eps)  # 1.1e-13
RUNS = {"workdir_adam": [f"--config={REPO / 'configs' / 'baseconv.py'}:smoke"],
        "workdir_lm": [f"--config={REPO / 'configs' / 'baseconv.py'}:lm", "--config.optim.lm_after=1",
                       "--config.train.grad_stats_batches=0",
                       # what that run was: Marquardt's scaling (its saved config predates the field) and
                       # no geodesic acceleration (the :lm variant has it now)
                       "--config.optim.lm_scaling=marquardt", "--config.optim.lm_geodesic=false"]}


def run(argv):
    out = []
    status = main.run(["lsq_jax.main", *argv], log=out.append)
    assert status == 0, out
    return out


def final_params(workdir):
    _, step, params = checkpoint.restore_params(resolve_workdir(str(workdir)), None,
                                                lambda exp: abstract_params(exp.model), replicated(make_mesh()),
                                                log=lambda _: None)
    return step, [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.slow
def test_an_old_workdir_resumes_like_a_fresh_run_and_evaluates(tmp_path, name, monkeypatch):
    old = tmp_path / "old"
    shutil.copytree(DATA / name, old)
    saved = json.loads((old / "config.json").read_text())
    assert saved["train"]["num_steps"] == 2
    argv = [RUNS[name][0], *TINY, *RUNS[name][1:], f"--config.train.num_steps={STEPS}"]
    with monkeypatch.context() as patch:  # the report comes from --mode=eval below
        patch.setattr(eval_report, "write_evaluation", lambda *a, **k: {})
        run([*argv, f"--workdir={old}"])
        run([*argv, f"--workdir={tmp_path / 'fresh'}"])
    step, resumed = final_params(old)
    fresh_step, fresh = final_params(tmp_path / "fresh")
    assert step == fresh_step == STEPS
    for a, b in zip(resumed, fresh, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == np.float64
        assert np.linalg.norm(a - b) <= RESUME_RTOL * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)
    run(["--mode=eval", f"--workdir={old}"])
    report = json.loads((old / "eval" / "report.json").read_text())
    assert report["iterated"]["methods"]["learned"]
