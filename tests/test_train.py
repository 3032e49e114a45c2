"""The training step against independent computations, device-count invariance, and the CLI."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax import main
from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.data.keys import run_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.eval.plots import read_metrics
from lsq_jax.mesh import make_mesh
from lsq_jax.models.backbone import SequenceModel
from lsq_jax.optim import recipe, step_guard
from lsq_jax.plan.run import CPU_SCAN_UNROLL, Phase, make_plan, microbatches
from lsq_jax.train.state import place_state
from lsq_jax.train import step as step_module
from lsq_jax.train.step import accumulated_value_and_grad, advance, draw_batch
from steps import full_size_fns, initial_state

from config_files import SMALL_REPORT_FLAGS, get_config
from xla_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_experiment(**overrides):
    c = get_config("baseconv", "smoke")
    c.update_from_flattened_dict(overrides)
    return experiment_from_config(c)


def run_steps(exp, n, state=None):
    mesh = make_mesh()
    state = place_state(state if state is not None else initial_state(exp), mesh)
    fns = full_size_fns(exp, mesh)
    for i in range(int(state.step), int(state.step) + n):
        state, metrics = advance(fns, state, i)
    return state, metrics


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.slow
def test_every_floating_leaf_has_the_configured_dtype(dtype):
    state, metrics = run_steps(smoke_experiment(dtype=dtype), 1)
    for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.dtype(dtype)
    assert metrics["loss"].dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("microbatch_size", [32, 8])
@pytest.mark.slow
def test_step_is_sgd_with_l1_on_the_drawn_batch(microbatch_size):
    """With plain SGD (no momentum, no clipping effect) one step is p - lr (grad of the task loss on the
    batch of that step + l1 sign(p)); the gradient is computed here independently of the train step, on the
    whole batch at once, while the step accumulates it over 1 or 4 microbatches."""
    lr, l1 = 0.05, 1e-3
    exp = smoke_experiment(**{"optim.optimizer": "sgd", "optim.momentum": 0.0, "optim.schedule": "constant",
                              "optim.lr": lr, "optim.l1": l1, "optim.ema_lambda": 0.0,
                              "train.grad_stats_batches": 0, "optim.clip_norm": 1e12,
                              "train.microbatch_size": microbatch_size})
    assert make_plan(exp, make_mesh()).microbatches[exp.task.n_points] == 32 // microbatch_size
    state0 = initial_state(exp)
    params0 = jax.tree_util.tree_map(np.asarray, state0.params)
    state, metrics = run_steps(exp, 1, state0)
    task = make_task(exp.task)
    batch = draw_batch(task, run_keys(exp.seed)["data"], 0, exp.train.batch_size, exp.task.n_points, None)
    model = SequenceModel(exp.model)
    def full_loss(p):  # the whole output sequence, not the train step's last-position shortcut
        return task.loss(model.apply({"params": p}, batch.inputs), batch.targets)

    grads = jax.grad(full_loss)(params0)
    expected = jax.tree_util.tree_map(lambda p, g: p - lr * (g + l1 * np.sign(p)), params0, grads)
    for got, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(metrics["loss"], full_loss(params0), rtol=1e-13)


def test_non_finite_loss_is_never_written_into_the_parameters():
    exp = smoke_experiment()
    state = initial_state(exp)
    # a read-out bias of 1e300 makes the squared error overflow: loss and gradient are inf / NaN
    params = jax.tree_util.tree_map(lambda x: x, state.params)
    params["read_out"]["bias"] = params["read_out"]["bias"].at[0].set(1e300)
    state = state._replace(params=params)
    before = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
    after, metrics = run_steps(exp, 2, state)
    assert not np.isfinite(metrics["loss"])
    assert int(step_guard.skipped_steps(after.opt_state)) == 2
    assert int(after.step) == 2
    for a, b in zip(jax.tree_util.tree_leaves(before[0]), jax.tree_util.tree_leaves(after.params)):
        np.testing.assert_array_equal(a, b)


def test_gradient_statistics_only_on_measurement_steps():
    exp = smoke_experiment(**{"train.log_every": 3})
    mesh = make_mesh()
    state = place_state(initial_state(exp), mesh)
    fns = full_size_fns(exp, mesh)
    seen = []
    for i in range(4):
        state, metrics = advance(fns, state, i)
        seen.append("gradient_cosine_mean" in metrics and bool(np.isfinite(metrics["gradient_cosine_mean"])))
    assert seen == [True, False, False, True]


def test_measured_cosine_reaches_the_adaptive_lr():
    """The statistics' mean cosine, measured in its own call, is the metric the step's LR controller
    absorbs: its EMA after step 0 is decay * EMA before + (1 - decay) * cosine, computed here by hand."""
    exp = smoke_experiment()
    mesh = make_mesh()
    state = place_state(initial_state(exp), mesh)
    fns = full_size_fns(exp, mesh)
    key = "gradient_cosine_metric_lrscheduler"
    before = float(recipe.optimizer_metrics(state.opt_state)[key])
    cosine = float(fns.stats(state)["gradient_cosine_mean"])
    state, _ = advance(fns, state, 0)
    decay = exp.optim.metric_decay
    np.testing.assert_allclose(float(recipe.optimizer_metrics(state.opt_state)[key]),
                               decay * before + (1 - decay) * cosine, rtol=1e-14)


def test_curriculum_sizes_follow_the_schedule():
    c = get_config("baseconv", "smoke")
    c.curriculum.points.update(start=6, inc=2, interval=10)
    c.curriculum.dims.update(start=2, inc=1, interval=5)
    exp = experiment_from_config(c)
    plan = make_plan(exp, make_mesh())
    assert plan.phase(0) == Phase(6, 2, False)
    assert plan.phase(9) == Phase(6, 3, False)
    assert plan.phase(10) == Phase(8, 4, False)
    assert plan.phase(15) == Phase(8, None, False)  # dims reached n_dims = 5: no truncation
    assert plan.phase(10_000) == Phase(20, None, False) == plan.full_size()
    assert sorted(plan.microbatches) == list(range(6, 21, 2))  # every size the curriculum reaches


def test_accumulated_gradient_is_the_least_squares_gradient():
    """Mean of chunk losses mean((X_c w - y_c)^2) and its gradient, accumulated over chunks of interleaved
    rows, against the closed form 2/N X^T (X w - y) of the whole batch (numpy)."""
    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(48, 5)), rng.normal(size=48), rng.normal(size=5)
    want_loss = np.mean((x @ w - y) ** 2)
    want_grad = 2 / len(y) * x.T @ (x @ w - y)

    def chunk_loss(w, rows):
        xc, yc = rows
        r = xc @ w - yc
        return jnp.mean(r ** 2), jnp.max(jnp.abs(r))

    resid = np.abs(x @ w - y)
    for n_chunks in (1, 2, 3, 4, 8, 16):  # 3: an odd count, with the CPU scan unrolled by 2
        (loss, aux), grad = jax.jit(accumulated_value_and_grad, static_argnums=(0, 3))(
            chunk_loss, jnp.asarray(w), (jnp.asarray(x), jnp.asarray(y)), n_chunks)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-14)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-13, atol=1e-15)
        # chunk c holds rows c, c + n, c + 2n, ...: the aux averages each chunk's max residual
        np.testing.assert_allclose(aux, np.mean([resid[c::n_chunks].max() for c in range(n_chunks)]), rtol=1e-14)


def test_microbatch_scan_is_unrolled_on_cpu_only(monkeypatch):
    """On CPU two microbatches per scan iteration (two cores); elsewhere one, so that a microbatch size
    chosen to fit device memory is the most that is live at once."""
    def loss(w, x):
        return jnp.mean(x @ w), None

    def scan_unroll():
        jaxpr = jax.make_jaxpr(lambda w, x: accumulated_value_and_grad(loss, w, x, 4))(
            jnp.ones(3), jnp.ones((8, 3)))
        (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        return eqn.params["unroll"]

    assert scan_unroll() == CPU_SCAN_UNROLL == 2
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert scan_unroll() == 1


def test_auto_microbatches_keep_an_activation_within_2_17_elements():
    exp = smoke_experiment(**{"train.batch_size": 1024})  # T = 21, E = 64
    task, n = make_task(exp.task), exp.task.n_points
    # 64 examples x 21 x 64 = 86,016 elements <= 2^17 < 128 examples, in float64 and float32 alike
    assert microbatches(exp, task, n, 1, backend="cpu") == 16
    assert microbatches(exp, task, n, 2, backend="cpu") == 8
    assert microbatches(smoke_experiment(**{"train.batch_size": 1024, "dtype": "float32"}), task, n, 1,
                        backend="cpu") == 16
    assert microbatches(exp, task, n, 1, backend="gpu") == 1
    assert microbatches(smoke_experiment(), task, n, 1, backend="cpu") == 1  # batch 32: fits
    with pytest.raises(ValueError, match="train.microbatch_size=48 .* per-device batch 512"):
        microbatches(smoke_experiment(**{"train.batch_size": 1024, "train.microbatch_size": 48}), task, n, 2,
                     backend="cpu")


# --- subprocesses: device counts and the command line ------------------------------------------------------

DUMP_PARAMS = textwrap.dedent("""
    import runpy, sys, numpy as np, jax
    jax.config.update("jax_enable_x64", True)
    from lsq_jax.config.experiment import experiment_from_config
    from lsq_jax.mesh import make_mesh
    from lsq_jax.train.state import init_state, place_state
    from lsq_jax.plan.run import make_plan
    from lsq_jax.train.loop import drive
    from lsq_jax.train.step import Steps
    c = runpy.run_path("configs/baseconv.py")["get_config"]("smoke")
    # the update alone: no gradient statistics, and a schedule that does not read them
    c.update_from_flattened_dict({"train.grad_stats_batches": 0, "optim.schedule": "step",
                                  "train.microbatch_size": int(sys.argv[3])})
    exp = experiment_from_config(c)
    mesh = make_mesh()
    assert mesh.devices.size == int(sys.argv[2]), mesh
    plan = make_plan(exp, mesh)
    assert plan.waits_each_step == (mesh.devices.size > 1)
    state = place_state(init_state(plan), mesh)
    state, _ = drive(Steps(plan), state, int(sys.argv[4]), lambda *_: False)
    leaves = jax.tree_util.tree_leaves(state.params)
    np.savez(sys.argv[1], *[np.asarray(x) for x in leaves])
