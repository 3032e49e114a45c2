"""XLA_FLAGS for the processes the tests start: the session's (tests/conftest.py) and the test's own."""
import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"  # see tests/conftest.py


def xla_flags(*flags: str) -> str:
    """The session's XLA_FLAGS followed by `flags` (a later flag wins)."""
    return " ".join(filter(None, [os.environ.get("XLA_FLAGS"), *flags]))
