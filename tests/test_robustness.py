"""What a user or a cluster does to a run, in-process through `lsq_jax.main.run`: relative and default
workdirs, preemption during a save, damaged checkpoints, a non-finite loss, two runs in one workdir, broken
config files, unusable workdirs, sizes that cannot fit in memory. Each ends in exit status 0 and a run
that resumes and finishes, or exit status 2 with one line on stderr and the workdir untouched."""
import errno
import importlib
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

from lsq_jax import checkpoint, main
from lsq_jax.checkpoint import Checkpointer
from lsq_jax.workdir import Workdir, WorkdirLock, resolve_workdir
from lsq_jax.eval import report as eval_report
from lsq_jax.eval.plots import read_metrics
from lsq_jax.mesh import make_mesh, replicated
from lsq_jax.models.backbone import abstract_params, init_params
from lsq_jax.plan.run import divisors, make_plan

from config_files import SMALL_REPORT_FLAGS, get_config
from trees import snapshot

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"--config={REPO / 'configs' / 'baseconv.py'}:smoke"
SMALL = [CONFIG, "--config.train.log_every=10", "--config.train.checkpoint_every=20",
         "--config.train.eval_batch_size=64"]


@pytest.fixture
def no_report(monkeypatch):
    """Skip the evaluation report (its out-of-distribution grid compiles for minutes): the tests here are
    about the run around it. Records the params it was asked to evaluate."""
    calls = []
    monkeypatch.setattr(eval_report, "write_evaluation",
                        lambda exp, params, workdir, **kw: calls.append(params) or {})
    return calls


def run(*args, steps=40):
    """main.run in this process: (exit status, stdout lines, stderr text)."""
    out = []
    import io
    from contextlib import redirect_stderr
    err = io.StringIO()
    with redirect_stderr(err):  # main.run puts back the SIGTERM handler it installs
        status = main.run(["lsq_jax.main", *SMALL, f"--config.train.num_steps={steps}", *args], log=out.append)
    return status, out, err.getvalue()


def assert_bad_input(status, err, needle):
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def params_of(workdir, step=None):
    """(parameter leaves, step) of a workdir's checkpoint, restored as --mode=eval restores them."""
    _, step, params = checkpoint.restore_params(resolve_workdir(str(workdir)), step,
                                                lambda exp: abstract_params(exp.model), replicated(make_mesh()),
                                                log=lambda _: None)
    return [np.asarray(x) for x in jax.tree.leaves(params)], step


# -- workdirs ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_and_relative_workdirs_resolve_against_the_current_directory(tmp_path, monkeypatch, no_report):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(steps=20)
    assert status == 0, err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("baseconv-smoke-")
    assert f"workdir: {runs[0]}" in out and (runs[0] / "checkpoints" / "20").is_dir()
    status, out, err = run("--workdir=rel/x", steps=20)
    assert status == 0, err
    assert (tmp_path / "rel" / "x" / "checkpoints" / "20").is_dir()
    assert not (tmp_path / "rel" / "x" / "lock").exists()  # released at the end


def test_a_plain_file_or_an_unwritable_place_as_workdir_is_refused(tmp_path, no_report):
    plain = tmp_path / "file"
    plain.write_text("x")
    status, _, err = run(f"--workdir={plain}")
    assert_bad_input(status, err, "not a directory")
    assert plain.read_text() == "x"
    status, _, err = run("--workdir=/proc/self/cannot")
    assert_bad_input(status, err, "not writable")


@pytest.mark.parametrize("mode", ["eval", "construct"])
def test_noreport_outside_training_is_one_line(tmp_path, mode, no_report):
    status, _, err = run(f"--mode={mode}", "--noreport", f"--workdir={tmp_path / 'w'}")
    assert_bad_input(status, err, "--noreport")
    assert not (tmp_path / "w").exists() and not no_report


