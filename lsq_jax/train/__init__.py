"""Training from a run plan (lsq_jax.plan.run): state.py (the state and how it starts), step.py (one pure jitted
iteration), loop.py (resume, the loop, checkpoints), log.py (metrics and progress)."""
