"""Bitwise comparisons for tests: pytrees (same structure, dtypes and bytes), and a folder's files."""
import jax
import numpy as np


def assert_trees_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def snapshot(directory) -> dict:
    """Every file under `directory` with its bytes (to show that nothing was written)."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
