"""Entrypoint: python -m lsq_jax.main --config=configs/baseconv.py[:variant] [--config.a.b=v] [--workdir=W].
Parses flags, sets up JAX (float64, matmul precision, multi-process), converts the config once into validated
dataclasses and calls the library. Bad input (an unknown or ill-typed field, contradictory settings, a broken
config file, an unusable or full workdir, sizes that cannot fit in memory) is ONE line on stderr, status 2,
as is a file that cannot be written. SIGTERM and SIGINT: see lsq_jax.preemption (status 0 and 130)."""
import sys

from lsq_jax import preemption
from lsq_jax.config.check import ConfigError, one_line
from lsq_jax.config.load import FLAGS, default_workdir, parse_flags


def execute(log=print) -> None:
    """The parsed command: set up JAX, then one call per mode (eval and construct never import lsq_jax.train)."""
    from absl import logging

    from lsq_jax import checkpoint, mesh
    from lsq_jax.config.experiment import experiment_from_config, matmul_precision_of
    from lsq_jax.eval import report
    from lsq_jax.plan.report import make_report_plan
    from lsq_jax.plan.run import make_plan
    from lsq_jax.workdir import Workdir, eval_dir, resolve_workdir

    logging.set_verbosity(logging.ERROR)  # Orbax reports every save (INFO) and read-only opens (WARNING)
    try:
        mesh.setup_jax(matmul_precision_of(FLAGS.config))
        mesh.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
        exp = experiment_from_config(FLAGS.config) if FLAGS.mode != "eval" else None
    except ValueError as err:
        raise ConfigError(one_line(err)) from None

    def planned(exp):
        """The run's plan (train) or its report's alone: each refuses what does not fit, the report included."""
        if FLAGS.mode == "train":
            return make_plan(exp, mesh.make_mesh())
        return make_report_plan(exp, constructions_only=FLAGS.mode == "construct")

    plan = planned(exp) if exp is not None else None  # eval: once the checkpoint gives the experiment
    workdir = Workdir(resolve_workdir(FLAGS.workdir or default_workdir(exp.name, FLAGS.mode)))
    log = workdir.log(log)
    preemption.install(log)
    log(f"workdir: {workdir}")
    if FLAGS.mode == "train" and plan.lm_choice:
        log(plan.lm_choice)
    if FLAGS.mode == "train":
        from lsq_jax.train import loop
        with loop.training(plan, workdir, log=log, allow_config_change=FLAGS.allow_config_change) as trained:
            if FLAGS.report and not trained.preempted:  # the report while the run still holds its workdir
                report.write_evaluation(plan.report, trained.state.params, workdir, log=log)
    elif FLAGS.mode == "eval":
        from lsq_jax.models.backbone import abstract_params
        exp, step, params = checkpoint.restore_params(workdir.path, FLAGS.step, lambda e: abstract_params(e.model),
                                                      mesh.replicated(mesh.make_mesh()), log=log)
        plan = planned(exp)
        out = eval_dir(workdir.path, default_workdir(exp.name, "eval"))
        workdir.check_writable(out)  # before, not after
        mesh.setup_jax(exp.matmul_precision)
        log(f"evaluating step {step} of {exp.name}")
        report.write_evaluation(plan, params, workdir, log=log, out=out)
    else:
        workdir.check_writable(workdir / "eval")
        report.write_evaluation(plan, None, workdir, log=log)


def run(argv: list[str], log=print, *, program: bool = False) -> int:
    """The whole command in this process; returns the exit status. Puts back the signal handlers it installs
    (unless it is the `program`: then they stay until the process ends, and a second signal changes nothing);
    Orbax's failures are kept to one line for the rest of the process (checkpoint.quiet_orbax_failures)."""
    if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help())
        return 0
    preemption.install_early()
    from lsq_jax import checkpoint, workdir
    checkpoint.quiet_orbax_failures()
    try:
        parse_flags(argv)
        execute(log)
    except (checkpoint.CheckpointError, ConfigError, workdir.WorkdirError, OSError) as err:
        print(f"error: {workdir.os_error_line(err) if isinstance(err, OSError) else one_line(err)}", file=sys.stderr)
        return 2
    except preemption.Preempted:
        preemption.stopping()
        log(preemption.nothing_to_save())
    finally:
        if not program:
            preemption.uninstall()
    return preemption.status()


if __name__ == "__main__":
    preemption.exit(preemption.guarded(run, sys.argv, program=True))
