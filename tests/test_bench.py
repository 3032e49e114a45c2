"""The benchmark's figures are consistent with what they are computed from (no timing assertions)."""
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from config_files import SMALL_REPORT, get_config
from steps import initial_state
from xla_env import xla_flags


@pytest.fixture(scope="module")
def throughput_rows():
    """The smoke config's throughput row (one block) with its whole batch of 32 in one microbatch, and in 4
    of 8."""
    from lsq_jax import bench

    rows = {}
    for size in (32, 8):
        c = get_config("baseconv", "smoke")
        c.model.n_layer = 1
        c.train.microbatch_size = size
        rows[size] = bench.throughput(c, "float64", n_windows=2, window_s=0.2)
    return rows


@pytest.mark.slow
def test_throughput_figures_are_consistent(throughput_rows):
    row = throughput_rows[32]
    assert row["steps_per_s_min"] <= row["steps_per_s"] <= row["steps_per_s_max"]
    np.testing.assert_allclose(row["examples_per_s"], row["steps_per_s"] * 32)
    np.testing.assert_allclose(row["roofline_ratio"], row["achieved_gflops"] / row["matmul_gflops"])
    np.testing.assert_allclose(row["peak_ratio"], row["achieved_gflops"] / row["peak_matmul_gflops"])
    assert row["matmul_gflops"] == max(row["matmul_gflops_by_form"].values())
    # forward alone is a block's 3 dense (64 x 64) products over 32 * 21 rows: the step must count at least that
    assert row["step_gflop"] * 1e9 > 3 * 2 * 32 * 21 * 64 * 64


@pytest.mark.slow
def test_step_flops_count_every_microbatch(throughput_rows):
    """XLA's cost analysis counts a loop body once: the bench must report the FLOPs of the whole step
    whether the step runs in 1 or 4 microbatches."""
    rows = throughput_rows
    assert rows[32]["microbatches"] == 1 and rows[8]["microbatches"] == 4
    assert set(rows[8]["matmul_gflops_by_form"]) == {"whole", "microbatched"}
    np.testing.assert_allclose(rows[8]["step_gflop"], rows[32]["step_gflop"], rtol=1e-12)


@pytest.mark.slow
def test_optimizer_comparison_reports_each_method_at_each_mark(tmp_path):
    """Adam and the hybrid (Adam, then LM) on a tiny LM config, 2 seeds: every run is on its seed and method,
    its curve starts at the initial parameters and its crossings are the curve's first points below each
    level; the table's median and range are those of the runs' curves at each mark; the plot is written."""

    from lsq_jax.bench import precision

    config = get_config("baseconv", "lm")
    config.update_from_flattened_dict({"task.n_dims": 2, "model.n_embd": 8, "train.batch_size": 200,
                                       **SMALL_REPORT})
    methods = {"adam": {"optim.optimizer": "adam"}, "hybrid": {"optim.optimizer": "lm", "optim.lm_after": 3}}
    r = precision.compare_optimizers(config, 2.0, methods, [0, 1], marks=(1.0, 2.0, 60.0))
    assert r["marks"] == [1.0, 2.0]
    for row in r["rows"]:
        runs = r["runs"][row["method"]]
        assert [x["seed"] for x in runs] == [0, 1]
        assert {x["optimizer"] for x in runs} == {"adam" if row["method"] == "adam" else "lm"}
        for mark in (1.0, 2.0):
            at = sorted(precision.mse_at(x["curve"], mark) for x in runs)
            assert row[f"{mark:.0f}s"] == pytest.approx((at[0] + at[1]) / 2, rel=1e-15)
            assert row[f"{mark:.0f}s_range"] == f"{at[0]:.1e}..{at[1]:.1e}"
    for x in (x for runs in r["runs"].values() for x in runs):
        check_curve(x, budget_s=2.0, initial=initial_state(precision.experiment(config, seed=x["seed"])).params)
    assert precision.plot_comparison(r, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0


def check_curve(r, budget_s, initial):
    """A time-to-precision run's curve: from the initial parameters at 0 s to the budget, in increasing steps
    and seconds, its crossings the first points below each level."""
    from lsq_jax.bench import precision

    assert r["batch_size"] == 200  # the config's own batch unless one is given
    curve = r["curve"]
    assert len(curve) >= 2 and curve[0] == {"step": 0, "seconds": 0.0, "test_mse": curve[0]["test_mse"],
                                            "param_norm": curve[0]["param_norm"]}
    assert r["steps"] == curve[-1]["step"] and curve[-1]["seconds"] >= budget_s
    np.testing.assert_allclose(curve[0]["param_norm"], np.linalg.norm(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(initial)])), rtol=1e-13)
    assert all(a["step"] < b["step"] and a["seconds"] < b["seconds"] for a, b in zip(curve, curve[1:]))
    for level in precision.PRECISION_LEVELS:
        below = [p for p in curve if p["test_mse"] < level]
        crossing = r["crossings"].get(f"{level:.0e}")
        assert crossing == ({"seconds": below[0]["seconds"], "step": below[0]["step"]} if below else None)


