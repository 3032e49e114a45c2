"""Data parallelism over every device of every process: one 1-D mesh named 'data'.

Parameters and optimizer state are replicated (P()); the batch is sharded along 'data' (P('data')).
Plain jax.jit on arrays placed this way lets XLA insert the gradient all-reduce, so the code of the step
is the same for one CPU and for a pod.
"""
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
    """A mesh over all devices of all processes, along one axis 'data'.

    The axis is Auto (JAX 0.10 defaults to Explicit): the step only constrains where the per-example
    keys live and lets XLA propagate the sharding through the sampler, the model and the gradient sum.
    """
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(field: str, batch_size: int, mesh) -> None:
    """The global batch must split evenly over the devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"{field}={batch_size} is not allowed: must be a multiple of the device count {n}")


def initialize_distributed(mode: str = "off", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> None:
    """Start JAX's multi-controller runtime; must come before any other JAX computation.

    Args:
      mode: 'off' (one process), 'auto' (cloud TPU / SLURM / other environments JAX detects by itself),
        or 'explicit' (the three arguments below are required).
      coordinator_address: host:port of process 0.
      num_processes: total processes.
      process_id: this process's index.
    """
    if mode == "off":
        return
    if mode == "auto":
        jax.distributed.initialize()
        return
    if mode != "explicit":
        raise ValueError(f"distributed={mode!r} is not allowed: must be one of off, auto, explicit")
    missing = [name for name, value in (("coordinator_address", coordinator_address),
                                        ("num_processes", num_processes), ("process_id", process_id))
               if value is None]
    if missing:
        raise ValueError(f"--distributed=explicit needs --{', --'.join(missing)}")
    # process 0 binds the coordinator service to the very address the others dial
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=300,
                               coordinator_bind_address=coordinator_address if process_id == 0 else None)
