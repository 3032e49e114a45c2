"""The run's key streams: one key per purpose, all from the run's seed, shared by training and evaluation."""
from __future__ import annotations

import jax

STREAMS = ("params", "data", "stats", "eval", "lm")


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Independent streams of the one run key: parameters, training data, gradient statistics, evaluation,
    Levenberg-Marquardt's problems."""
    root = jax.random.key(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(STREAMS)}