@pytest.mark.slow
def test_time_to_precision_trains_the_restarts_and_goes_on_from_the_best():
    """With optim.lm_restarts the bench trains each start, records each one's LM loss and the choice, and its
    curve goes on from the start with the lowest loss: the same parameters as that start trained alone."""
    from lsq_jax.bench import precision
    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.state import place_state
    from lsq_jax.train.step import Steps, advance, evaluate_loss

    config = get_config("baseconv", "lm")
    config.update_from_flattened_dict({"task.n_dims": 2, "model.n_embd": 8, "train.batch_size": 200,
                                       "optim.lm_restarts": 3, "optim.lm_restart_steps": 2, **SMALL_REPORT})
    r = precision.time_to_precision(config, budget_s=1.0)
    losses = r["restart_losses"]
    assert len(losses) == 3 and r["restart_chosen"] == int(np.argmin(losses))
    assert r["curve"][1]["step"] == 2 and r["curve"][1]["seconds"] > 0.0 and r["steps"] > 2
    exp = precision.experiment(config, **{"train.num_steps": 10**9})
    plan = make_plan(exp, make_mesh())
    steps, loss_after = Steps(plan), []
    for k in range(3):
        state = place_state(initial_state(exp, k), plan.mesh)
        for step in range(2):
            state, _ = advance(steps.at(step), state, step)
        loss_after.append(float(steps.at(2).lm_loss(state)))
        if k == r["restart_chosen"]:
            chosen = float(evaluate_loss(state.params, plan)["mse"])
    np.testing.assert_allclose(losses, loss_after, rtol=1e-12)
    np.testing.assert_allclose(r["curve"][1]["test_mse"], chosen, rtol=1e-12)


def test_mse_at_takes_the_last_measurement_at_or_before_the_mark():
    from lsq_jax.bench import precision

    curve = [{"seconds": 0.0, "test_mse": 3.0}, {"seconds": 50.0, "test_mse": 2.0}, {"seconds": 61.0, "test_mse": 1.0},
             {"seconds": 120.0, "test_mse": 0.5}]
    assert precision.mse_at(curve, 60.0) == 1.0  # 61 s is within the 2% tolerance of a mark
    assert precision.mse_at(curve, 100.0) == 1.0
    assert precision.mse_at(curve, 300.0) is None  # the run ended before


@pytest.mark.slow
def test_scaling_measures_each_count_on_that_many_devices():
    """Each row runs in its own process on exactly the requested device count (emulated here); the step's
    FLOPs are the whole step's, the same on any device count (not one device's share)."""

    from lsq_jax import bench

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "baseconv.py"
    config = get_config("baseconv", "smoke")
    config.model.n_layer = 1
    rows = bench.scaling(config, [f"--config={path}:smoke", "--config.model.n_layer=1"], [1, 2], n_windows=2,
                         window_s=0.2)
    assert [row["devices"] for row in rows] == [1, 2]
    assert rows[0]["speedup"] == 1.0
    np.testing.assert_allclose(rows[1]["speedup"], rows[1]["steps_per_s"] / rows[0]["steps_per_s"])
    np.testing.assert_allclose(rows[1]["efficiency"], rows[1]["speedup"] / 2)
    np.testing.assert_allclose(rows[1]["step_gflop"], rows[0]["step_gflop"], rtol=1e-12)


