"""Data: samplers (pure functions of a PRNG key) and tasks (sample -> model input, target, read-out)."""
