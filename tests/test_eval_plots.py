"""lsq_jax.eval.plots: the figures, the metrics.jsonl reader and `python -m lsq_jax.eval.plots <workdir>`."""
import json
import subprocess
import sys

import pytest

from lsq_jax.eval import plots
from lsq_jax.eval.report import evaluate_constructions
from lsq_jax.plan.report import report_sizes

from eval_numpy import sized_plan, small_experiment

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
    """A small constructions report, through JSON as the CLI would read it."""
    sizes = report_sizes(8, 60, n_ood_problems=4, n_ood_iters=20, ood_kappas=(1.0, 5.0, 10.0), ood_scales=(1.0,))
    r = evaluate_constructions(sized_plan(small_experiment("least_squares"), sizes, constructions_only=True))
    return json.loads(json.dumps(r, allow_nan=False))


def training_records():
    records = [{"step": s, "loss": 10.0 * 0.99 ** s, "learning_rate": 1e-2 * 0.9 ** (s // 50), "skipped_steps": 0}
               for s in range(0, 400, 25)]
    records[3]["loss"] = None  # a non-finite loss logged as null must not break the plot
    return records + [{"step": 400, "eval_mse": 1e-3}]


def test_read_metrics_reads_every_record_and_skips_blank_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in training_records()) + "\n\n")
    assert plots.read_metrics(path) == training_records()


@pytest.mark.slow
def test_write_plots_writes_every_figure(report, tmp_path):
    pytest.importorskip("matplotlib")
    paths = plots.write_plots(report, training_records(), tmp_path / "eval")
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["convergence.png", "forward_error.png", "one_step_error.png", "training_curve.png"]
    for p in paths:
        data = open(p, "rb").read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_write_plots_draws_only_what_the_inputs_allow(report, tmp_path):
    pytest.importorskip("matplotlib")
    single_step_only = {"kind": "experiment", "config": {}, "single_step": {"test_mse": 1.0}}
    assert plots.write_plots(single_step_only, [], tmp_path) == []
    assert [p.rsplit("/", 1)[-1] for p in plots.write_plots(None, training_records(), tmp_path)] == [
        "training_curve.png"]
    no_ood = {k: v for k, v in report.items() if k != "ood"}
    assert len(plots.write_plots(no_ood, None, tmp_path)) == 2


def test_the_one_step_error_figure_reads_a_report_of_the_earlier_grid(report, tmp_path):
    """A report written before the grid had axes of its own (kappa x scale cells, no in_range, no trained
    range) still gives the figure: its lines are chosen by the cells' values."""
    pytest.importorskip("matplotlib")
    ood = {**report["ood"], "cells": [{k: v for k, v in c.items() if k != "in_range"} | {"axis": "kappa_scale"}
                                      for c in report["ood"]["cells"]]}
    del ood["trained"]
    paths = plots.write_plots({**report, "iterated": None, "ood": ood}, None, tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["one_step_error.png"]


def test_without_matplotlib_plots_are_skipped_with_one_line(report, tmp_path, monkeypatch, capsys):
    # None in sys.modules makes `import matplotlib` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plots.write_plots(report, training_records(), tmp_path / "eval") == []
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "matplotlib" in err
    assert not (tmp_path / "eval").exists()


def test_cli_redraws_from_the_workdir(report, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in training_records()) + "\n")
    assert plots.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4
    assert all((tmp_path / "eval" / name).stat().st_size > 0 for name in (
        "forward_error.png", "convergence.png", "one_step_error.png", "training_curve.png"))


def test_cli_without_metrics_still_plots_the_report(report, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    assert plots.main([str(tmp_path)]) == 0
    assert not (tmp_path / "eval" / "training_curve.png").exists()
    assert (tmp_path / "eval" / "forward_error.png").exists()


@pytest.mark.parametrize("case", ["no_workdir", "no_report", "bad_json", "no_argument"])
def test_cli_errors_are_one_line_and_exit_2(case, tmp_path, capsys):
    if case == "no_workdir":
        argv = [str(tmp_path / "missing")]
    elif case == "no_report":
        argv = [str(tmp_path)]
    elif case == "bad_json":
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / "report.json").write_text("{not json")
        argv = [str(tmp_path)]
    else:
        argv = []
    assert plots.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_cli_exit_status_as_a_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lsq_jax.eval.plots", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr
