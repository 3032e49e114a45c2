"""Data: samplers (pure functions of a PRNG key) and tasks (sample -> model input, target, read-out)."""
from lsq_jax.data.samplers import (
    LeastSquaresSample,
    example_keys,
    gaussian,
    least_squares,
    scale_singular_values,
)
from lsq_jax.data.tasks import (
    TASK_NAMES,
    CurriculumConfig,
    Task,
    TaskBatch,
    TaskConfig,
    curriculum_value,
    explicit_gradient_inputs,
    gradient_descent,
    least_squares_gradient,
    make_task,
    multistep_gd_inputs,
    prefix_gradients,
    primitive_metrics,
)