def test_eval_into_a_read_only_workdir_stops_before_evaluating(tmp_path, no_report, monkeypatch):
    assert run(f"--workdir={tmp_path}", steps=20)[0] == 0
    before = snapshot(tmp_path)
    real_write = checkpoint.epath.Path.write_text

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.epath.Path, "write_text", read_only)
    status, out, err = run("--mode=eval", f"--workdir={tmp_path}")
    assert_bad_input(status, err, "not writable")
    assert not no_report[1:] and not any("evaluating" in line for line in out)
    assert snapshot(tmp_path) == before


# -- preemption and damaged checkpoints ----------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_a_save_exits_0_and_the_run_resumes_to_the_end(tmp_path, no_report, monkeypatch):
    real_save = Checkpointer.save

    def save_then_signal(self, step, state, config, *, force=False):
        saved = real_save(self, step, state, config, force=force)
        if step == 20:  # the regular save of step 20 is in flight when the notice arrives
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    monkeypatch.setattr(Checkpointer, "save", save_then_signal)
    status, out, err = run(f"--workdir={tmp_path}")
    assert status == 0, err
    assert any("preempted" in line for line in out)
    assert Checkpointer(tmp_path, read_only=True).steps()[-1] == 20
    monkeypatch.setattr(Checkpointer, "save", real_save)
    status, out, err = run(f"--workdir={tmp_path}")
    assert status == 0, err
    assert "resumed from step 20" in out
    assert params_of(tmp_path)[1] == 40


def test_sigterm_outside_the_steps_exits_0(tmp_path, no_report, monkeypatch):
    monkeypatch.setattr(eval_report, "write_evaluation", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    status, out, err = run(f"--workdir={tmp_path}", steps=20)
    assert status == 0, err
    assert any("run the same command to resume" in line for line in out)


def _truncate(workdir, step):
    for path in (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.slow
def test_an_unrestorable_newest_checkpoint_is_set_aside_and_training_goes_past_it(tmp_path, no_report):
    assert run(f"--workdir={tmp_path}", steps=40)[0] == 0
    reference, _ = params_of(tmp_path, 40)
    _truncate(tmp_path, 40)
    status, out, err = run(f"--workdir={tmp_path}", steps=60)
    assert status == 0, err
    assert any("checkpoint 40" in line and "unrestorable" in line for line in out)
    assert "resumed from step 20" in out
    assert Checkpointer(tmp_path, read_only=True).steps()[-2:] == [40, 60]
    (kept,) = (tmp_path / "unrestorable").iterdir()
    assert kept.name.startswith("40-")
    again, _ = params_of(tmp_path, 40)  # trained again from 20: the same state, bit for bit
    for a, b in zip(reference, again):
        np.testing.assert_array_equal(a, b)
    assert run(f"--workdir={tmp_path}", steps=60)[0] == 0  # and the workdir is not wedged


@pytest.mark.slow
def test_eval_falls_back_past_a_checkpoint_whose_config_is_garbage(tmp_path, no_report):
    assert run(f"--workdir={tmp_path}", steps=40)[0] == 0
    (tmp_path / "checkpoints" / "40" / "config" / "metadata").write_text("{not json")
    status, out, err = run("--mode=eval", f"--workdir={tmp_path}")
    assert status == 0, err
    assert any("checkpoint 40" in line and "earlier" in line for line in out)
    assert "evaluating step 20 of baseconv-smoke" in out
    status, _, err = run("--mode=eval", "--step=40", f"--workdir={tmp_path}")
    assert_bad_input(status, err, "40")


@pytest.mark.slow
def test_non_finite_loss_is_logged_skipped_and_the_run_ends_cleanly(tmp_path, no_report):
    status, out, err = run(f"--workdir={tmp_path}", "--config.optim.lr=1e30", steps=30)
    assert status == 0, err
    records = read_metrics(tmp_path / "metrics.jsonl")
    skipped = [r for r in records if "loss" in r and not np.isfinite(r["loss"])]
    assert skipped and all(r["skipped_steps"] >= 1 for r in skipped)
    assert any("non-finite" in line for line in out)
    assert all(np.all(np.isfinite(p)) for p in params_of(tmp_path)[0])


# -- two runs ----------------------------------------------------------------------------------------------

def test_a_workdir_in_use_is_refused_and_a_stale_lock_is_taken_over(tmp_path, no_report):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                   "time": time.time()}))
        status, _, err = run(f"--workdir={tmp_path}")
        assert_bad_input(status, err, "in use by another run")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]
    finally:
        holder.kill()
        holder.wait()
    status, out, err = run(f"--workdir={tmp_path}", steps=20)  # its pid is dead now: a stale lock
    assert status == 0, err
    assert any("stale lock" in line for line in out) and not (tmp_path / "lock").exists()


