"""Every config file and variant converts, and its training step traces (catches work that cannot run
under jit, such as a task drawing its fixed coefficients while being traced)."""
import jax
import pytest

from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.mesh import make_mesh
from lsq_jax.plan.run import make_plan
from lsq_jax.train.step import measure_grad_stats, train_step

from config_files import load
from steps import initial_state

CASES = [("baseconv", None), ("baseconv", "cpu"), ("baseconv", "smoke"), ("multistep_gd", "smoke"),
         ("multistep_gd", "cpu"), ("linear_attention", "smoke"), ("linear_attention", "softmax,cpu"),
         ("linear_attention", "lm"),
         ("transformer_lsq", "smoke"), ("transformer_lsq", "kappa5,baseconv,cpu"), ("transformer_icl", "smoke"),
         ("transformer_icl", "cpu")] + [("primitives", f"{p},smoke") for p in
                                        ("read", "linear", "multiply", "square", "identity", "read,attention")]


@pytest.mark.parametrize("name,arg", CASES)
@pytest.mark.slow
def test_config_converts_and_its_step_traces(name, arg):
    exp = experiment_from_config(load(name).get_config(arg))
    plan = make_plan(exp, make_mesh())
    state = jax.eval_shape(lambda: initial_state(exp))
    new_state, metrics = jax.eval_shape(lambda s: train_step(s, plan=plan, phase=plan.phase(0)), state)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert metrics["loss"].shape == ()
    if exp.train.grad_stats_batches:
        stats = jax.eval_shape(lambda s: measure_grad_stats(s, plan=plan, phase=plan.phase(0)), state)
        assert stats["gradient_cosine_mean"].shape == ()


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="huge"):
        load("baseconv").get_config("huge")
