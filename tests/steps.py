"""The jitted step functions of an experiment at its full size, planned as a run plans them."""
from lsq_jax.mesh import make_mesh
from lsq_jax.train.plan import make_plan
from lsq_jax.train.step import StepFns, make_step_fns


def full_size_fns(exp, mesh=None, *, lm: bool = False, backend: str | None = None) -> StepFns:
    """make_step_fns of `exp`'s plan on `mesh` (None: every device) at the task's full size."""
    plan = make_plan(exp, mesh if mesh is not None else make_mesh(), backend)
    return make_step_fns(plan, plan.full_size(lm))