def test_lock_of_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path):
    lock = WorkdirLock(tmp_path, stale_s=60)
    assert not lock.is_stale({"pid": 1, "host": "elsewhere", "time": time.time() - 10})
    assert lock.is_stale({"pid": 1, "host": "elsewhere", "time": time.time() - 120})
    assert lock.is_stale({})  # unreadable
    beating = WorkdirLock(tmp_path, heartbeat_s=0.05)
    beating.acquire()
    first = beating.holder()["time"]
    time.sleep(0.3)
    assert beating.holder()["time"] > first and beating.holder()["pid"] == os.getpid()
    beating.release()
    assert beating.holder() is None


def test_only_the_writing_process_writes_the_workdir(tmp_path):
    """A Workdir on a process that does not write: its files, folders and lines are no-ops."""
    lines = []
    for writer in (False, True):
        workdir = Workdir(tmp_path / str(writer), writer=writer)
        workdir.check_writable(workdir.path)
        workdir.write(workdir / "config.json", "{}\n")
        workdir.append(workdir / "metrics.jsonl", "a\n")
        workdir.append(workdir / "metrics.jsonl", "b\n")
        workdir.log(lines.append)(writer)
    assert not (tmp_path / "False").exists()
    assert (tmp_path / "True" / "config.json").read_text() == "{}\n"
    assert (tmp_path / "True" / "metrics.jsonl").read_text() == "a\nb\n"
    assert lines == [True]


# -- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, source, needle", [
    ("config.py", "def get_config(:\n    pass\n", "line 1"),
    ("config.py", "def get_config(arg=None):\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("config.py", "x = 1\n", "has no get_config() function"),
    ("passwd", "root:x:0:0:root:/root:/bin/bash\n", "is not a Python file"),
])
def test_a_broken_config_file_is_one_line(tmp_path, name, source, needle, no_report):
    path = tmp_path / name
    path.write_text(source)
    import io
    from contextlib import redirect_stderr
    err = io.StringIO()
    with redirect_stderr(err):
        status = main.run(["lsq_jax.main", f"--config={path}", f"--workdir={tmp_path / 'w'}"], log=lambda _: None)
    assert_bad_input(status, err.getvalue(), needle)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, needle", [
    ("--config.train.batch_size=1000000000000", "train.batch_size"),
    ("--config.model.n_embd=100000", "model.n_embd"),
    ("--config.model.n_embd=1000000000", "model.n_embd"),
    ("--config.train.eval_problems=1000000000", "train.eval_problems"),
    ("--config.train.eval_iters=1000000000", "train.eval_iters"),
    ("--config.train.eval_batch_size=100000000", "train.eval_batch_size"),
    ("--config.task.n_dims=100000", "task.n_dims"),
    ("--config.task.n_points=100000", "task.n_points"),
    ("--config.task.n_points=3000", "task.n_points"),
])
def test_sizes_that_cannot_fit_are_refused_before_anything_is_written(tmp_path, override, needle, no_report):
    started = time.perf_counter()
    status, _, err = run(f"--workdir={tmp_path / 'w'}", override)
    assert_bad_input(status, err, needle)
    assert "GiB" in err and time.perf_counter() - started < 60
    assert not (tmp_path / "w").exists()


