"""python -m lsq_jax.bench (--help prints the usage below and every flag)."""
import sys

from absl import app, flags

import lsq_jax.bench
from lsq_jax.bench import main

__doc__ = lsq_jax.bench.__doc__  # what --help prints above the flags
flags.adopt_module_key_flags(lsq_jax.bench)  # --help lists the package's flags, not only this module's
if any(arg in ("-h", "--help", "--helpshort") for arg in sys.argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own --help exits with status 1
app.run(main)
