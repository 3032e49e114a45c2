"""The train section: the sizes of the training loop and of its evaluation."""
from __future__ import annotations

import dataclasses

from lsq_jax.config.check import check_int, is_int, require


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Sizes of the training loop.

    Attributes:
      batch_size: global batch, split over every device of every process.
      num_steps: training iterations (skipped ones included).
      log_every: progress line, metrics and gradient statistics every this many iterations.
      grad_stats_batches: fresh mini-batches for the gradient statistics (0 = none).
      eval_batch_size: fresh problems for the test MSE at the end of training.
      eval_problems: problems in the iterated-use / out-of-distribution report.
      eval_iters: iterations of iterated use in that report.
      checkpoint_every: iterations between checkpoints.
      microbatch_size: examples per device differentiated at once; the step accumulates the gradient over
        the microbatches of its per-device batch in a scan (same mean, summed in another order; on CPU two
        microbatches at a time, to use two cores). 0 (auto): on CPU, microbatches whose (examples, T, E)
        activations hold at most 2^17 elements, so the step works in cache rather than main memory; on
        GPU/TPU, the whole per-device batch at once.
    """

    batch_size: int = 1024
    num_steps: int = 1_000_000
    log_every: int = 1000
    grad_stats_batches: int = 64
    eval_batch_size: int = 4096
    eval_problems: int = 256
    eval_iters: int = 1000
    checkpoint_every: int = 10_000
    microbatch_size: int = 0

    def __post_init__(self):
        for name in ("batch_size", "num_steps", "log_every", "eval_batch_size", "eval_problems", "eval_iters",
                     "checkpoint_every"):
            check_int(name, getattr(self, name), 1)
        check_int("microbatch_size", self.microbatch_size, 0)
        value = self.grad_stats_batches
        require("grad_stats_batches", value, is_int(value) and (value == 0 or value >= 3),
                "0 (none) or integers >= 3 (the statistics compare mini-batch gradients)")