def test_memory_estimate_counts_the_parameters_and_the_batch():
    exp = main_experiment()
    n_params = sum(x.size for x in jax.tree.leaves(init_params(exp.model, jax.random.key(0))))
    parts = make_plan(exp, make_mesh(1), backend="gpu").memory
    assert parts["state"] == 6 * n_params * 8
    # T = 21 tokens of width D + 1 = 6, the L x D = 20 x 5 matrix A, a key
    assert parts["data"] == exp.train.batch_size * ((21 * 6 + 20 * 5) * 8 + 8)
    assert parts["activations"] == 2 * 4 * exp.train.batch_size * 21 * 64 * 8  # one microbatch on GPU


def main_experiment():

    from lsq_jax.config.experiment import experiment_from_config
    return experiment_from_config(get_config("baseconv", "smoke"))


def test_divisors_are_found_without_enumerating_every_integer():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(49) == [1, 7, 49]
    n = 2**40
    assert divisors(n) == [2**k for k in range(41)]


@pytest.mark.slow
def test_matmul_precision_is_highest_and_saved(tmp_path, no_report):
    assert run(f"--workdir={tmp_path}", "--config.dtype=float32", steps=10)[0] == 0
    assert json.loads((tmp_path / "config.json").read_text())["matmul_precision"] == "highest"
    assert jax.config.jax_default_matmul_precision == "highest"
    status, _, err = run(f"--workdir={tmp_path / 'w'}", "--config.matmul_precision=bf16")
    assert_bad_input(status, err, "matmul_precision")


FIRST_COMPUTATION = """
import sys
import jax
from jax._src import xla_bridge
from lsq_jax import main

def initialize(**kwargs):
    print("backends initialized before distributed start:", xla_bridge.backends_are_initialized())
    print("x64 before distributed start:", jax.config.x64_enabled)

jax.distributed.initialize = initialize
sys.exit(main.run(sys.argv))
"""


