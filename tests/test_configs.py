"""Every config file and variant converts, and its training step traces (catches work that cannot run
under jit, such as a task drawing its fixed coefficients while being traced); the Levenberg-Marquardt
variants have the sizes their docstrings claim."""
import jax
import pytest

from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.data.keys import run_keys
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.mesh import make_mesh
from lsq_jax.models.backbone import SequenceModel, init_params
from lsq_jax.plan.run import make_plan
from lsq_jax.train.step import lm_residuals, measure_grad_stats, train_step

from config_files import load
from steps import initial_state

CASES = [("baseconv", None), ("baseconv", "cpu"), ("baseconv", "smoke"), ("multistep_gd", "smoke"),
         ("multistep_gd", "cpu"), ("linear_attention", "smoke"), ("linear_attention", "softmax,cpu"),
         ("linear_attention", "lm"), ("linear_attention", "lm_general"), ("baseconv", "lm_general"),
         ("transformer_lsq", "smoke"), ("transformer_lsq", "kappa5,baseconv,cpu"), ("transformer_icl", "smoke"),
         ("transformer_icl", "cpu")] + [("primitives", f"{p},smoke") for p in
                                        ("read", "linear", "multiply", "square", "identity", "read,attention")]
PRIMITIVES = ("read", "linear", "multiply", "square", "identity")
LM_CASES = ([("linear_attention", "softmax,lm"), ("linear_attention", "precise"), ("multistep_gd", "lm"),
             ("transformer_lsq", "lm"), ("transformer_lsq", "kappa5,baseconv,lm"), ("transformer_icl", "lm")]
            + [("primitives", f"{p},{mixer}lm") for p in PRIMITIVES for mixer in ("", "attention,", "linear_attention,")])


@pytest.mark.parametrize("name,arg", CASES + LM_CASES)
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


def n_params(exp) -> int:
    return sum(x.size for x in jax.tree.leaves(init_params(exp.model, jax.random.key(0))))


def n_residuals(exp) -> int:
    """The residuals of LM's batch (problems x outputs read per problem), from their shapes."""
    keys = example_keys(run_keys(exp.seed)["lm"], 0, 0, exp.train.batch_size)
    params = jax.eval_shape(lambda: init_params(exp.model, jax.random.key(0)))
    out = jax.eval_shape(lambda p, k: lm_residuals(p, k, model=SequenceModel(exp.model), task=make_task(exp.task),
                                                   n_points=exp.task.n_points, n_dims=None), params, keys)
    return out.size


@pytest.mark.parametrize("name,arg", LM_CASES)
def test_lm_variant_fits_three_to_six_residuals_per_parameter(name, arg):
    exp = experiment_from_config(load(name).get_config(arg))
    assert exp.optim.optimizer == "lm"
    assert 2.9 <= n_residuals(exp) / n_params(exp) <= 6


def test_lm_mixers_on_primitives_have_matched_sizes():
    for p in PRIMITIVES:
        sizes = [n_params(experiment_from_config(load("primitives").get_config(f"{p},{mixer}lm")))
                 for mixer in ("", "attention,", "linear_attention,")]
        assert max(sizes) <= 1.02 * min(sizes), (p, sizes)


@pytest.mark.parametrize("name,arg", [("transformer_lsq", "lm"), ("transformer_icl", "lm"),
                                      ("linear_attention", "softmax,lm"), ("multistep_gd", "lm")])
def test_lm_variant_matches_the_size_of_linear_attention_lm(name, arg):
    reference = n_params(experiment_from_config(load("linear_attention").get_config("lm")))
    assert abs(n_params(experiment_from_config(load(name).get_config(arg))) / reference - 1) <= 0.2


def test_softmax_lm_is_linear_attention_lm_with_softmax():
    linear, softmax = (experiment_from_config(load("linear_attention").get_config(a)) for a in ("lm", "softmax,lm"))
    assert softmax.model.mixer == "attention" and linear.model.mixer == "linear_attention"
    assert (softmax.task, softmax.optim, softmax.train) == (linear.task, linear.optim, linear.train)


def test_the_lm_read_variant_reads_one_position_into_another():
    """Under float64 keys the default task seed draws the pair (7, 7) at L = 8, where read is the identity."""
    task = make_task(experiment_from_config(load("primitives").get_config("read,lm")).task)
    i, j = task.pair
    assert i != j and 0 <= i < j < 8


@pytest.mark.parametrize("name", ["linear_attention", "baseconv"])
def test_general_variants_train_over_every_row_count_kappa_and_scale_of_their_range(name):
    """`:lm_general`: rows D + 1 .. 12 in equal shares, kappa over [1, 100], target scale over [0.1, 10], the
    scales built into the model, and positions for the grid's L_max + 2 rows; linear attention's rows
    interchangeable."""
    exp = experiment_from_config(load(name).get_config("lm_general"))
    task = exp.task
    assert task.rows() == tuple(range(task.n_dims + 1, 13)) and exp.train.batch_size % len(task.rows()) == 0
    assert tuple(task.kappa_range()) == (1.0, 100.0) and tuple(task.scale_range()) == (0.1, 10.0)
    assert exp.model.scale_equivariant and task.train_loss == "relative"
    assert exp.model.n_positions >= make_task(task).seq_len(12 + 2)
    assert exp.model.positions == ("first_and_rest" if name == "linear_attention" else "table")
