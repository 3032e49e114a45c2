"""Every signal and every failed write ends cleanly, driving `python -m lsq_jax.main` as a user would: SIGTERM
and SIGINT while starting, during training (two signals 0.5 s apart), as the evaluation starts; checkpoints
that cannot be written (a read-only file system, a file in the way, a directory deleted during the run); a
full disk for the lock and for the report; damaged checkpoints; hostile workdirs; an empty --workdir."""
import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from etils import epath

from lsq_jax import main
from lsq_jax.checkpoint import Checkpointer
from lsq_jax.eval import report as eval_report
from lsq_jax.workdir import WorkdirLock

from config_files import SMALL_REPORT_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = [f"--config={REPO / 'configs' / 'baseconv.py'}:smoke", "--config.train.log_every=10",
         "--config.train.checkpoint_every=10", *SMALL_REPORT_FLAGS]
STEPS = 20  # the trained workdir's steps


def command(workdir, *extra, steps=STEPS) -> list[str]:
    return [sys.executable, "-u", "-m", "lsq_jax.main", *FLAGS, f"--config.train.num_steps={steps}",
            f"--workdir={workdir}", *extra]


def run_here(workdir, *extra, steps=STEPS, capsys=None) -> tuple[int, list[str], str]:
    """main.run in this process: (exit status, logged lines, stderr)."""
    out = []
    status = main.run(command(workdir, *extra, steps=steps)[3:], log=out.append)
    return status, out, capsys.readouterr().err if capsys is not None else ""


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(needle in lines[0] for needle in needles), (needles, err)
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained to STEPS (checkpoints every 10 steps), without its report."""
    workdir = tmp_path_factory.mktemp("trained")
    real, eval_report.write_evaluation = eval_report.write_evaluation, lambda *a, **k: {}
    try:
        assert main.run(command(workdir)[3:], log=lambda _: None) == 0
    finally:
        eval_report.write_evaluation = real
    return workdir


def copy_of(trained, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    return workdir


class Run:
    """`python -m lsq_jax.main` in a subprocess (`args` from `command`), or `program` (Python source that
    patches something, then runs lsq_jax.main) with the flags of `args`: stdout read line by line, stderr
    to a file."""

    def __init__(self, args, tmp_path, *, program=None):
        self.err_path = tmp_path / "stderr"
        with open(self.err_path, "w") as err:
            prefix = [sys.executable, "-u", "-c", program] if program else []
            self.proc = subprocess.Popen(prefix + (args[4:] if program else args), cwd=REPO,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines = []

    def wait_for(self, prefix: str) -> str:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line {prefix!r} in {self.lines}")

    def signal(self, signum) -> None:
        self.sent = time.perf_counter()
        self.proc.send_signal(signum)

    def end(self, timeout=300) -> tuple[int, str, str, float]:
        """(status, stdout, stderr, seconds since the first signal)."""
        out, _ = self.proc.communicate(timeout=timeout)
        seconds = time.perf_counter() - getattr(self, "sent", time.perf_counter())
        return self.proc.returncode, "".join(self.lines) + out, self.err_path.read_text(), seconds


def handles(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux's SigCgt mask)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


# -- signals -------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
@pytest.mark.parametrize("signum, status, says", [(signal.SIGTERM, 0, "preempted (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_a_signal_while_starting_ends_at_once_with_one_line_and_nothing_written(tmp_path, signum, status, says):
    """The moment the handlers are in place (the imports and flags follow, before anything is written); Python
    has a SIGINT handler of its own from the start, and lsq_jax.preemption sets SIGTERM's last."""
    run = Run(command(tmp_path / "w"), tmp_path)
    while not handles(run.proc.pid, signal.SIGTERM) and run.proc.poll() is None:
        time.sleep(0.005)
    run.signal(signum)
    code, out, err, seconds = run.end(timeout=60)
    assert code == status and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith(says) and "nothing written" in err, err
    assert seconds < 5 and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_sigint_then_sigterm_during_training_saves_once_and_exits_130(tmp_path):
    """Ctrl-C saves the step reached and says so; a second signal 0.5 s later changes nothing."""
    workdir = tmp_path / "w"
    run = Run(command(workdir, steps=2000), tmp_path)
    run.wait_for("step 10/")
    run.signal(signal.SIGINT)
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGTERM)
    code, out, err, _ = run.end()
    saved = [line for line in out.splitlines() if line.startswith("interrupted: saved step ")]
    assert code == 130 and len(saved) == 1, (code, out, err)
    assert saved[0].endswith("; run the same command to resume") and err == "", err
    step = int(saved[0].split()[3].rstrip(";"))
    assert Checkpointer(workdir, read_only=True).steps()[-1] == step >= 11
    assert not (workdir / "lock").exists()


@pytest.mark.slow
def test_a_signal_on_the_eval_line_is_not_lost(trained, tmp_path):
    """SIGTERM as the final evaluation starts (nothing unsaved) ends the run at once: no report. (SIGINT
    takes the same path: the tests above end runs with it.)"""
    workdir = copy_of(trained, tmp_path)
    run = Run(command(workdir), tmp_path)
    run.wait_for("eval |")
    run.signal(signal.SIGTERM)
    code, out, err, seconds = run.end()
    assert code == 0 and "preempted (SIGTERM): nothing to save; run the same command to resume" in out, (out, err)
    assert err == "" and seconds < 10, (seconds, err)
    assert not (workdir / "eval").exists() and not (workdir / "lock").exists()


# -- writes that fail ----------------------------------------------------------------------------------------