def test_first_jax_computation_comes_after_distributed_start_and_float64(tmp_path):
    """The read primitive draws its coefficients with jax.random when the config is converted: that must
    wait for jax.distributed.initialize and for float64."""
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_COMPUTATION, f"--config={REPO / 'configs' / 'primitives.py'}:read,smoke",
         "--distributed=explicit", "--coordinator_address=127.0.0.1:1", "--num_processes=1", "--process_id=0",
         "--config.train.batch_size=1000000000000", f"--workdir={tmp_path / 'w'}"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "backends initialized before distributed start: False" in proc.stdout, proc.stdout + proc.stderr
    assert "x64 before distributed start: True" in proc.stdout
    assert proc.returncode == 2 and "train.batch_size" in proc.stderr  # converted (and refused) afterwards


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket/... served from tmp_path/bucket through etils' fsspec backend: the code sees a non-local
    path, so any builtin open() or os call on a workdir path fails, and appending is refused."""
    from etils.epath import backend as epath_backend
    from fsspec.implementations.local import LocalFileSystem

    root = str(tmp_path)

    def to_local(path: str) -> str:
        return root + "/" + path[len("gs://"):] if path.startswith("gs://") else path

    class BucketFileSystem(LocalFileSystem):
        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(to_local(str(path)))

        def open(self, path, mode="rb", **kwargs):
            if "a" in mode:
                raise NotImplementedError("object stores cannot append")
            return super().open(path, mode, **kwargs)

    registry = sys.modules["fsspec.registry"]._registry
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(registry, protocol, BucketFileSystem)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    # Orbax itself writes arrays with TensorStore's own GCS driver, which no fake can serve: it gets the
    # local directory (its gs:// support is Orbax's to test), everything else of the workdir goes through
    # the bucket.
    manager = checkpoint.ocp.CheckpointManager
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager",
                        lambda directory, **kw: manager(to_local(str(directory)), **kw))
    yield tmp_path / "bucket"
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.mark.slow
def test_train_eval_and_resume_on_a_non_local_workdir(bucket, monkeypatch):
    status, out, err = run("--workdir=gs://bucket/w", *SMALL_REPORT_FLAGS, steps=20)
    assert status == 0, err
    assert "workdir: gs://bucket/w" in out
    local = bucket / "w"
    records = read_metrics(local / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 10, 19, 20]
    report = json.loads((local / "eval" / "report.json").read_text())
    assert report["config"]["name"] == "baseconv-smoke" and (local / "eval" / "training_curve.png").exists()
    assert not (local / "lock").exists()
    monkeypatch.setattr(eval_report, "write_evaluation", lambda *a, **k: {})
    status, out, err = run("--workdir=gs://bucket/w", steps=30)
    assert status == 0, err
    assert "resumed from step 20" in out and params_of(local)[1] == 30


@pytest.mark.parametrize("workdir, needle", [
    ("hdfs://bucket/w", "--workdir=hdfs://bucket/w: hdfs:// is not supported; allowed: a local path, gs://"),
    ("s3://bucket/w", "--workdir=s3://bucket/w: s3:// needs the s3fs package, which is not installed"),
])
def test_a_url_workdir_without_a_filesystem_is_one_line(tmp_path, monkeypatch, workdir, needle, no_report):
    registry = importlib.import_module("fsspec.registry")  # s3:// as without s3fs, whether or not it is here
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    monkeypatch.setitem(registry.known_implementations, "s3",
                        {"class": "lsq_jax_no_such_module.S3FileSystem", "err": "Install s3fs to access S3"})
    monkeypatch.chdir(tmp_path)
    status, out, err = run(f"--workdir={workdir}")
    assert_bad_input(status, err, needle)
    assert not list(tmp_path.iterdir()) and not out


@pytest.mark.parametrize("override, needle", [
    ("--config.seed=1180591620717411303424", "seed: got 1180591620717411303424; allowed integers >= 0 and < 2^63"),
    ("--config.train.num_steps=100000000000000000000", "train.num_steps: got 100000000000000000000"),
    ("--config.name=../../x", "name: got '../../x'; allowed non-empty strings without a path separator"),
])
def test_integers_fit_int64_and_the_name_stays_in_runs(tmp_path, monkeypatch, override, needle, no_report):
    monkeypatch.chdir(tmp_path)
    status, _, err = run(override)
    assert_bad_input(status, err, needle)
    assert not list(tmp_path.iterdir())  # no runs/ (the default workdir) and nothing outside it


def test_the_largest_seed_the_config_accepts_gives_the_runs_keys():
    """The seed's range ends where the run's keys stop: 2^63 - 1 is accepted and gives a run its own key
    streams, 2^63 is refused."""
    from lsq_jax.config.check import ConfigError
    from lsq_jax.config.experiment import experiment_from_config
    from lsq_jax.data.keys import STREAMS, run_keys

    config = get_config("baseconv", "smoke")
    config.seed = 2**63
    with pytest.raises(ConfigError, match="^seed: got 9223372036854775808; allowed integers >= 0 and < 2\\^63"):
        experiment_from_config(config)
    config.seed = 2**63 - 1
    keys = run_keys(experiment_from_config(config).seed)
    streams = {np.asarray(jax.random.key_data(keys[name])).tobytes() for name in STREAMS}
    assert len(streams) == len(STREAMS) and not streams & {
        np.asarray(jax.random.key_data(k)).tobytes() for k in run_keys(0).values()}


def test_report_estimate_counts_what_the_report_allocates():
    """Each part of the report's estimate against the arrays the report really makes, at a small size."""
    from lsq_jax.data import samplers
    from lsq_jax.plan.report import make_report_plan
    from lsq_jax.eval.solvers import gd_solver, run_solver
    from lsq_jax.models import gd_weights
    from lsq_jax.models.backbone import mixing_bytes
    from lsq_jax.models.baseconv import shift_tensor

    exp = main_experiment()
    d, n, problems, iters = exp.task.n_dims, exp.task.n_points, exp.train.eval_problems, exp.train.eval_iters
    parts = make_report_plan(exp).memory
    sample = samplers.least_squares(samplers.example_keys(jax.random.key(0), 0, 0, problems), n, d)
    xs = run_solver(gd_solver("auto"), sample.a, sample.b, sample.x0, iters)
    assert parts["report_trajectories"] == 2 * xs.nbytes  # exact GD's iterates and one method's
    built = gd_weights.baseconv_gd_config(d, n)
    weights = gd_weights.baseconv_gd_params(built, d, n, 0.1)
    toeplitz = built.n_embd * n * n * 8
    assert parts["constructions"] == (sum(x.nbytes for x in jax.tree.leaves(weights)) + shift_tensor(n, n).nbytes
                                      + toeplitz + problems * n * built.n_embd * 8)
    t = n + 1  # the learned model's tokens: [x0, 0] then one per row
    assert mixing_bytes(exp.model, t, problems) == shift_tensor(exp.model.n_positions, t).nbytes + 64 * t * t * 8
    assert parts["report_problems"] == problems * (t * (d + 1) + n * d) * 8


