"""One error type and one message format for every config field: ``section.field: got X; allowed Y``; and
`one_line`, the gist of any error for the one line on stderr."""
from __future__ import annotations

import math
import numbers
from typing import Any


class ConfigError(ValueError):
    """A field whose value is not allowed. main turns it into one line on stderr and exit status 2."""


def one_line(err: BaseException, *, first: bool = False) -> str:
    """The gist of an exception on one line: the last line of an embedded traceback (ml_collections embeds
    whole tracebacks), else its lines joined, or with `first` its first line (Orbax's and JAX's messages
    go on with pages of detail)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if first:
        return lines[0]
    return lines[-1] if "Traceback" in str(err) else " ".join(lines)


def fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field}: got {value!r}; allowed {allowed}")


def in_section(section: str, err: ConfigError) -> ConfigError:
    """The same error with its field named as `section.field`."""
    return ConfigError(f"{section}.{err}")


def is_int(value: Any) -> bool:
    """Python and numpy integers (a saved config may hold either); a bool is not a size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require(field: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        fail(field, value, allowed)


INT_LIMIT = 2**63  # every integer field ends up an int64 somewhere: a step counter, a seed, an array size


def check_int(field: str, value: Any, lo: int) -> None:
    require(field, value, is_int(value) and lo <= value < INT_LIMIT, f"integers >= {lo} and < 2^63")


def check_real(field: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
               hi_open: bool = False) -> None:
    ok = is_real(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    left = "(" if lo_open or lo == -math.inf else "["
    right = ")" if hi_open or hi == math.inf else "]"
    require(field, value, ok, f"finite numbers in {left}{lo:g}, {hi:g}{right}")


def check_choice(field: str, value: Any, choices) -> None:
    require(field, value, value in choices, f"one of {', '.join(map(str, choices))}")


def check_flag(field: str, value: Any) -> None:
    require(field, value, isinstance(value, bool), "True or False")


def check_optional_positive(field: str, value: Any) -> None:
    require(field, value, value is None or (is_real(value) and value > 0), "None or finite numbers > 0")


def check_known(section: str, names, allowed) -> None:
    """Every name in `names` is one of `allowed`."""
    for name in names:
        if name not in allowed:
            raise ConfigError(f"{section}{name}: not a known field; allowed {', '.join(sorted(allowed))}")
