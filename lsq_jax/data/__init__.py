"""Data: samplers (pure functions of PRNG keys), the least-squares math (lsq), and tasks (sample -> model
input, target, read-out): base.Task, the primitives, the least-squares family, and make_task."""
