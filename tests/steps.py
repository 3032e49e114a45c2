"""The jitted step functions of an experiment at its full size, planned as a run plans them."""
from lsq_jax.mesh import make_mesh
from lsq_jax.plan.run import make_plan
from lsq_jax.train.state import init_state
from lsq_jax.train.step import StepFns, make_step_fns


def full_size_fns(exp, mesh=None, *, lm: bool = False, backend: str | None = None) -> StepFns:
    """make_step_fns of `exp`'s plan on `mesh` (None: every device) at the task's full size."""
    plan = make_plan(exp, mesh if mesh is not None else make_mesh(), backend)
    return make_step_fns(plan, plan.full_size(lm))


def initial_state(exp, start: int = 0, mesh=None):
    """init_state of `exp`'s plan on `mesh` (None: every device)."""
    return init_state(make_plan(exp, mesh if mesh is not None else make_mesh()), start)
