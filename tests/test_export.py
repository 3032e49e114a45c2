"""Every jitted computation of a training run and of its evaluation, exported for GPU and TPU with jax.export
on this CPU-only machine.

Exporting lowers a computation to one StableHLO module for both platforms without a device of either
kind. It fails here, not on the cluster, when an op has no GPU or TPU lowering or calls a custom kernel
that export does not guarantee stable. The tests also read the module: the jitted function's input and
output avals, the configured dtype, the vendor solvers behind the linear algebra, the device count and
batch sharding of a mesh, and the matmul precision a float32 run asks for. Nothing is compiled: XLA's
own passes on those platforms (TPU's float64 among them) are beyond what an export shows.
"""
import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import export

from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.eval import solvers, stats
from lsq_jax.eval.constructions import construction_solvers
from lsq_jax.mesh import make_mesh, replicated
from lsq_jax.models.backbone import SequenceModel
from lsq_jax.plan.run import CPU_SCAN_UNROLL, make_plan
from lsq_jax.train.step import evaluate_loss
from steps import full_size_fns, initial_state

from config_files import get_config
from xla_env import xla_flags

TESTS = pathlib.Path(__file__).resolve().parent
PLATFORMS = ("cuda", "tpu")
BACKEND = "gpu"  # what the plan builds the step for: an accelerator's microbatches and scan unroll
CONFIGS = ("baseconv", "linear_attention", "transformer_lsq")
DTYPES = ("float64", "float32")
# small enough to trace in a fraction of a second: what lowers is the same at any width or batch
SMALL = {"model.n_embd": 16, "model.n_layer": 1, "model.n_head": 2, "train.batch_size": 8,
         "train.grad_stats_batches": 3, "train.eval_batch_size": 8}
N_PROBLEMS, N_ITERS = 4, 3  # the evaluation harness's problems and iterations
NARROW_FLOATS = {"f32", "f16", "bf16"}


def run_cases(fast=("baseconv", "float64")):
    """(config, dtype) for every config and dtype; all but `fast` in the slow tier."""
    return [pytest.param(name, dtype, id=f"{name}-{dtype}", marks=() if (name, dtype) == fast else pytest.mark.slow)
            for name in CONFIGS for dtype in DTYPES]


# --- building the run's pieces, shared between tests ------------------------------------------------------


@functools.cache
def experiment(name: str, dtype: str, **overrides):
    """configs/<name>.py:smoke at SMALL sizes in `dtype`, with `overrides` (flattened config keys)."""
    c = get_config(name, "smoke")
    c.update_from_flattened_dict({**SMALL, "dtype": dtype, **overrides})
    return experiment_from_config(c)


def lm_experiment(name: str, dtype: str, solver: str = "cholesky"):
    return experiment(name, dtype, **{"optim.optimizer": "lm", "optim.lm_solver": solver})


@functools.cache
def cpu_mesh():
    return make_mesh()


@functools.cache
def step_fns(exp, lm_phase: bool = False, backend: str = BACKEND, mesh=None):
    """make_step_fns at the task's full size, built for `backend` on `mesh` (default this process's)."""
    return full_size_fns(exp, mesh or cpu_mesh(), lm=lm_phase, backend=backend)


def abstract_state(exp, sharding=None):
    """The TrainState's shapes and dtypes (placed with `sharding` when given), nothing allocated."""
    return jax.eval_shape(jax.jit(lambda: initial_state(exp), out_shardings=sharding))


def abstract_metric(exp, sharding=None):
    """The gradient-cosine metric the step takes: a scalar of the run's dtype."""
    return jax.ShapeDtypeStruct((), jnp.dtype(exp.task.dtype), sharding=sharding)


def abstract(tree):
    """ShapeDtypeStructs of a pytree's arrays (a Solver's weights, say), its static parts kept."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# --- reading an exported module ---------------------------------------------------------------------------


def exported_checked(fn, *args, n_devices: int = 1, **static) -> export.Exported:
    """fn(*args, **static) exported for PLATFORMS from abstract args, with what every export must show:
    both platforms, the mesh's device count, and the avals and output tree of the jitted function."""
    exported = export.export(fn, platforms=PLATFORMS)(*args, **static)
    assert exported.platforms == PLATFORMS
    assert exported.nr_devices == n_devices
    assert [(a.shape, a.dtype) for a in exported.in_avals] == [(x.shape, jnp.dtype(x.dtype))
                                                               for x in jax.tree.leaves(args)]
    out = jax.eval_shape(functools.partial(fn, **static), *args)
    assert exported.out_tree == jax.tree.structure(out)
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [(x.shape, x.dtype) for x in jax.tree.leaves(out)]
    return exported