MACHINE_RATE_ON_2_DEVICES = """
import json, sys, jax
jax.config.update("jax_enable_x64", True)
import runpy
from lsq_jax import bench
get_config = lambda name, arg: runpy.run_path(f"configs/{name}.py")["get_config"](arg)
bench.matmul_rate = lambda *a, **k: 1e9  # one device's rate, whatever the shape
rows = {}
for backend in ("cpu", "gpu"):
    jax.default_backend = lambda: backend
    rows[backend] = bench.throughput(get_config("baseconv", "smoke"), "float64", n_windows=2, window_s=0.1, n_devices=2)
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_matmul_reference_is_the_machines_rate_on_several_devices():
    """Real accelerators each multiply at the rate measured on one: the reference is 2x on 2 of them.
    Emulated CPU devices share the cores one product already uses: the reference stays 1x."""
    import json
    import os
    import subprocess

    repo = pathlib.Path(__file__).resolve().parents[1]
    # the collective timeout as in test_train: emulated devices on 2 loaded cores can reach one far apart
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2",
                                                "--xla_cpu_collective_call_terminate_timeout_seconds=600")}
    proc = subprocess.run([sys.executable, "-c", MACHINE_RATE_ON_2_DEVICES], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for backend, machines in (("cpu", 1), ("gpu", 2)):
        row = rows[backend]
        assert row["devices"] == 2
        assert row["matmul_gflops"] == row["peak_matmul_gflops"] == machines
        np.testing.assert_allclose(row["roofline_ratio"], row["achieved_gflops"] / machines)


def test_config_argv_keeps_the_config_flags_in_both_forms():
    from lsq_jax import bench

    argv = ["--bench=scaling", "--config", "configs/a.py:cpu", "--config.train.batch_size=64", "--windows=3",
            "--config.dtype", "float32", "--out=x.json"]
    assert bench.config_argv(argv) == ["--config", "configs/a.py:cpu", "--config.train.batch_size=64",
                                       "--config.dtype", "float32"]
    assert bench.config_argv(["--config=configs/b.py", "--devices=1,2"]) == ["--config=configs/b.py"]
    assert bench.config_argv(["--bench=scaling"]) == []


@pytest.mark.slow
def test_scaling_on_accelerators_runs_here_and_skips_counts_the_machine_lacks(monkeypatch, capsys):
    """Off CPU the devices are real: each count runs in this process (no emulation flag, no subprocess),
    and a count above jax.device_count() is skipped with a line saying so."""
    import jax

    from lsq_jax import bench

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("started a subprocess"))
    n = jax.device_count()
    rows = bench.scaling(get_config("baseconv", "smoke"), [], [n, n + 1], n_windows=2, window_s=0.2)
    assert [row["devices"] for row in rows] == [n]
    assert rows[0]["speedup"] == 1.0 and rows[0]["efficiency"] == 1.0
    assert f"scaling: {n + 1} devices skipped ({n} available)" in capsys.readouterr().out


def test_help_lists_the_benchs_flags():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "lsq_jax.bench", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--bench", "--config", "--budget_s", "--seeds", "--out"):
        assert f"  {flag}:" in proc.stdout, proc.stdout
    assert proc.stdout.startswith("Benchmarks:")


REPO = pathlib.Path(__file__).resolve().parents[1]
BAD_FLAGS = [("--bench=nope", "--bench"), ("--bench=claims,", "--bench"), ("--dtypes=float16", "--dtypes"),
             ("--optimizers=sgd", "--optimizers"), ("--seeds=a", "--seeds"), ("--seeds=-1", "--seeds"),
             ("--devices=0", "--devices"), ("--repeats=0", "--repeats"), ("--windows=0", "--windows"),
             ("--budget_s=0", "--budget_s"), ("--window_s=-1", "--window_s"),
             ("--lm_memory_budget_gib=-1", "--lm_memory_budget_gib"), ("--lanczos_steps=0", "--lanczos_steps"),
             ("--bench=curvature", "--workdir"), ("--config=configs/nope.py", "--config"),
             ("--config.train.num_steps=x", "--config.train.num_steps"), ("--config.nofield=1", "--config.nofield"),
             ("--nosuchflag", "nosuchflag"), ("extra", "extra")]


@pytest.mark.parametrize("flag,named", BAD_FLAGS)
def test_a_bad_flag_is_refused_naming_it(flag, named, monkeypatch):
    from lsq_jax import bench
    from lsq_jax.config.check import ConfigError

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=named):
        bench.parse_flags(["bench", flag])
    bench.parse_flags(["bench"])  # the defaults are allowed


def test_a_bad_flag_is_one_line_status_2_and_nothing_written(tmp_path):
    """From the repository root and from elsewhere (where the default config file is not)."""
    import subprocess

    for flag, cwd in (("--bench=nope", REPO), ("--bench=claims", tmp_path)):
        proc = subprocess.run([sys.executable, "-m", "lsq_jax.bench", flag, f"--out={tmp_path / 'b.json'}"],
                              capture_output=True, text=True, timeout=120, cwd=cwd)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --") and not proc.stdout
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert list(tmp_path.iterdir()) == []


HLO_WITH_LOOPS = """
HloModule m

%add (a: f64[], b: f64[]) -> f64[] {
  %a = f64[] parameter(0)
  %b = f64[] parameter(1)
  ROOT %s = f64[] add(%a, %b)
}

