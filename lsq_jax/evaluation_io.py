"""The evaluation report written into a workdir, as lsq_jax.main calls it after training, in --mode=eval
and in --mode=construct.

FOR THE INTEGRATOR: a stand-in for lsq_jax/eval/report.py's write_evaluation (and eval/plots.py's
read_metrics), kept here so that main, not train, calls the evaluation; point main and plot at eval/ and
delete this module.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from lsq_jax import evaluate, plots
from lsq_jax.data.keys import run_keys
from lsq_jax.experiment import Experiment


def read_metrics(path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (local or a URL such as gs://)."""
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def write_evaluation(exp: Experiment, params, workdir, *, log=print, constructions: bool = False) -> dict[str, Any]:
    """The numerical-analysis report (lsq_jax.evaluate) of a learned model, or of the hand-built GD models,
    written to <workdir>/eval/report.json with a table on the terminal and PNG plots (process 0)."""
    key = run_keys(exp.seed)["eval"]
    sizes = {"n_problems": exp.train.eval_problems, "n_iters": exp.train.eval_iters}
    if constructions:
        report = evaluate.evaluate_constructions(exp.task.n_dims, exp.task.n_points, key,
                                                 dtype=jnp.dtype(exp.task.dtype), **sizes)
    else:
        report = evaluate.evaluate_experiment(exp, params, key, **sizes)
    if jax.process_index() == 0:
        out = workdir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        log(evaluate.format_table(report))
        records = read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
        for path in plots.write_plots(report, records, out):
            log(f"wrote {path}")
        log(f"wrote {out / 'report.json'}")
    return report
