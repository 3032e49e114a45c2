"""The memory a run needs: a lower-bound estimate per device, by part, and the check that refuses a run
whose estimate exceeds a device, before anything is allocated or written. The sizes it counts come from
the run plan (lsq_jax.train.plan)."""
from __future__ import annotations

import jax.numpy as jnp

from lsq_jax.config.experiment import Experiment
from lsq_jax.data.base import Task
from lsq_jax.mesh import check_fits, device_memory


def memory_estimate(exp: Experiment, task: Task, *, n_devices: int, n_params: int, live: int, mixing: int,
                    lm_normal_equations: bool) -> dict[str, int]:
    """A lower bound, in bytes per device, of what training `exp` holds at once, by part.

    state: parameters, their gradient and accumulator, and the optimizer's moments and EMA (6 copies);
    activations: the input and output of every block for the `live` examples whose activations are held
    at once (a microbatch, two on CPU where the scan is unrolled), kept for the backward pass; data: the
    per-device batch's matrices A, its input tokens and per-example keys; statistics: the matrix of
    mini-batch gradients; lm_normal_equations (when LM solves them by Cholesky): the P x P J^T J and the
    chunk term being added to it; sequence_mixing: `mixing`, what one block's mixer materialises
    (lsq_jax.models.backbone.mixing_bytes); evaluation: the test batch of the final metrics (its
    matrices, tokens and one activation), held with the state after training.
    """
    itemsize = jnp.dtype(exp.task.dtype).itemsize
    token = task.seq_len() * exp.model.n_embd * itemsize
    problem = task.example_bytes()
    return {"state": 6 * n_params * itemsize,
            "lm_normal_equations": 2 * n_params**2 * itemsize if lm_normal_equations else 0,
            "sequence_mixing": mixing,
            "activations": 2 * (exp.model.n_layer + 1) * live * token,
            "data": exp.train.batch_size // n_devices * (problem + 8),
            "statistics": exp.train.grad_stats_batches * n_params * itemsize,
            "evaluation": exp.train.eval_batch_size // n_devices * (problem + token)}


_MEMORY_FIELDS = {"sequence_mixing": "task.n_points (the mixer grows as its square or cube)",
                  "lm_normal_equations": "model.n_embd, or use optim.lm_solver=cg (matrix-free)",
                  "state": "model.n_embd / model.n_layer", "activations": "train.microbatch_size / model.n_embd",
                  "data": "train.batch_size / task.n_dims / task.n_points",
                  "statistics": "train.grad_stats_batches / model.n_embd",
                  "evaluation": "train.eval_batch_size / task.n_dims / task.n_points"}


def _check(parts: dict[str, int], mesh, what: str) -> None:
    device = mesh.devices.flat[0]
    check_fits(parts, device_memory(device), device.platform, what, _MEMORY_FIELDS)


def check_mixing(mixing: int, mesh) -> None:
    """ConfigError when the sequence mixer alone exceeds a device (checked before anything traces the
    model, which builds the mixer's host-side tensors)."""
    _check({"sequence_mixing": mixing}, mesh, "the run")


def check_memory(parts: dict[str, int], mesh) -> None:
    """ConfigError when the estimate `parts` (memory_estimate) exceeds a device: during training
    (everything but the test batch), or while the final metrics are measured (the state and the test
    batch)."""
    _check({k: v for k, v in parts.items() if k != "evaluation"}, mesh, "the run")
    _check({k: parts[k] for k in ("state", "evaluation")}, mesh, "the final test")