%body (p: (s64[], f64[10,10])) -> (s64[], f64[10,10]) {
  %p = (s64[], f64[10,10]{1,0}) parameter(0)
  %x = f64[10,10]{1,0} get-tuple-element(%p), index=1
  %ar = f64[10,10]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ag = f64[20,10]{1,0} all-gather(%x), channel_id=3, replica_groups={{0,1}}, dimensions={0}
  %i = s64[] get-tuple-element(%p), index=0
  ROOT %t = (s64[], f64[10,10]{1,0}) tuple(%i, %ar)
}

%cond (p: (s64[], f64[10,10])) -> pred[] {
  %p = (s64[], f64[10,10]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f64[10,10], v: f32[7]) -> (f64[10,10], f32[7]) {
  %x = f64[10,10]{1,0} parameter(0)
  %v = f32[7]{0} parameter(1)
  %zero = s64[] constant(0)
  %init = (s64[], f64[10,10]{1,0}) tuple(%zero, %x)
  %w = (s64[], f64[10,10]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %u = (s64[], f64[10,10]{1,0}) while(%init), condition=%cond, body=%body
  %y = f64[10,10]{1,0} get-tuple-element(%w), index=1
  %both = (f64[10,10]{1,0}, f32[7]{0}) all-reduce(%y, %v), channel_id=2, replica_groups={{0,1}}, to_apply=%add
  ROOT %r = (f64[10,10]{1,0}, f32[7]{0}) tuple(%y, %v)
}
"""


def test_reduced_bytes_counts_operands_times_known_trip_counts():
    from lsq_jax.bench.lm import reduced_bytes

    # 6 trips of a 10 x 10 float64 all-reduce, one trip of the loop without a known count, and one tuple
    # all-reduce of 10 x 10 float64 and 7 float32
    assert reduced_bytes(HLO_WITH_LOOPS) == 6 * 800 + 800 + 800 + 7 * 4


def test_gathered_bytes_counts_all_gather_operands_in_the_same_way():
    from lsq_jax.bench.lm import gathered_bytes

    # the loop body's all-gather of a 10 x 10 float64 operand: 6 trips, then one of the loop without a count
    assert gathered_bytes(HLO_WITH_LOOPS) == 6 * 800 + 800


@pytest.mark.slow
def test_lm_scaling_reduces_the_normal_equations_once_whatever_the_chunks():
    """On 2 emulated devices the compiled LM step reduces J^T J's lower triangle, J^T r and r.r once per
    iteration, and per damped solve the trial loss, the geodesic acceleration's J^T r'' and the acceleration
    solved on the device that factorised that try, and gathers each round's steps: the same bytes with 1 and
    6 chunks per device."""
    from lsq_jax import bench
    from lsq_jax.models.backbone import parameter_count

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "baseconv.py"
    sizes = {"task.n_dims": 2, "model.n_embd": 7, "model.n_layer": 1, "train.batch_size": 48}
    rows = []
    for chunk in (24, 4):
        config = get_config("baseconv", "lm")
        config.update_from_flattened_dict({**sizes, "optim.lm_chunk": chunk})
        argv = [f"--config={path}:lm", *(f"--config.{k}={v}" for k, v in {**sizes, "optim.lm_chunk": chunk}.items())]
        rows += bench.lm_scaling(config, argv, [2], repeats=1)
    assert [row["chunks_per_device"] for row in rows] == [1, 6]
    config = get_config("baseconv", "lm")
    config.update_from_flattened_dict(sizes)
    p = parameter_count(bench.experiment(config).model)
    for row in rows:
        assert row["devices"] == 2 and row["n_params"] == p and row["solver"] == "cholesky"
        assert row["allreduce_bytes_per_iteration"] == 8 * (p * (p + 1) // 2 + p + 1 + (1 + p + p))
        # per round of tries, each device's step, its predicted reduction and whether it is finite
        assert row["allgather_bytes_per_iteration"] == 8 * (p + 1) + 1
        # each of the 2 emulated devices' LAPACK on its share of the cores
        assert row["lapack_threads"] == os.environ.get("OPENBLAS_NUM_THREADS",
                                                       str(max(1, len(os.sched_getaffinity(0)) // 2)))
        assert row["seconds_per_iteration"] > 0 and row["tries_mean"] >= 1


def test_lm_solve_row_solves_by_the_block_cholesky_and_cuts_cg_short():
    """The residuals are numpy's ||A x - b|| / ||b|| of each solution: the block Cholesky's at round-off,
    5 CG iterations' far from it on a matrix of condition 1e6."""
    from lsq_jax.bench.lm import lm_solve_row

    row = lm_solve_row(30, 1, repeats=1, cg_iterations=5)
    assert row["devices"] == 1 and row["n_params"] == 30
    assert row["cholesky_residual"] < 1e-10 and row["cg_residual"] > 1e-3
    assert row["cholesky_s"] > 0 and row["cg_s"] > 0


@pytest.mark.slow
def test_generality_reads_the_grid_as_the_targets_do(tmp_path):
    """A scale-equivariant model over rows [5, 6] and kappa [1, 10], as initialised: the in-distribution
    one-step error is the median of ||model - g|| / ||g|| computed in numpy on that cell's problems, the
    largest gap in range is that of the cells inside, target scale 100 has gap 1 (the model is equivariant)
    and the cells outside are named as the targets name them."""
    from lsq_jax.bench.generality import generality, plot_generality, summarize
    from lsq_jax.eval.ood import draw_cell
    from lsq_jax.mesh import make_mesh
    from lsq_jax.plan.run import make_plan
    from lsq_jax.bench.precision import experiment

    config = get_config("linear_attention", "smoke")
    exp = experiment(config, **{"task.n_points": 6, "task.n_points_min": 5, "model.n_positions": 9,
                                "task.scale_cond_max": 10.0, "model.scale_equivariant": True, **SMALL_REPORT})
    plan = make_plan(exp, make_mesh())
    params = initial_state(exp).params
    r = generality(plan.report, params)
    cells = r["cells"]
    assert cells[0]["axis"] == "in_distribution" and (cells[0]["kappa"], cells[0]["n_points"]) == (1.0, 6)
    a, b, _, x0 = (np.asarray(v) for v in draw_cell(jax.random.fold_in(plan.report.key, 2), cells[0],
                                                    n_problems=SMALL_REPORT["train.eval_problems"], n_dims=exp.task.n_dims))
    tokens = np.concatenate([np.concatenate([x0, np.zeros((len(x0), 1))], 1)[:, None],
                             np.concatenate([a, b[..., None]], -1)], 1)
    pred = np.asarray(plan.report.model.apply({"params": params}, tokens))[:, -1, :exp.task.n_dims]
    g = np.einsum("nld,nl->nd", a, np.einsum("nld,nd->nl", a, x0) - b) / a.shape[1]
    np.testing.assert_allclose(r["in_distribution_step_error"],
                               np.median(np.linalg.norm(pred - g, axis=1) / np.linalg.norm(g, axis=1)), rtol=1e-10)
    assert r["max_gap_in_range"] == max(c["gap"] for c in cells if c["in_range"])
    assert {c["n_points"] for c in cells if c["in_range"] and c["axis"] == "rows"} == {5}
    np.testing.assert_allclose(r["gap_scale_target_100"], 1.0, rtol=1e-6)
    assert {"gap_kappa_1000", "gap_n_points_8", "final_vs_gd_kappa_1000", "final_vs_gd_n_points_8"} <= set(r)
    path = plot_generality({"runs": {"lm": [{"config": exp.name, "generality": r}]}}, str(tmp_path / "g.png"))
    assert path and (tmp_path / "g.png").stat().st_size > 0
    runs = [{"generality": {"max_gap_in_range": v, "gap_kappa_1000": None}} for v in (3.0, 1.0, 2.0)]
    assert summarize(runs) == {"max_gap_in_range": 2.0, "max_gap_in_range_range": "1..3",
                               "gap_kappa_1000": float("inf"), "gap_kappa_1000_range": "inf..inf"}


def test_lm_scaling_row_reports_cg_iterations_within_the_cap_fewer_with_the_forcing_term():
    from lsq_jax import bench
    from lsq_jax.bench.lm import lm_scaling_row

    sizes = {"task.n_dims": 2, "model.n_embd": 7, "model.n_layer": 1, "train.batch_size": 48,
             "optim.lm_solver": "cg", "optim.lm_cg_iters": 40}
    rows = {}
    for forcing in (False, True):
        config = get_config("baseconv", "lm")
        config.update_from_flattened_dict({**sizes, "optim.lm_cg_forcing": forcing})
        rows[forcing] = lm_scaling_row(bench.experiment(config), 1, repeats=2)
    assert rows[False]["solver"] == rows[True]["solver"] == "cg"
    # the step's and the geodesic acceleration's solves, each at most 40 iterations
    assert 0 < rows[True]["cg_iterations_mean"] < rows[False]["cg_iterations_mean"] <= 2 * 40
