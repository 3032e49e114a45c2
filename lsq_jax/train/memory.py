"""How a step's batch is split (microbatches, Levenberg-Marquardt chunks) and the memory a run needs: a
lower-bound estimate per device, checked before anything is allocated or written."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lsq_jax.config.experiment import Experiment
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.mesh import check_fits, device_memory
from lsq_jax.models.backbone import mixing_bytes
from lsq_jax.train.state import count_params, uses_lm

# Auto microbatch on CPU: one (examples, T, E) activation holds at most this many elements (1 MiB in
# float64): XLA:CPU's step is bound by main memory once activations outgrow the cache; 2^17 measured the
# fastest on CPU, see docs/performance.md.
MICROBATCH_ELEMENTS = 2**17

# Microbatches per iteration of the accumulating scan on CPU: two independent ones in one loop body let
# XLA:CPU run their ops side by side on two cores (faster, the same sums to round-off; see
# docs/performance.md). Off CPU the scan is not unrolled: a microbatch size chosen there to fit device
# memory stays the most that is live at once.
CPU_SCAN_UNROLL = 2

LM_CHUNK_ENTRIES = 2**22  # auto lm_chunk: a chunk's Jacobian holds at most this many entries (32 MiB float64)


def scan_unroll(backend: str) -> int:
    """Chunks per iteration of the accumulating scan on `backend` ('cpu', 'gpu', 'tpu'): CPU_SCAN_UNROLL on
    CPU, where two chunks side by side keep two cores busy; 1 elsewhere, so that a microbatch sized to fit
    device memory is the most that is live at once."""
    return CPU_SCAN_UNROLL if backend == "cpu" else 1


def divisors(n: int) -> list[int]:
    """The divisors of n in increasing order (trial division up to sqrt(n))."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def microbatches(exp: Experiment, n_points: int, n_devices: int, backend: str | None = None) -> int:
    """How many microbatches each device's share of the batch is differentiated in (see TrainConfig):
    the batch over train.microbatch_size, or auto (0): on CPU the fewest that bring one (examples, T, E)
    activation down to MICROBATCH_ELEMENTS (the bound is per microbatch: CPU_SCAN_UNROLL are live at
    once), elsewhere one."""
    local = exp.train.batch_size // n_devices
    size = exp.train.microbatch_size
    if size:
        if local % size:
            raise ValueError(f"train.microbatch_size={size} is not allowed: must divide the per-device batch "
                             f"{local} (train.batch_size / {n_devices} devices)")
        return local // size
    if (backend or jax.default_backend()) != "cpu":
        return 1
    per_example = make_task(exp.task).seq_len(n_points) * exp.model.n_embd
    return next((n for n in divisors(local) if (local // n) * per_example <= MICROBATCH_ELEMENTS), local)


def lm_outputs(exp: Experiment) -> int:
    """K, the residuals of one problem (the entries of its target)."""
    task = make_task(exp.task)
    keys = example_keys(jax.random.key(0), 0, 0, 1)
    return math.prod(jax.eval_shape(lambda k: task.sample(k, n_points=exp.task.n_points).targets, keys).shape)


def lm_chunks(exp: Experiment, n_params: int, n_devices: int) -> int:
    """How many strided chunks the LM batch's Jacobian is built in: optim.lm_chunk problems each, or
    (auto) the fewest whose Jacobian stays within LM_CHUNK_ENTRIES; a chunk spreads over every device."""
    n = exp.train.batch_size
    per_problem = lm_outputs(exp) * n_params
    candidates = [c for c in divisors(n) if (n // c) % n_devices == 0]
    if exp.optim.lm_chunk:
        if n % exp.optim.lm_chunk or (n // exp.optim.lm_chunk) not in candidates:
            raise ValueError(f"optim.lm_chunk={exp.optim.lm_chunk} is not allowed: must divide train.batch_size "
                             f"{n} into chunks that split over {n_devices} devices")
        return n // exp.optim.lm_chunk
    return next((c for c in candidates if (n // c) * per_problem <= LM_CHUNK_ENTRIES), candidates[-1])


def live_examples(exp: Experiment, n_devices: int, backend: str | None = None) -> int:
    """The examples of a device whose activations are live at once: a microbatch, two on CPU (the
    accumulating scan is unrolled there), at most the device's share of the batch."""
    backend = backend or jax.default_backend()
    local = exp.train.batch_size // n_devices
    return min(local // microbatches(exp, exp.task.n_points, n_devices, backend) * scan_unroll(backend), local)


def sequence_mixing(exp: Experiment, n_devices: int, backend: str | None = None) -> int:
    """The bytes one block's sequence mixer materialises on a device's live examples (mixing_bytes)."""
    seq_len = make_task(exp.task).seq_len(exp.task.n_points)
    return mixing_bytes(exp.model, seq_len, live_examples(exp, n_devices, backend))


def memory_estimate(exp: Experiment, n_devices: int, backend: str | None = None) -> dict[str, int]:
    """A lower bound, in bytes per device, of what training `exp` holds at once, by part.

    state: parameters, their gradient and accumulator, and the optimizer's moments and EMA (6 copies);
    activations: the input and output of every block for one microbatch (two on CPU, where the scan is
    unrolled), kept for the backward pass; data: the per-device batch's matrices A, its input tokens and
    per-example keys; statistics: the matrix of mini-batch gradients; lm_normal_equations:
    Levenberg-Marquardt's P x P J^T J and the chunk term being added to it; sequence_mixing: what one
    block's mixer materialises (lsq_jax.models.backbone.mixing_bytes); evaluation: the test batch of the
    final metrics (its matrices, tokens and one activation), held with the state after training.
    """
    mixing = sequence_mixing(exp, n_devices, backend)  # first: counting the parameters traces the model
    n_params = count_params(exp)
    itemsize = jnp.dtype(exp.task.dtype).itemsize
    task = make_task(exp.task)
    seq_len = task.seq_len()
    local = exp.train.batch_size // n_devices
    live = live_examples(exp, n_devices, backend)
    token = seq_len * exp.model.n_embd * itemsize
    problem = task.example_bytes()
    lm_system = 2 * n_params**2 * itemsize if uses_lm(exp) and exp.optim.lm_solver == "cholesky" else 0
    return {"state": 6 * n_params * itemsize, "lm_normal_equations": lm_system, "sequence_mixing": mixing,
            "activations": 2 * (exp.model.n_layer + 1) * live * token,
            "data": local * (problem + 8),
            "statistics": exp.train.grad_stats_batches * n_params * itemsize,
            "evaluation": exp.train.eval_batch_size // n_devices * (problem + token)}


_MEMORY_FIELDS = {"sequence_mixing": "task.n_points (the mixer grows as its square or cube)",
                  "lm_normal_equations": "model.n_embd, or use optim.lm_solver=cg (matrix-free)",
                  "state": "model.n_embd / model.n_layer", "activations": "train.microbatch_size / model.n_embd",
                  "data": "train.batch_size / task.n_dims / task.n_points",
                  "statistics": "train.grad_stats_batches / model.n_embd",
                  "evaluation": "train.eval_batch_size / task.n_dims / task.n_points"}


def check_memory(exp: Experiment, mesh) -> None:
    """Refuse, before anything is allocated or written, a run whose lower-bound estimate exceeds a device:
    during training (everything but the test batch), or while the final metrics are measured (the state
    and the test batch)."""
    limit, platform = device_memory(mesh.devices.flat[0]), mesh.devices.flat[0].platform
    mixing = sequence_mixing(exp, mesh.devices.size, platform)  # before anything traces the model
    check_fits({"sequence_mixing": mixing}, limit, platform, "the run", _MEMORY_FIELDS)
    parts = memory_estimate(exp, mesh.devices.size, platform)
    check_fits({k: v for k, v in parts.items() if k != "evaluation"}, limit, platform, "the run", _MEMORY_FIELDS)
    check_fits({k: parts[k] for k in ("state", "evaluation")}, limit, platform, "the final test", _MEMORY_FIELDS)
