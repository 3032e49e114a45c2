"""SIGTERM (and SIGINT) at any moment, in real processes: during an XLA compilation and during a long host call that
never returns to Python, with nothing unsaved (the process ends at once, status 0, "nothing to save") and
with unsaved work (the signal waits for the main thread, which then finds the flag set); and a training
run signalled while its first step compiles."""
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# A program that installs lsq_jax.preemption, prints READY, then runs `work` and prints what happened.
PROGRAM = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from lsq_jax import preemption
    preemption.install(lambda line: print(line, flush=True))
    preemption.unsaved({unsaved})

    def long_compile():
        def f(x):
            for i in range({n_ops}):
                x = jnp.sin(x @ x) + i
            return x
        lowered = jax.jit(f).lower(jnp.ones((8, 8)))
        print("READY", flush=True)
        lowered.compile()

    def long_host_call():
        a = np.random.default_rng(0).standard_normal((4000, 4000))
        print("READY", flush=True)
        np.linalg.svd(a)  # one LAPACK call of many seconds that never checks for signals

    status = 0
    try:
        {work}()
        print(f"finished, requested={{preemption.requested()}}", flush=True)
    except preemption.Preempted:
        print("Preempted", flush=True)
        status = 3
    time.sleep(1)  # the interrupted compilation goes on meanwhile: the process must not crash
    preemption.exit(status)
""")


def signalled(work: str, *, unsaved: bool, n_ops: int = 1500, delay_s: float = 0.5, timeout_s: float = 300):
    """Run PROGRAM with `work`, send SIGTERM `delay_s` after READY: (status, stdout, seconds from the signal
    to the end)."""
    source = PROGRAM.format(work=work, unsaved=unsaved, n_ops=n_ops)
    proc = subprocess.Popen([sys.executable, "-c", source], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "READY":
            break
    time.sleep(delay_s)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, "".join(lines) + out, time.perf_counter() - sent


def test_sigterm_during_a_compilation_with_nothing_unsaved_ends_the_process_at_once():
    status, out, seconds = signalled("long_compile", unsaved=False)
    assert status == 3 and "Preempted" in out, out  # the handler ran inside the compilation
    assert seconds < 5, (seconds, out)  # not after the compilation (tens of seconds) nor a crash at exit


def test_sigterm_during_a_long_host_call_with_nothing_unsaved_exits_0_from_the_watcher():
    status, out, seconds = signalled("long_host_call", unsaved=False)
    assert status == 0 and "nothing to save" in out and "finished" not in out, out
    assert seconds < 5, (seconds, out)


@pytest.mark.slow
def test_sigterm_with_unsaved_work_waits_for_the_main_thread_and_sets_the_flag():
    status, out, _ = signalled("long_compile", unsaved=True, n_ops=400)
    assert status == 0 and "finished, requested=True" in out, out
    assert "nothing to save" not in out


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, says", [(signal.SIGTERM, 0, "preempted (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_a_run_signalled_while_its_first_step_compiles_ends_at_once_with_nothing_saved(tmp_path, signum, status,
                                                                                        says):
    """SIGTERM exits 0, SIGINT (Ctrl-C) 130: no traceback, no crash of the compilation left running."""
    workdir = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "lsq_jax.main",
                             f"--config={REPO / 'configs' / 'baseconv.py'}:smoke", "--config.model.n_layer=12",
                             f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stdout:  # about 10 s of compilation follow this line
        lines.append(line)
        if line.startswith("workdir:"):
            break
    time.sleep(2)
    sent = time.perf_counter()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    seconds = time.perf_counter() - sent
    out = "".join(lines) + out
    assert proc.returncode == status and f"{says}: nothing to save" in out and "step 0/" not in out, (out, err)
    assert seconds < 5 and "Traceback" not in err, (seconds, err)
    assert not (workdir / "lock").exists()
    assert not [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]


# Two SIGTERMs while the main thread is in a call into C shorter than GRACE_S, with unsaved work: Python runs
# the handler once for both, and the run then carries on with nothing unsaved.
TWO_SIGNALS = textwrap.dedent("""
    import os, signal, threading, time
    import numpy as np
    from lsq_jax import preemption
    preemption.install(lambda line: print(line, flush=True))
    preemption.unsaved(True)
    for delay in (0.05, 0.1):
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
    np.linalg.svd(np.random.default_rng(0).random((1000, 1000)))  # a fraction of GRACE_S on 2 cores
    time.sleep(0.2)
    print(f"requested={preemption.requested()}", flush=True)
    preemption.unsaved(False)
    time.sleep(2.5 * preemption.GRACE_S)
    print("alive", flush=True)
    preemption.uninstall()
""")


def test_two_signals_one_handler_run_leave_the_watcher_waiting_for_no_other():
    """Both signals reach the pipe, one handler run takes them: the watcher must not hold the second one
    as untaken and end the process once nothing is unsaved."""
    proc = subprocess.run([sys.executable, "-c", TWO_SIGNALS], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "requested=True" in proc.stdout and "alive" in proc.stdout, proc.stdout
    assert "nothing to save" not in proc.stdout
