"""Devices and processes: the multi-process start, and one 1-D mesh named 'data' over every device of
every process.

Parameters and optimizer state are replicated (P()); the batch is sharded along 'data' (P('data')).
Plain jax.jit on arrays placed this way lets XLA insert the gradient all-reduce, so the code of the step
is the same for one CPU and for a pod. Training, the benchmark and the evaluation's restore use it.
"""
import os

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lsq_jax.config.check import ConfigError, one_line

DATA_AXIS = "data"


def setup_jax(matmul_precision: str) -> None:
    """Every run's JAX settings, before its first computation: float64 on (a config's dtype picks float32
    per array), and every matmul at `matmul_precision` (Experiment.matmul_precision): main and the bench."""
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", matmul_precision)


def make_mesh(n_devices: int = 0) -> jax.sharding.Mesh:
    """A mesh along one axis 'data' over all devices of all processes, or over the first `n_devices`
    (the scaling benchmark's subsets of one machine's devices).

    The axis is Auto (JAX 0.10 defaults to Explicit): the step only constrains where the per-example
    keys live and lets XLA propagate the sharding through the sampler, the model and the gradient sum.
    """
    total = jax.device_count()
    if not 0 <= n_devices <= total:
        raise ValueError(f"n_devices={n_devices} is not allowed: must be in [0, {total}] (0: all {total} devices)")
    devices = jax.devices()[:n_devices] if n_devices else None  # None: make_mesh's own order of all devices
    return jax.make_mesh((n_devices or total,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


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


def device_memory(device, *, whole_host: bool = False) -> int | None:
    """Bytes one device can hold: the accelerator's limit, or on CPU the machine's physical memory shared
    by this process's devices (all of it with `whole_host`: a computation on one CPU device alone)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- not every backend reports
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return physical if whole_host else physical // max(jax.local_device_count(), 1)
    return None


def check_fits(parts: dict[str, int], limit: int | None, platform: str, what: str, fields: dict[str, str]) -> None:
    """ConfigError when the lower-bound bytes `parts` (by part) of `what` exceed `limit`, naming the fields
    that shrink the largest part (`fields[part]`); nothing when the limit is unknown."""
    total = sum(parts.values())
    if limit is None or total <= limit:
        return
    largest = max(parts, key=parts.get)
    gib = 2.0**30
    detail = ", ".join(f"{k} {v / gib:.3g}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
    raise ConfigError(f"{what} needs at least {total / gib:.3g} GiB per device ({detail} GiB) but a {platform} "
                     f"device has {limit / gib:.3g} GiB: reduce {fields[largest]}")


DISTRIBUTED_MODES = ("off", "auto", "explicit")
INIT_TIMEOUT_S = 300  # how long a process waits for its peers at start-up (JAX's default)
_LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


def initialize_distributed(mode: str = "off", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None, *,
                           initialization_timeout: int = INIT_TIMEOUT_S) -> None:
    """Start JAX's multi-controller runtime; must come before any other JAX call (even `jax.devices()`).

    Every process runs the same program; afterwards `jax.devices()` lists the devices of all processes and
    `make_mesh` spans them all. A peer that never arrives aborts the process (SIGABRT, exit 134) after
    `initialization_timeout` seconds rather than raising, so launchers must watch their children.

    Args:
      mode: 'off' (one process; the three arguments must be unset), 'auto' (JAX reads the cluster from the
        environment: Cloud TPU VM metadata, SLURM's SLURM_* variables under `srun`, Open MPI, Kubernetes;
        any argument given overrides what it detects), or 'explicit' (all three arguments required).
      coordinator_address: host:port of process 0, the same string for every process. A loopback host
        (127.x.x.x, localhost, ::1) is also where process 0 binds; any other host binds all interfaces
        on that port (or $JAX_COORDINATOR_BIND_ADDRESS), since a cluster hostname can resolve to a
        loopback address on its own node.
      num_processes: total processes.
      process_id: this process's index in [0, num_processes).
      initialization_timeout: seconds to wait for all processes to connect.

    Raises:
      ValueError: one line naming the flag (`--distributed`, `--coordinator_address`, ...) when the
        arguments are inconsistent, or when 'auto' finds no cluster in the environment.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"--distributed={mode!r} is not allowed: must be one of {', '.join(DISTRIBUTED_MODES)}")
    given = {name: value for name, value in (("coordinator_address", coordinator_address),
                                             ("num_processes", num_processes), ("process_id", process_id))
             if value is not None}
    if mode == "off":
        if given:
            raise ValueError(f"--{next(iter(given))} needs --distributed=explicit (or auto); "
                             "it is not used with --distributed=off")
        return
    if mode == "explicit":
        missing = [name for name in ("coordinator_address", "num_processes", "process_id") if name not in given]
        if missing:
            raise ValueError(f"--distributed=explicit needs --{', --'.join(missing)}")
    _check_distributed_args(coordinator_address, num_processes, process_id)
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                  initialization_timeout=initialization_timeout, local_device_ids=_slurm_local_device_ids())
    if coordinator_address is not None and _is_loopback(coordinator_address.rsplit(":", 1)[0]):
        kwargs["coordinator_bind_address"] = coordinator_address
    if mode == "auto":
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as err:  # JAX found no cluster: 'coordinator_address should be defined.' and similar
            raise ValueError(
                f"--distributed=auto found no cluster environment (Cloud TPU VM, SLURM under srun, Open MPI) "
                f"to read the processes from ({one_line(err, first=True)}); use --distributed=explicit "
                f"--coordinator_address=HOST:PORT --num_processes=N --process_id=I") from None
        return
    jax.distributed.initialize(**kwargs)


def _check_distributed_args(coordinator_address, num_processes, process_id) -> None:
    """The flags' values, checked before JAX sees them (JAX would abort or hang on some of them)."""
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator_address={coordinator_address!r} is not allowed: "
                             "must be HOST:PORT with a port in 1..65535, e.g. 10.0.0.1:1234")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} is not allowed: must be a positive integer")
    if process_id is not None:
        if process_id < 0:
            raise ValueError(f"--process_id={process_id} is not allowed: must be a non-negative integer")
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(f"--process_id={process_id} is not allowed: must be less than "
                             f"--num_processes={num_processes}")


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host.lower() in _LOOPBACK_HOSTS


def _slurm_local_device_ids() -> list[int] | None:
    """[0] for a SLURM task that was bound to exactly one GPU (--gpus-per-task=1, --gpu-bind), else None.

    Under SLURM JAX makes local GPU number SLURM_LOCALID visible, which assumes every task sees all the
    node's GPUs (--gres=gpu:N); when SLURM already restricts CUDA_VISIBLE_DEVICES to one GPU, that GPU
    is number 0 and SLURM_LOCALID > 0 would name a device that does not exist.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if "SLURM_LOCALID" in os.environ and visible and len(visible.split(",")) == 1:
        return [0]
    return None