""")


# emulated devices are threads: on a loaded 2-core machine one may reach a collective long after the other,
# and XLA's default 40 s rendezvous limit would abort the process
SLOW_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=600"


def _run(args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_same_parameters_on_1_and_4_devices(tmp_path):
    """50 steps through the training loop. On 4 emulated devices the loop waits for each step
    (RunPlan.waits_each_step): without that wait, the same run of 500 steps hung every time."""
    results = {}
    for n in (1, 4):
        out = tmp_path / f"params{n}.npz"
        # 1 device: the whole batch of 32 at once; 4 devices: 2 microbatches of 4 each
        proc = _run([sys.executable, "-c", DUMP_PARAMS, str(out), str(n), "32" if n == 1 else "4", "50"],
                    {"XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={n}", SLOW_COLLECTIVES)},
                    timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        z = np.load(out)
        results[n] = [z[k] for k in z.files]
    # a split batch sums its gradient in another order; after 50 Adam steps (eps 1e-16) that round-off has
    # grown to a relative 1e-12 on some CPUs (8e-13 measured), a wrong shard would give O(1)
    for n in (4,):
        for a, b in zip(results[1], results[n]):
            assert np.linalg.norm(b - a) <= 1e-11 * np.linalg.norm(a), (n, np.linalg.norm(b - a) / np.linalg.norm(a))


def _main(*args):
    return _run([sys.executable, "-m", "lsq_jax.main", *args], timeout=300)


@pytest.mark.slow
def test_cli_smoke_run_writes_metrics_and_config(tmp_path):
    proc = _main("--config=configs/baseconv.py:smoke", f"--workdir={tmp_path}", "--config.train.num_steps=60",
                 "--config.train.log_every=20", *SMALL_REPORT_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"workdir: {tmp_path}" in proc.stdout
    assert "steps/s" in proc.stdout and "ETA" in proc.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records[:-1]] == [0, 20, 40, 59]
    assert all(np.isfinite(r["loss"]) for r in records[:-1])
    assert "eval_mse" in records[-1]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["num_steps"] == 60 and config["model"]["n_embd"] == 64
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["iterated"]["methods"]) >= {"learned", "gd", "cg", "lstsq"}
    # the report's test MSE is the task loss of the restored model: evaluate it again from the CLI
    proc = _main("--mode=eval", f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating step 60" in proc.stdout and "learned" in proc.stdout
    again = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert again["single_step"] == report["single_step"]


@pytest.mark.slow
def test_cli_construct_reaches_round_off_like_gd(tmp_path):
    proc = _main("--mode=construct", "--config=configs/baseconv.py:smoke", f"--workdir={tmp_path}",
                 "--config.train.eval_iters=1000", "--config.train.eval_problems=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = json.loads((tmp_path / "eval" / "report.json").read_text())["iterated"]["methods"]
    for name in ("baseconv_gd", "linear_attention_gd"):
        assert methods[name]["final_forward_error"] <= 1e-13
        assert max(methods[name]["distance_to_gd"]["p90"]) <= 1e-13


BAD_INPUTS = [
    (["--config=configs/baseconv.py:smoke", "--config.train.num_steps=abc"], "num_steps"),
    (["--config=configs/baseconv.py:smoke", "--config.train.nosuch=1"], "nosuch"),
    (["--config=configs/baseconv.py:smoke", "--config.train.batch_size=0"], "train.batch_size"),
    (["--config=configs/baseconv.py:smoke", "--config.model.mixer=mamba"], "model.mixer"),
    (["--config=configs/baseconv.py:smoke", "--config.optim.schedule=adaptive",
      "--config.train.grad_stats_batches=0"], "grad_stats_batches"),
    (["--config=configs/baseconv.py:smoke", "--config.model.n_positions=5"], "model.n_positions"),
    (["--config=configs/baseconv.py:smoke", "--mode=fly"], "mode"),
    (["--config=configs/nosuch.py"], "nosuch.py"),
    (["--config=configs/baseconv.py:huge"], "huge"),
    (["--config=configs/baseconv.py:smoke", "--config.optim.gamma=1.5"], "gamma"),
    (["--config=configs/baseconv.py:smoke", "--config.train.microbatch_size=5"], "train.microbatch_size"),
    (["--mode=eval"], "no checkpoints"),  # the test's --workdir is an empty directory
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(args, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    status = main.run(["lsq_jax.main", *args, f"--workdir={tmp_path}"], log=lambda _: None)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path):
    """The real exit path: one line on stderr, exit status 2, no traceback."""
    proc = _main("--config=configs/baseconv.py:smoke", "--config.train.nosuch=1", f"--workdir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --config.train.nosuch: the config has no field " \
        "'nosuch'", proc.stderr


def test_no_recompilation_after_the_first_step(monkeypatch):
    """Each jitted function is traced once: its Python body runs only while jax traces it."""
    traces = {"train_step": 0, "measure_grad_stats": 0}

    def counted(name, fn):
        def traced(*args, **kwargs):
            traces[name] += 1
            return fn(*args, **kwargs)
        return traced

    for name in traces:
        monkeypatch.setattr(step_module, name, counted(name, getattr(step_module, name)))
    exp = smoke_experiment()
    mesh = make_mesh()
    state = place_state(initial_state(exp), mesh)
    fns = full_size_fns(exp, mesh)
    for i in range(5):  # step 0 measures the gradient statistics, the others pass the NaN metric
        state, _ = advance(fns, state, i)
    assert traces == {"train_step": 1, "measure_grad_stats": 1}


@pytest.mark.slow
def test_a_progress_line_comes_by_time_whatever_log_every_is(tmp_path, monkeypatch):
    """With the progress intervals at 0 every step prints its rate and ETA; metrics.jsonl keeps the log_every
    records alone."""
    from lsq_jax.eval import report as eval_report
    from lsq_jax.train import log as train_log

    monkeypatch.setattr(train_log, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(train_log, "PROGRESS_FIRST_S", 0.0)
    monkeypatch.setattr(eval_report, "write_evaluation", lambda *a, **k: {})
    out = []
    status = main.run(["lsq_jax.main", "--config=configs/baseconv.py:smoke", f"--workdir={tmp_path}",
                       "--config.train.num_steps=6", "--config.train.log_every=100",
                       ], log=out.append)
    assert status == 0, out
    lines = [line for line in out if line.startswith("step ")]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(6))
    assert all("steps/s" in line and "ETA" in line for line in lines)
    assert "ETA ?" not in lines[-1]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [0, 5]
