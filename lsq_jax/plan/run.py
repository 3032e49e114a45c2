"""What a training run is, decided once from the experiment and the mesh: the report's part (the task, the
model, the parameter count, the evaluation's sizes: lsq_jax.plan.report), the optimizer, the key streams,
the microbatches per curriculum size, the Levenberg-Marquardt chunks and the memory estimate. The state's
initialisation, the step builders, the loop, the report and the benchmarks read the plan; none of them
builds an optimizer or derives a size again. A plan is only made for a run that fits: `make_plan` refuses
the others in one ConfigError before anything is allocated or written."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax

from lsq_jax.config.check import ConfigError
from lsq_jax.config.experiment import Experiment
from lsq_jax.config.optim import with_solver
from lsq_jax.data.base import Task
from lsq_jax.data.keys import run_keys
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import curriculum_value
from lsq_jax.mesh import batch_sharded, check_batch_size, device_memory
from lsq_jax.models.backbone import SequenceModel, mixing_bytes
from lsq_jax.optim import lm_transform, recipe
from lsq_jax.plan.memory import check_memory, check_mixing, memory_estimate, training_bytes
from lsq_jax.plan.report import ReportPlan, make_report_plan, report_parts

# Auto microbatch on CPU: one (examples, T, E) activation holds at most this many elements (1 MiB in
# float64): XLA:CPU's step is bound by main memory once activations outgrow the cache; 2^17 measured the
# fastest on CPU, see docs/performance.md.
MICROBATCH_ELEMENTS = 2**17

# Microbatches per iteration of the accumulating scan on CPU: two independent ones in one loop body let
# XLA:CPU run their ops side by side on two cores (faster, the same sums to round-off; see
# docs/performance.md). Off CPU the scan is not unrolled: a microbatch size chosen there to fit device
# memory stays the most that is live at once.
CPU_SCAN_UNROLL = 2

# The LM solvers optim.lm_solver 'auto' tries, in order (pick_lm_solver).
LM_AUTO_ORDER = ("cholesky", "sharded", "cg")

LM_CHUNK_ENTRIES = 2**22  # auto lm_chunk: a device's chunk Jacobian holds at most this many entries (32 MiB float64)


class Phase(NamedTuple):
    """What one compiled step is specialised to: the curriculum's n_points and truncated n_dims (None: the
    task's own) at an iteration, and whether it is a Levenberg-Marquardt iteration."""

    n_points: int
    n_dims: int | None
    lm: bool


