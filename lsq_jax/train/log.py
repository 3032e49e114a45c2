"""The training log: JSON-lines metrics and a one-line progress report (the workdir's writing process
writes, every process computes)."""
from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
from lsq_jax.workdir import Workdir


def to_python(value: Any):
    """Arrays and numpy scalars -> floats, ints, lists (non-finite floats stay float: JSON gets NaN/Infinity)."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr.tolist()


class MetricsWriter:
    """Appends one JSON object per call to <workdir>/metrics.jsonl (through the Workdir: on its writing
    process)."""

    def __init__(self, workdir: Workdir):
        self._workdir = workdir

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._workdir.writes(self._append, step, metrics)

    def _append(self, step: int, metrics: dict[str, Any]) -> None:
        line = json.dumps({"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}) + "\n"
        self._workdir.append(self._workdir / "metrics.jsonl", line)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# a progress line at least this often, whatever train.log_every is; the first rate comes sooner
PROGRESS_EVERY_S = 30.0
PROGRESS_FIRST_S = 10.0


class Progress:
    """Steps/s and ETA over the steps since the last report (compile time of the first step excluded)."""

    def __init__(self, start_step: int, num_steps: int):
        self._num_steps = num_steps
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._lines = 0

    def due(self) -> bool:
        """Whether the last line is at least PROGRESS_EVERY_S old (PROGRESS_FIRST_S after the first line,
        whose rate is unknown since it counts no step)."""
        every = PROGRESS_FIRST_S if self._lines == 1 else PROGRESS_EVERY_S
        return time.perf_counter() - self._last_time >= every

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        now = time.perf_counter()
        done = step - self._last_step
        rate = done / max(now - self._last_time, 1e-9) if done > 0 else float("nan")
        self._last_step, self._last_time = step, now
        self._lines += 1
        eta = (self._num_steps - 1 - step) / rate if rate > 0 else float("nan")
        loss = float(metrics["loss"])
        parts = [f"step {step}/{self._num_steps}",
                 f"loss {loss:.3e}" if math.isfinite(loss) else f"loss {loss} (non-finite: step skipped)",
                 (f"lr {float(metrics['learning_rate']):.2e}" if "learning_rate" in metrics
                  else f"damping {float(metrics['damping']):.2e}"),
                 f"{rate:.2f} steps/s" if math.isfinite(rate) else "- steps/s", f"ETA {format_duration(eta)}",
                 f"skipped {int(metrics['skipped_steps'])}"]
        return " | ".join(parts)
