"""The released checkpoints (pretrained/<name>: a finished run's final checkpoint, its saved config and
RELEASE.md) restore from the repository and take one gradient-descent step as precisely as documented;
--mode=eval on one writes its report under runs/ and leaves the released folder untouched."""
import os
import pathlib

import jax
import numpy as np
import pytest

from lsq_jax import checkpoint, main
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.mesh import make_mesh, replicated
from lsq_jax.models.backbone import SequenceModel, abstract_params
from lsq_jax.workdir import RELEASE_NOTE, resolve_workdir

from trees import snapshot

PRETRAINED = pathlib.Path(__file__).resolve().parents[1] / "pretrained"
# name -> bound on its single-step test MSE (2x its RELEASE.md figure: 512 other problems here)
RELEASED = {"baseconv-lm": 1e-9, "linear-attention-lm": 5e-15}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_a_released_checkpoint_takes_a_gradient_step_to_its_documented_precision(name):
    """Its prediction on 512 fresh problems against A^T (A x0 - b) / L computed here with numpy."""
    workdir = PRETRAINED / name
    assert (workdir / RELEASE_NOTE).exists()
    exp, step, params = checkpoint.restore_params(resolve_workdir(str(workdir)), None,
                                                  lambda e: abstract_params(e.model), replicated(make_mesh()),
                                                  log=lambda _: None)
    assert step == exp.train.num_steps and exp.task.name == "explicit_gradient"
    task = make_task(exp.task)
    batch = task.sample(example_keys(jax.random.key(20261206), 0, 0, 512))
    outputs = jax.jit(SequenceModel(exp.model).apply)({"params": params}, batch.inputs)
    predicted = np.asarray(task.read(outputs)[:, -1])
    a, b, x0 = (np.asarray(v) for v in (batch.raw.a, batch.raw.b, batch.raw.x0))
    gradient = np.einsum("bld,bl->bd", a, np.einsum("bld,bd->bl", a, x0) - b) / a.shape[1]
    mse = float(np.mean((predicted - gradient) ** 2))
    assert mse <= RELEASED[name], mse
    assert mse > 0  # a learned model, not the construction


def test_eval_of_a_released_checkpoint_writes_under_runs_and_leaves_it_untouched(tmp_path, monkeypatch):
    """Where the report goes (its content is the first test's subject and test_eval_report's)."""
    from lsq_jax.eval import report as eval_report

    workdir = PRETRAINED / "baseconv-lm"
    before = snapshot(workdir)
    monkeypatch.chdir(tmp_path)
    outs = []
    monkeypatch.setattr(eval_report, "write_evaluation", lambda *a, out=None, **k: outs.append(out) or {})
    assert main.run(["lsq_jax.main", "--mode=eval", f"--workdir={os.path.relpath(workdir)}"], log=print) == 0
    assert snapshot(workdir) == before
    [out] = outs
    assert pathlib.Path(str(out)).parent.parent == tmp_path / "runs" and out.name == "eval"
    assert pathlib.Path(str(out)).parent.name.startswith("baseconv-lm-eval-")