@dataclasses.dataclass(frozen=True, eq=False)
class RunPlan:
    """What one run is (see the module docstring); built by `make_plan`.

    Attributes:
        exp, mesh: the experiment and the devices it runs on.
        backend: the platform the steps are built for ('cpu', 'gpu', 'tpu').
        report: the evaluation's part, which holds the task, the model and its parameter count.
        tx: the run's optimizer: the recipe (lsq_jax.optim.recipe), or with optimizer 'lm' the hybrid of the
            recipe and Levenberg-Marquardt (lsq_jax.optim.lm_transform.Hybrid).
        keys: the run's key streams (lsq_jax.data.keys.run_keys).
        microbatches: per curriculum n_points, the microbatches each device's share of the batch is
            differentiated in.
        unroll: microbatches per iteration of the accumulating scan.
        lm_chunks: the strided chunks each device builds the Jacobian of its share of LM's batch in (1
            without LM).
        memory: the lower-bound bytes per device, by part (lsq_jax.plan.memory.memory_estimate).
        lm_choice: the line saying which LM solver optim.lm_solver 'auto' picked ("" otherwise).
    """

    exp: Experiment
    mesh: Any
    backend: str
    report: ReportPlan
    tx: Any
    keys: Mapping[str, Any]
    microbatches: Mapping[int, int]
    unroll: int
    lm_chunks: int
    memory: Mapping[str, int]
    lm_choice: str = ""

    @property
    def task(self) -> Task:
        return self.report.task

    @property
    def model(self) -> SequenceModel:
        return self.report.model

    @property
    def n_params(self) -> int:
        return self.report.n_params

    @property
    def waits_each_step(self) -> bool:
        """Whether the training loop waits for each step to finish before dispatching the next: on CPU
        with several devices in one process. Their collectives meet in XLA's in-process rendezvous, which
        deadlocks once the executions of many steps are queued behind it (every run of 500 steps
        dispatched without waiting hung, on 2 and on 4 emulated devices; see docs/performance.md)."""
        return self.backend == "cpu" and len(self.mesh.local_devices) > 1

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def optimizer(self, lm: bool = False):
        """The transform of a phase: the recipe's (in a hybrid run the hybrid's Adam part), or with `lm`
        Levenberg-Marquardt's (Hybrid.phase)."""
        if not uses_lm(self.exp):
            if lm:
                raise ValueError(f"optim.optimizer={self.exp.optim.optimizer!r} has no Levenberg-Marquardt phase")
            return self.tx
        return self.tx.phase(lm)

    @property
    def sharding(self):
        """How a batch's leading axis is placed: split over the mesh's 'data' axis."""
        return batch_sharded(self.mesh)

    def row_groups(self, n_points: int) -> list[tuple[int, int, int]]:
        """(L, first global example index, count) of each part of a batch at the curriculum's `n_points`:
        one part of every example, or with a range of rows (task.n_points_min) an equal contiguous share of
        the batch for each L in [n_points_min, n_points], in increasing L."""
        rows = self.exp.task.rows()
        if len(rows) == 1:
            return [(n_points, 0, self.exp.train.batch_size)]
        share = self.exp.train.batch_size // len(rows)
        return [(n, i * share, share) for i, n in enumerate(rows)]

    def full_size(self, lm: bool = False) -> Phase:
        """The phase at the task's full size (where the curriculum ends): the recipe's, or with `lm` LM's."""
        return Phase(self.exp.task.n_points, None, lm)

    def phase(self, step: int) -> Phase:
        """The phase of iteration `step` (a host int)."""
        n_dims = curriculum_value(self.exp.dims, step)
        return Phase(curriculum_value(self.exp.points, step), None if n_dims == self.exp.task.n_dims else n_dims,
                     uses_lm(self.exp) and step >= self.exp.optim.lm_after)


def uses_lm(exp: Experiment) -> bool:
    """Whether the run trains with Levenberg-Marquardt (optimizer 'lm', after its lm_after recipe steps)."""
    return exp.optim.optimizer == "lm"


def scan_unroll(backend: str) -> int:
    """Chunks per iteration of the accumulating scan on `backend` ('cpu', 'gpu', 'tpu'): CPU_SCAN_UNROLL on
    CPU, where two chunks side by side keep two cores busy; 1 elsewhere, so that a microbatch sized to fit
    device memory is the most that is live at once."""
    return CPU_SCAN_UNROLL if backend == "cpu" else 1


