"""Test setup: float64 on, XLA's code generation unoptimised, one XLA compilation cache for the session,
the reference's golden numbers."""
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

from xla_env import TEST_XLA_FLAGS, xla_flags

jax.config.update("jax_enable_x64", True)

# Most of the suite's time is XLA compiling small programs that then run for milliseconds. LLVM's
# optimisation level 0 compiles them in about 60% of the time (a quarter less CPU for the suite): the same
# HLO (XLA's own passes, which decide what is computed in which order, are unchanged), machine code that runs
# slower. Read before JAX starts its backend; it reaches the subprocesses (tests/xla_env.py). Runs and
# benchmarks outside the tests use XLA's defaults.
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = xla_flags(TEST_XLA_FLAGS)

# Many tests build the same jitted step (in this process and in the subprocesses they start): compile it
# once. The environment variables reach the subprocesses; a cached executable computes the same numbers.
# pytest-xdist's workers inherit the directory of the process that started them, which removes it at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lsq_jax_tests_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    """tests/reference: weights, inputs and outputs saved from the PyTorch reference (see its README)."""
    return REFERENCE_DIR


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort): with two workers, a long test started last would leave one worker
    idle while it runs."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
