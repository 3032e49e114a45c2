"""Training: state.py (the state and how it starts), step.py (one pure jitted iteration), memory.py (how the
batch splits, what a run needs), loop.py (resume, the loop, checkpoints), log.py (metrics and progress)."""