def divisors(n: int) -> list[int]:
    """The divisors of n in increasing order (trial division up to sqrt(n))."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def curriculum_points(exp: Experiment) -> list[int]:
    """Every n_points the curriculum reaches, in order."""
    c = exp.points
    return sorted({min(c.start + c.inc * k, c.end) for k in range((c.end - c.start) // c.inc + 2)} if c.inc
                  else {c.start})


def microbatches(exp: Experiment, task: Task, n_points: int, n_devices: int, backend: str) -> int:
    """How many microbatches each device's share of the batch is differentiated in (see TrainConfig):
    the batch over train.microbatch_size, or auto (0): on CPU the fewest that bring one (examples, T, E)
    activation down to MICROBATCH_ELEMENTS (the bound is per microbatch: CPU_SCAN_UNROLL are live at
    once), elsewhere one. With a range of rows each row count's share of the batch is the batch here."""
    local = exp.train.batch_size // len(exp.task.rows()) // n_devices
    size = exp.train.microbatch_size
    if size:
        if local % size:
            raise ValueError(f"train.microbatch_size={size} is not allowed: must divide the per-device batch "
                             f"{local} (train.batch_size / {n_devices} devices)")
        return local // size
    if backend != "cpu":
        return 1
    per_example = task.seq_len(n_points) * exp.model.n_embd
    return next((n for n in divisors(local) if (local // n) * per_example <= MICROBATCH_ELEMENTS), local)


def lm_outputs(exp: Experiment, task: Task) -> int:
    """K, the residuals of one problem (the entries of its target)."""
    keys = example_keys(jax.random.key(0), 0, 0, 1)
    return math.prod(jax.eval_shape(lambda k: task.sample(k, n_points=exp.task.n_points).targets, keys).shape)


def lm_chunks(exp: Experiment, task: Task, n_params: int, n_devices: int, backend: str = "cpu") -> int:
    """How many strided chunks each device builds the Jacobian of its share of the LM batch in:
    optim.lm_chunk problems each, or (auto) the fewest whose Jacobian stays within LM_CHUNK_ENTRIES (a
    budget per device, since each device accumulates its own chunks, lsq_jax.optim.lm; with lm_solver
    'sharded' it holds the chunk's Jacobians of every device, which each device gathers); with lm_solver 'cg',
    which holds one chunk's activations and never a Jacobian row block, the step's microbatches at full
    size. With a range of rows every chunk holds an equal part of each row count's share (optim.lm_chunk
    problems of each), and the count is of that share."""
    share = exp.train.batch_size // len(exp.task.rows())
    if share % n_devices:
        raise ValueError(f"train.batch_size={exp.train.batch_size} is not allowed: the share of each row count "
                         f"({share}) must split over the {n_devices} devices")
    local = share // n_devices
    if exp.optim.lm_chunk:
        if local % exp.optim.lm_chunk:
            raise ValueError(f"optim.lm_chunk={exp.optim.lm_chunk} is not allowed: must divide the per-device "
                             f"batch {local} (of each row count: train.batch_size / rows / {n_devices} devices)")
        return local // exp.optim.lm_chunk
    if exp.optim.lm_solver == "cg":
        return microbatches(exp, task, exp.task.n_points, n_devices, backend)
    per_problem = lm_outputs(exp, task) * n_params * len(exp.task.rows())  # one problem of each row count
    if exp.optim.lm_solver == "sharded":  # each chunk's Jacobians are gathered from every device
        per_problem *= n_devices
    return next((c for c in divisors(local) if (local // c) * per_problem <= LM_CHUNK_ENTRIES), local)


@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """A ValueError raised in the block refuses the run: one ConfigError with its message."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(str(err)) from None


def make_plan(exp: Experiment, mesh, backend: str | None = None, *, lm_memory_budget: int | None = None) -> RunPlan:
    """The plan of `exp` on `mesh`, built for `backend` (None: the platform of the mesh's devices; another
    platform when tracing a step to export it with jax.export). With optim.lm_solver 'auto' the plan picks
    the solver from its memory estimate against a device's memory, or against `lm_memory_budget` bytes per
    device when given (`pick_lm_solver`); the plan's exp, and with it what the run saves, holds the pick.

    Raises ConfigError, before anything is allocated or written, for a report that does not fit
    (lsq_jax.plan.report.make_report_plan), a batch that does not split over the devices, a microbatch
    size or LM chunk that does not divide a device's share, or a run whose memory estimate exceeds a
    device (lsq_jax.plan.memory.check_memory). The sequence mixer's memory is checked before anything
    traces the model (tracing builds the mixer's host-side tensors): the report's, then training's.
    """
    backend = backend or mesh.devices.flat[0].platform
    n = mesh.devices.size
    parts = report_parts(exp)
    task = parts.task
    with _refused():
        check_batch_size("train.batch_size", exp.train.batch_size, mesh)
        check_batch_size("train.eval_batch_size", exp.train.eval_batch_size, mesh)
        share = exp.train.batch_size // len(exp.task.rows())
        if share % n:
            raise ValueError(f"train.batch_size={exp.train.batch_size} is not allowed: each row count's share "
                             f"({share}) must split evenly over {n} devices")
        micro = {p: microbatches(exp, task, p, n, backend) for p in sorted({*curriculum_points(exp), *exp.task.rows()})}
        local = share // n
        live = min(local // micro[exp.task.n_points] * scan_unroll(backend), local)
        mixing = mixing_bytes(exp.model, task.seq_len(exp.task.n_points), live)
        check_mixing(mixing, mesh)
    report = make_report_plan(exp, parts=parts)
    n_params = report.n_params
    with _refused():
        size = functools.partial(lm_sizes, task=task, n_params=n_params, n_devices=n, backend=backend, live=live,
                                 mixing=mixing)
        limit = device_memory(mesh.devices.flat[0]) if lm_memory_budget is None else lm_memory_budget
        exp, choice = pick_lm_solver(exp, size, limit, n)
        chunks, memory = size(exp)
        check_memory(memory, mesh)
        tx = lm_transform.make_lm_optimizer(exp.optim) if uses_lm(exp) else recipe.make_optimizer(exp.optim)
    report = dataclasses.replace(report, exp=exp)
    return RunPlan(exp, mesh, backend, report, tx, run_keys(exp.seed), micro, scan_unroll(backend), chunks, memory,
                   choice)


def lm_sizes(exp: Experiment, task: Task, *, n_params: int, n_devices: int, backend: str, live: int,
             mixing: int) -> tuple[int, dict[str, int]]:
    """(LM chunks per device, the memory estimate by part) of `exp` with its LM solver (chunks 1 without
    LM): the dense solvers' estimate counts a chunk's Jacobian rows (lsq_jax.plan.memory)."""
    if not uses_lm(exp):
        return 1, memory_estimate(exp, task, n_devices=n_devices, n_params=n_params, live=live, mixing=mixing)
    chunks = lm_chunks(exp, task, n_params, n_devices, backend)
    chunk_problems = exp.train.batch_size // len(exp.task.rows()) // n_devices // chunks * len(exp.task.rows())
    return chunks, memory_estimate(exp, task, n_devices=n_devices, n_params=n_params, live=live, mixing=mixing,
                                   lm_rows=chunk_problems * lm_outputs(exp, task), lm_chunk_problems=chunk_problems)


def pick_lm_solver(exp: Experiment, size, limit: int | None, n_devices: int) -> tuple[Experiment, str]:
    """`exp` with optim.lm_solver 'auto' resolved, and the line that says what was picked ("" when `exp`
    names its solver or has no LM phase).

    'auto' picks the first of LM_AUTO_ORDER whose training estimate (``size(exp)[1]``, lm_sizes) fits
    `limit` bytes per device (None: unknown, so the first): Cholesky while one device holds its solve,
    then J^T J split by rows when there are devices to split it over, then matrix-free CG. With
    lm_valley, which only Cholesky reads, Cholesky alone.
    """
    if not uses_lm(exp) or exp.optim.lm_solver != "auto":
        return exp, ""
    candidates = [s for s in LM_AUTO_ORDER
                  if (s != "sharded" or n_devices > 1) and (s == "cholesky" or not exp.optim.lm_valley)]
    tried = []
    for solver in candidates:
        tried.append(solver)
        picked = dataclasses.replace(exp, optim=with_solver(exp.optim, solver))
        need = training_bytes(size(picked)[1])
        if limit is None or need <= limit:
            break
    gib = 2.0**30
    budget = "unknown" if limit is None else f"{limit / gib:.3g} GiB"
    return picked, (f"optim.lm_solver=auto picked {solver!r}: training needs {need / gib:.3g} GiB per device "
                    f"with it, of {budget} (tried {', '.join(tried)})")
