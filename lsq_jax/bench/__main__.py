"""python -m lsq_jax.bench: see lsq_jax.bench."""
from absl import app

from lsq_jax.bench import main

app.run(main)
