"""Redraw a run's plots: python -m lsq_jax.plot <workdir>.

Reads <workdir>/eval/report.json (written by --mode=eval or --mode=construct) and, when present,
<workdir>/metrics.jsonl, and writes the PNGs of lsq_jax.plots into <workdir>/eval/. A missing workdir or
report, or an unreadable one, is one line on stderr and exit status 2; without matplotlib the plots are
skipped with a one-line notice (exit status 0).
"""
from __future__ import annotations

import json
import sys

from etils import epath

from lsq_jax.evaluation_io import read_metrics
from lsq_jax.plots import write_plots

USAGE = "usage: python -m lsq_jax.plot <workdir>"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or args[0].startswith("-"):
        return _fail(USAGE)
    workdir = epath.Path(args[0])
    if not workdir.is_dir():
        return _fail(f"workdir {args[0]!r} does not exist")
    report_path = workdir / "eval" / "report.json"
    if not report_path.exists():
        return _fail(f"{report_path} does not exist: run the evaluation (--mode=eval or --mode=construct) first")
    try:
        report = json.loads(report_path.read_text())
        metrics_path = workdir / "metrics.jsonl"
        records = read_metrics(metrics_path) if metrics_path.exists() else []
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        return _fail(f"cannot read the report or metrics of {args[0]!r}: {' '.join(str(err).split())}")
    if not isinstance(report, dict):
        return _fail(f"{report_path} is not a report (expected a JSON object)")
    for path in write_plots(report, records, workdir / "eval"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