# -- a full disk ---------------------------------------------------------------------------------------------

def assert_full_disk_refused(status, err, workdir):
    """One line naming the workdir and the sizes, the lock released, the newest complete checkpoint restorable."""
    assert_bad_input(status, err, "is full")
    assert str(workdir) in err and "MiB" in err
    assert not (workdir / "lock").exists()
    assert params_of(workdir)[1] >= 1


@pytest.mark.slow
def test_a_full_tmpfs_workdir_is_one_line_and_the_saved_checkpoints_stay(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip("no tmpfs can be mounted here; the patched-write test stands in")
    try:
        proc = subprocess.run([sys.executable, "-m", "lsq_jax.main", *SMALL, "--config.train.num_steps=100",
                               f"--workdir={disk / 'w'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert_full_disk_refused(proc.returncode, proc.stderr, disk / "w")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_save_that_finds_the_disk_full_is_one_line_and_the_saved_checkpoints_stay(tmp_path, no_report,
                                                                                   monkeypatch):
    real_save, saves = checkpoint.ocp.CheckpointManager.save, []

    def full_after_the_first(self, step, *args, **kwargs):
        saves.append(step)
        if len(saves) > 1:
            raise ValueError(f"RESOURCE_EXHAUSTED: Error writing in OCDBT database: Failed writing: "
                             f"No space left on device [os_error_code='{errno.ENOSPC}']")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full_after_the_first)
    status, _, err = run(f"--workdir={tmp_path}")
    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", real_save)
    assert_full_disk_refused(status, err, tmp_path)


def test_a_full_disk_under_the_metrics_or_the_report_is_one_line(tmp_path, no_report, monkeypatch):
    from lsq_jax.train.log import MetricsWriter

    def full(self, step, metrics):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(MetricsWriter, "write", full)
    status, _, err = run(f"--workdir={tmp_path}", steps=20)
    assert_bad_input(status, err, "No space left on device")
    assert "metrics.jsonl" in err and not (tmp_path / "lock").exists()


@pytest.mark.parametrize("override, needle", [
    (["--config.optim.optimizer=lm", "--config.optim.l1=0.001"], "optim.l1"),
    (["--config.optim.lm_after=5"], "optim.lm_after: got 5; allowed 0 unless optimizer='lm'"),
    (["--config.optim.lm_solver=cg"], "optim.lm_solver: got 'cg'; allowed 'auto' unless optimizer='lm'"),
    (["--config.optim.optimizer=lm", "--config.optim.lm_solver=cholesky", "--config.optim.lm_cg_iters=100"],
     "optim.lm_cg_iters: got 100; allowed None with lm_solver='cholesky' (only 'cg' reads it)"),
    (["--config.optim.optimizer=lm", "--config.optim.lm_solver=dense"],
     "optim.lm_solver: got 'dense'; allowed one of auto, cholesky, sharded, cg"),
])
def test_contradictory_lm_settings_are_one_line(tmp_path, override, needle, no_report):
    status, _, err = run(f"--workdir={tmp_path / 'w'}", *override)
    assert_bad_input(status, err, needle)
    assert not (tmp_path / "w").exists()


def test_a_saved_config_goes_through_the_same_checks_as_a_config_file():
    from lsq_jax.config.check import ConfigError
    from lsq_jax.config.experiment import experiment_from_dict, experiment_to_dict

    saved = experiment_to_dict(main_experiment())
    saved["optim"]["schedule"], saved["train"]["grad_stats_batches"] = "adaptive", 0
    with pytest.raises(ConfigError, match="train.grad_stats_batches"):
        experiment_from_dict(saved)


@pytest.mark.parametrize("path, value, needle", [
    ("name", "../x", "name: got '../x'; allowed non-empty strings without a path separator"),
    ("seed", -1, "seed: got -1; allowed integers >= 0"),
    ("model.n_positions", 2, "model.n_positions: got 2; allowed integers >= "),
    ("model.out_dims", 1, "model.out_dims: got 1; allowed integers >= "),
    ("model.in_dims", 99, "model.in_dims: got 99; allowed unset or "),
    ("model.dtype", "float32", "model.dtype: got 'float32'; allowed unset or 'float64'"),
    ("task.dtype", "float16", "dtype: got 'float16'; allowed one of float64, float32"),
    ("points.end", 99, "curriculum.points.end: got 99; allowed unset or "),
    ("nosuch", 1, "nosuch: not a known field"),
])
def test_a_saved_config_is_checked_like_a_config_file(path, value, needle):
    from lsq_jax.config.check import ConfigError
    from lsq_jax.config.experiment import experiment_from_dict, experiment_to_dict

    saved = experiment_to_dict(main_experiment())
    *sections, field = path.split(".")
    section = saved
    for name in sections:
        section = section[name]
    section[field] = value
    with pytest.raises(ConfigError) as info:
        experiment_from_dict(saved)
    assert str(info.value).startswith(needle) and "\n" not in str(info.value)


def test_a_saved_configs_old_placeholders_load_as_unset():
    """Before unset was None, a config saved every LM setting at a placeholder (10 tries with the CG solver,
    a chunk and a restart length of 0), and any LM setting with another optimizer, all unread: they load as
    unset, so such a run resumes under today's config of the same run. CG's tries saved unset (one try) or
    set since CG reads them load as they are."""
    from lsq_jax.config.experiment import experiment_from_config, experiment_from_dict, experiment_to_dict

    for optim, current in [({"optimizer": "lm", "lm_solver": "cg", "lm_tries": 10, "lm_cg_iters": 7, "lm_chunk": 0,
                             "lm_restarts": 1, "lm_restart_steps": 3}, {"optimizer": "lm", "lm_solver": "cg",
                                                                        "lm_cg_iters": 7}),
                           ({"optimizer": "lm", "lm_cg_iters": 100, "lm_tries": 10, "lm_restart_steps": 0},
                            {"optimizer": "lm", "lm_solver": "cholesky"}),  # saved before lm_solver existed
                           ({"optimizer": "lm", "lm_solver": "cg", "lm_tries": None, "lm_cg_iters": 7},
                            {"optimizer": "lm", "lm_solver": "cg", "lm_cg_iters": 7, "lm_tries": 1}),
                           ({"optimizer": "lm", "lm_solver": "cg", "lm_tries": 3, "lm_cg_iters": 7},
                            {"optimizer": "lm", "lm_solver": "cg", "lm_cg_iters": 7, "lm_tries": 3}),
                           ({"optimizer": "adam", "lm_after": 5, "lm_solver": "cg", "lm_tries": 10},
                            {"optimizer": "adam"})]:
        saved = experiment_to_dict(main_experiment())
        saved["optim"] = {**{k: v for k, v in saved["optim"].items() if not k.startswith("lm_")}, **optim,
                          "lm_scaling": "isotropic"}
        config = get_config("baseconv", "smoke")
        config.optim.update(current)
        assert experiment_from_dict(saved) == experiment_from_config(config), optim
        assert experiment_from_dict(experiment_to_dict(experiment_from_dict(saved))) == experiment_from_dict(saved)
