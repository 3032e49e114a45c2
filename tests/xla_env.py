"""XLA_FLAGS for the processes the tests start: the session's (tests/conftest.py) and the test's own."""
import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"  # see tests/conftest.py


def xla_flags(*flags: str) -> str:
    """The session's XLA_FLAGS followed by `flags` (a later flag wins)."""
    return " ".join(filter(None, [os.environ.get("XLA_FLAGS"), *flags]))


def run_on_devices(script: str, arg, n_devices: int) -> str:
    """Runs `script` (python -c, with str(arg) as its argument) from the repository root in a process with
    `n_devices` emulated CPU devices and tests/ on its path; its stdout, or the test fails with its stderr."""
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "tests"),
                                                                     os.environ.get("PYTHONPATH")])),
           "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={n_devices}")}
    proc = subprocess.run([sys.executable, "-c", script, str(arg)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