def custom_calls(module: str) -> set[str]:
    """The targets of every custom call in a StableHLO module (the platforms' kernels, e.g. cuSOLVER's)."""
    return set(re.findall(r"stablehlo\.custom_call @(\w+)", module))


def element_types(module: str) -> set[str]:
    """The element type of every tensor in a StableHLO module: f64, f32, i64, ui32, i1, ..."""
    return {t.rsplit("x", 1)[-1] for t in re.findall(r"tensor<([^>]*)>", module)}


def dot_precisions(module: str) -> list[str]:
    """The precision attribute of every dot_general in a module, '' where it has none (the default)."""
    lines = [line for line in module.splitlines() if "stablehlo.dot_general" in line]
    return [m.group(1) if (m := re.search(r"precision = \[([^\]]*)\]", line)) else "" for line in lines]


def check_dtype(exported: export.Exported, dtype: str, avals=None) -> None:
    """Every floating aval of `avals` (default: all inputs and outputs) has the run's dtype, and a float64
    module holds no narrower float anywhere."""
    avals = (*exported.in_avals, *exported.out_avals) if avals is None else avals
    floats = {a.dtype for a in avals if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {jnp.dtype(dtype)}
    types = element_types(exported.mlir_module())
    assert {"float64": "f64", "float32": "f32"}[dtype] in types
    if dtype == "float64":
        assert not types & NARROW_FLOATS, types & NARROW_FLOATS


def has_op(exported: export.Exported, op: str) -> bool:
    return f"stablehlo.{op}" in exported.mlir_module()


def uses_cusolver(exported: export.Exported) -> bool:
    return any(name.startswith("cusolver") for name in custom_calls(exported.mlir_module()))


# --- the training step ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, dtype", run_cases())
def test_adam_step_exports(name, dtype):
    """The recipe's step at an accelerator's microbatching (one: the whole batch at once, no loop)."""
    exp = experiment(name, dtype)
    exported = exported_checked(step_fns(exp).train, abstract_state(exp), abstract_metric(exp))
    check_dtype(exported, dtype)
    assert not has_op(exported, "while") and not uses_cusolver(exported)


def test_microbatched_adam_step_exports_its_accumulating_scan():
    """train.microbatch_size = 2 of a batch of 8: four microbatches accumulated in a loop."""
    exp = experiment("baseconv", "float64", **{"train.microbatch_size": 2})
    exported = exported_checked(step_fns(exp).train, abstract_state(exp), abstract_metric(exp))
    check_dtype(exported, "float64")
    assert has_op(exported, "while")


@pytest.mark.parametrize("name, dtype", run_cases())
def test_gradient_statistics_export(name, dtype):
    exp = experiment(name, dtype)
    exported = exported_checked(step_fns(exp).stats, abstract_state(exp))
    check_dtype(exported, dtype)
    assert has_op(exported, "while")  # one mini-batch gradient at a time (lax.map)


def scans(jaxpr) -> list[tuple[int, int]]:
    """(length, unroll) of every scan of a jaxpr, nested ones included, in order."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append((eqn.params["length"], eqn.params["unroll"]))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += scans(inner)
    return out


def train_scans(exp, backend: str) -> list[tuple[int, int]]:
    fns = step_fns(exp, backend=backend)
    return scans(jax.make_jaxpr(fns.train)(abstract_state(exp), abstract_metric(exp)).jaxpr)


def test_the_step_built_for_an_accelerator_neither_splits_nor_unrolls_its_batch():
    """The plan takes the platform to build for: on CPU (the default for a CPU mesh) the automatic
    microbatches, their scan unrolled by CPU_SCAN_UNROLL; for a GPU the whole batch, or the configured
    microbatches one per scan iteration, whatever platform traces it."""
    auto = experiment("baseconv", "float64", **{"train.batch_size": 1024})  # 256 x 21 x 16 <= 2^17
    assert train_scans(auto, "cpu") == [(4, CPU_SCAN_UNROLL)]
    assert scans(jax.make_jaxpr(full_size_fns(auto, cpu_mesh()).train)(
        abstract_state(auto), abstract_metric(auto)).jaxpr) == [(4, CPU_SCAN_UNROLL)]
    assert train_scans(auto, BACKEND) == []
    sized = experiment("baseconv", "float64", **{"train.microbatch_size": 2})
    assert train_scans(sized, "cpu") == [(4, CPU_SCAN_UNROLL)]
    assert train_scans(sized, BACKEND) == [(4, 1)]


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("name, dtype", run_cases())
def test_lm_step_exports(name, dtype, solver):
    """Cholesky factors J^T J with cuSOLVER's potrf on GPU and StableHLO's cholesky on TPU; CG is
    matrix-free and calls no solver."""
    exp = lm_experiment(name, dtype, solver)
    fns = step_fns(exp, lm_phase=True)
    state = abstract_state(exp)
    exported = exported_checked(fns.train, state, abstract_metric(exp))
    check_dtype(exported, dtype)
    calls = custom_calls(exported.mlir_module())
    if solver == "cholesky":
        assert "cusolver_potrf_ffi" in calls and has_op(exported, "cholesky")
    else:
        assert not uses_cusolver(exported) and not has_op(exported, "cholesky")
    loss = exported_checked(fns.lm_loss, state)
    check_dtype(loss, dtype)
    assert loss.out_avals[0].shape == ()


def test_a_scale_equivariant_lm_step_over_ranges_exports():
    """`:lm_general`'s kind of step: LM over two row counts and a kappa range, on the relative loss, the
    model normalising each problem, its rows sharing one positional vector; it lowers for both platforms
    with the same Cholesky as any LM step."""
    exp = experiment("linear_attention", "float64", **{
        "optim.optimizer": "lm", "task.n_points": 6, "task.n_points_min": 5, "model.n_positions": 9,
        "task.scale_cond_max": 10.0, "task.train_loss": "relative", "model.scale_equivariant": True,
        "model.positions": "first_and_rest"})
    exported = exported_checked(step_fns(exp, lm_phase=True).train, abstract_state(exp), abstract_metric(exp))
    check_dtype(exported, "float64")
    assert "cusolver_potrf_ffi" in custom_calls(exported.mlir_module())


@pytest.mark.parametrize("name, dtype", run_cases())
def test_evaluate_loss_exports(name, dtype):
    """The test metrics at the end of training, jitted as the loop jits them."""
    exp = experiment(name, dtype)
    plan = make_plan(exp, cpu_mesh())
    fn = jax.jit(lambda params: evaluate_loss(params, plan))
    exported = exported_checked(fn, abstract_state(exp).params)
    check_dtype(exported, dtype)
    assert "mse" in jax.tree.unflatten(exported.out_tree, exported.out_avals)


# --- the evaluation harness -------------------------------------------------------------------------------


def harness_computations(exp) -> dict[str, tuple]:
    """name -> (jitted fn, abstract args, static kwargs, whether it takes an SVD) for every device
    computation of the report of `exp` (lsq_jax.eval.report.evaluate_experiment): the model's
    single-step application; for the one-step tasks also the spectra of the problems, every solver's
    iterates (run_solver's jitted scan) and the statistics of the iterates."""
    task, model = make_task(exp.task), SequenceModel(exp.model)
    params = abstract_state(exp).params

    def apply_fn(p, inputs):
        return model.apply({"params": p}, inputs)

    batch = jax.eval_shape(task.sample, example_keys(jax.random.key(0), 0, 0, N_PROBLEMS))
    out = {"single_step": (jax.jit(apply_fn), (params, batch.inputs), {}, False)}
    if not task.is_one_step_solver:
        return out
    a, b, x_star, x0 = batch.raw
    spectra = jax.jit(lambda a: (stats.cond_b(a), *stats.gram_extremes(a), solvers.auto_step_size(a)))
    out["spectra"] = (spectra, (a,), {}, True)
    iterated = [solvers.learned_gradient_solver(apply_fn, params),
                *construction_solvers(exp.task.n_dims, "auto")(exp.task.n_points),
                solvers.gd_solver(), solvers.optimal_gd_solver(), solvers.cg_solver(), solvers.lstsq_solver()]
    for solver in iterated:  # all but CG take an SVD: the 'auto' step sizes, optimal GD's spectrum, lstsq
        out[solver.name] = (solvers._run_solver, (abstract(solver), a, b, x0), {"n_iters": N_ITERS},
                            solver.name != "cg")
    xs = jax.ShapeDtypeStruct((N_ITERS + 1, *x0.shape), x0.dtype)
    out["trajectory_errors"] = (stats.trajectory_errors, (xs, a, b, x_star, xs), {"k": 1}, False)
    out["trajectory_statistics"] = (stats.trajectory_statistics,
                                    (jax.ShapeDtypeStruct(xs.shape[:2], x0.dtype),), {}, False)
    return out


@pytest.mark.parametrize("name, dtype", run_cases())
def test_evaluation_harness_exports(name, dtype):
    """Each device computation of the report lowers; the SVDs behind the step sizes, the spectra and lstsq
    reach cuSOLVER on GPU and the TPU's Eigh / Qr kernels; the outputs keep the problems' dtype (the
    constructions' weights are float64 whatever the run's dtype)."""
    exp = experiment(name, dtype)
    computations = harness_computations(exp)
    assert ("spectra" in computations) == make_task(exp.task).is_one_step_solver
    for what, (fn, args, static, svd) in computations.items():
        exported = exported_checked(fn, *args, **static)
        check_dtype(exported, dtype, avals=exported.out_avals)
        calls = custom_calls(exported.mlir_module())
        has_svd = any(c.startswith("cusolver_gesvd") for c in calls) and {"Eigh", "Qr"} <= calls
        assert has_svd == svd, (what, calls)


# --- float32 matmul precision -----------------------------------------------------------------------------


def precision_entry(entry: str, name: str):
    """(jitted fn, abstract args) of the Adam or the LM step of configs/<name>.py in float32."""
    exp = experiment(name, "float32") if entry == "adam" else lm_experiment(name, "float32")
    return step_fns(exp, lm_phase=entry == "lm").train, (abstract_state(exp), abstract_metric(exp))


@pytest.mark.parametrize("entry", ["adam", pytest.param("lm", marks=pytest.mark.slow)])
def test_float32_matmuls_run_at_the_precision_the_run_sets(entry):
    """A run's matmul_precision ('highest', main's setup_jax) puts HIGHEST on every float32 dot_general,
    as GPUs (TF32) and TPUs (bfloat16 passes) would otherwise round the operands; the default leaves the
    precision unset. The JAX setting is restored after the export."""
    exp = experiment("transformer_lsq", "float32")
    assert exp.matmul_precision == "highest"
    fn, args = precision_entry(entry, "transformer_lsq")
    before = jax.config.jax_default_matmul_precision
    with jax.default_matmul_precision("default"):  # whatever an earlier test of this process set
        default = exported_checked(fn, *args).mlir_module()
    with jax.default_matmul_precision(exp.matmul_precision):
        forced = exported_checked(fn, *args).mlir_module()
    assert jax.config.jax_default_matmul_precision == before
    assert dot_precisions(forced) and set(dot_precisions(forced)) == {"HIGHEST, HIGHEST"}
    assert set(dot_precisions(default)) == {""}
    assert len(dot_precisions(forced)) == len(dot_precisions(default))


# --- a mesh of several devices ----------------------------------------------------------------------------

N_SHARDED_DEVICES = 4


def sharded_entries() -> dict[str, tuple]:
    """entry -> (jitted fn, abstract args) of the run on make_mesh() over every device of this process:
    the state replicated on the mesh, as the loop places it (see sharded_exports)."""
    mesh = make_mesh()
    adam, lm, cg, rows = (experiment("baseconv", "float64"), lm_experiment("baseconv", "float64"),
                          lm_experiment("baseconv", "float64", "cg"), lm_experiment("baseconv", "float64", "sharded"))
    micro = experiment("baseconv", "float64", **{"train.microbatch_size": 1})  # 2 per device
    state = {exp: abstract_state(exp, replicated(mesh)) for exp in (adam, lm, cg, rows, micro)}
    metric = abstract_metric(adam, replicated(mesh))
    fns = {exp: step_fns(exp, lm_phase=exp.optim.optimizer == "lm", mesh=mesh) for exp in state}
    return {"adam": (fns[adam].train, (state[adam], metric)),
            "adam_microbatched": (fns[micro].train, (state[micro], metric)),
            "stats": (fns[adam].stats, (state[adam],)),
            "lm_cholesky": (fns[lm].train, (state[lm], metric)),
            "lm_cg": (fns[cg].train, (state[cg], metric)),
            "lm_sharded": (fns[rows].train, (state[rows], metric)),
            "lm_loss": (fns[lm].lm_loss, (state[lm],)),
            "evaluate_loss": (jax.jit(functools.partial(evaluate_loss, plan=make_plan(adam, mesh))),
                              (state[adam].params,))}


def sharded_exports() -> dict[str, int]:
    """In a process with N_SHARDED_DEVICES emulated devices: every entry exported on the mesh over all of
    them, checked like the one-device exports, with the mesh's partitions in the module and the batch's
    keys sharded along 'data'. Returns entry -> the export's device count."""
    jax.config.update("jax_enable_x64", True)
    out = {}
    for name, (fn, args) in sharded_entries().items():
        exported = exported_checked(fn, *args, n_devices=jax.device_count())
        check_dtype(exported, "float64")
        module = exported.mlir_module()
        assert f"mhlo.num_partitions = {jax.device_count()}" in module, name
        assert re.search(r'sdy\.sharding_constraint %\w+ <@mesh, \[\{"data"\}', module), name
        out[name] = exported.nr_devices
    return out


@pytest.mark.slow
def test_entries_export_for_a_4_device_mesh():
    env = {**os.environ, "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={N_SHARDED_DEVICES}"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    code = "import json, test_export; print(json.dumps(test_export.sharded_exports()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=TESTS.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got == {name: N_SHARDED_DEVICES for name in ("adam", "adam_microbatched", "stats", "lm_cholesky",
                                                        "lm_cg", "lm_sharded", "lm_loss", "evaluate_loss")}
