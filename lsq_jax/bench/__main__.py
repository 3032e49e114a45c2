"""python -m lsq_jax.bench (--help prints the usage below and every flag). Bad flags are one line on stderr,
status 2, before anything runs or is written."""
import sys

import lsq_jax.bench
from lsq_jax.bench import FLAGS, main, parse_flags
from lsq_jax.config.check import ConfigError

if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in sys.argv[1:]):
    print(lsq_jax.bench.__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help())
    sys.exit(0)
try:
    parse_flags(sys.argv)
except ConfigError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
main()
