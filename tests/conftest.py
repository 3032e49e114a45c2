"""Test setup: float64 on, and the reference implementation's golden numbers."""
import pathlib

import jax
import pytest

jax.config.update("jax_enable_x64", True)

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    """tests/reference: weights, inputs and outputs saved from the PyTorch reference (see its README)."""
    return REFERENCE_DIR