# main as a program, with os.makedirs raising EROFS for Orbax's temporary checkpoint directories: a
# checkpoints directory on a read-only file system (the workdir itself writable)
READ_ONLY_CHECKPOINTS = textwrap.dedent("""
    import errno, os, runpy, sys
    real = os.makedirs
    def makedirs(path, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in os.fspath(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real(path, *args, **kwargs)
    os.makedirs = makedirs
    runpy.run_module("lsq_jax.main", run_name="__main__", alter_sys=True)
""")


@pytest.mark.slow
def test_a_checkpoint_save_on_a_read_only_file_system_ends_in_one_line(tmp_path):
    workdir = tmp_path / "w"
    run = Run(command(workdir, steps=2000), tmp_path, program=READ_ONLY_CHECKPOINTS)
    code, out, err, _ = run.end(timeout=300)  # no hang: it ends by itself
    one_error_line(err, str(workdir / "checkpoints"), "Read-only file system")
    assert code == 2 and "step 1000/" not in out, out
    assert not (workdir / "lock").exists()


def test_a_file_in_the_way_of_the_checkpoints_is_refused_at_the_start(tmp_path, capsys):
    (tmp_path / "checkpoints").write_text("")
    status, out, err = run_here(tmp_path, capsys=capsys)
    assert status == 2 and not any(line.startswith("step") for line in out), out
    one_error_line(err, str(tmp_path / "checkpoints"), "not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_a_full_disk_for_the_lock_is_one_line_and_leaves_no_lock(tmp_path, capsys, monkeypatch):
    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(WorkdirLock, "_record", full)
    status, _, err = run_here(tmp_path, capsys=capsys)
    assert status == 2
    one_error_line(err, str(tmp_path / "lock"), "No space left on device")
    assert not (tmp_path / "lock").exists()


@pytest.mark.slow
def test_a_full_disk_during_the_report_keeps_the_earlier_report(trained, tmp_path, capsys, monkeypatch):
    workdir = copy_of(trained, tmp_path)
    (workdir / "eval").mkdir()
    (workdir / "eval" / "report.json").write_text('{"earlier": 1}\n')
    path_type = type(epath.Path(workdir))
    real = path_type.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".report.json"):
            real(self, "{")  # part of it, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(path_type, "write_text", write_text)
    monkeypatch.setattr(eval_report, "evaluate_experiment", lambda *a, **k: {"kind": "experiment"})  # its minutes
    status, out, err = run_here(workdir, "--mode=eval", capsys=capsys)
    assert status == 2, (out, err)
    one_error_line(err, str(workdir / "eval" / "report.json"), "No space left on device")
    assert sorted(p.name for p in (workdir / "eval").iterdir()) == ["report.json"]
    assert (workdir / "eval" / "report.json").read_text() == '{"earlier": 1}\n'


@pytest.mark.slow
@pytest.mark.parametrize("in_the_way", ["config.json", "metrics.jsonl"])
def test_a_directory_in_the_way_of_a_run_file_is_one_line(tmp_path, capsys, in_the_way):
    (tmp_path / in_the_way).mkdir()
    status, _, err = run_here(tmp_path, capsys=capsys)
    assert status == 2
    one_error_line(err, str(tmp_path / in_the_way), "Is a directory")
    assert not (tmp_path / "lock").exists()


# main as a program, whose checkpoints directory is deleted once step 10 is saved, a file taking its place
CHECKPOINTS_DELETED = textwrap.dedent("""
    import os, runpy, shutil
    from lsq_jax.checkpoint import Checkpointer
    real = Checkpointer.save
    def save_then_delete(self, step, *args, **kwargs):
        saved = real(self, step, *args, **kwargs)
        if step == 10:
            self.wait()
            shutil.rmtree(os.fspath(self.directory))
            open(os.fspath(self.directory), "w").close()
        return saved
    Checkpointer.save = save_then_delete
    runpy.run_module("lsq_jax.main", run_name="__main__", alter_sys=True)
""")


@pytest.mark.slow
def test_checkpoints_deleted_during_the_run_end_it_in_one_line(tmp_path):
    workdir = tmp_path / "w"
    code, out, err, _ = Run(command(workdir, steps=2000), tmp_path, program=CHECKPOINTS_DELETED).end()
    assert code == 2 and "step 1000/" not in out, out
    one_error_line(err, str(workdir / "checkpoints"), "Not a directory")
    assert not (workdir / "lock").exists()


def truncate(workdir, step) -> None:
    for path in (workdir / "checkpoints").glob(f"{step}/state/d/*"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
def test_falling_back_past_damaged_checkpoints_prints_one_line_each(trained, tmp_path):
    """The newest checkpoint's data truncated: one warning line as the run sets it aside and goes on from
    the one before; every checkpoint truncated: the one error line. Nothing from Orbax's or TensorStore's
    threads (each failed read's callbacks find the event loop closed)."""
    workdir = copy_of(trained, tmp_path)
    steps = Checkpointer(workdir, read_only=True).steps()
    truncate(workdir, steps[-1])
    run = Run(command(workdir, steps=1000), tmp_path)
    run.wait_for("resumed from step ")
    run.signal(signal.SIGTERM)  # the rest of the run is not this test's
    code, out, err, _ = run.end()
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert code == 0 and err == "", err
    assert len(warnings) == 1 and f"checkpoint {steps[-1]} " in warnings[0] and "unrestorable" in warnings[0]
    assert f"resumed from step {steps[-2]}" in out
    left = Checkpointer(workdir, read_only=True).steps()
    for step in left:
        truncate(workdir, step)
    code, out, err, _ = Run(command(workdir), tmp_path).end()
    assert code == 2 and out.splitlines() == [f"workdir: {workdir}"], out
    one_error_line(err, f"none of the checkpoints {left}", "can be restored", f"checkpoint {left[-1]} ")


def test_an_empty_workdir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_here("", capsys=capsys)
    assert status == 2
    one_error_line(err, "--workdir")
    assert list(tmp_path.iterdir()) == []
