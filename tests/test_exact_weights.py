"""The exact explicit-gradient weights in the trained model's own form (lsq_jax.models.gd_weights)."""
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.config.model import ModelConfig
from lsq_jax.config.task import TaskConfig
from lsq_jax.data.samplers import example_keys
from lsq_jax.data.tasks import make_task
from lsq_jax.models.backbone import SequenceModel, init_params
from lsq_jax.models.exact_weights import explicit_gradient_params, explicit_gradient_width

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def published_model() -> ModelConfig:
    """The model of configs/baseconv.py (D = 5, L = 20, E = 64, 3 layers), converted as a run converts it."""
    spec = importlib.util.spec_from_file_location("baseconv", CONFIGS / "baseconv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exp = experiment_from_config(module.get_config("smoke"))
    assert (exp.task.n_dims, exp.task.n_points, exp.model.n_embd, exp.model.n_layer) == (5, 20, 64, 3)
    return exp.model


def model_config(d, n, e, **changes):
    return ModelConfig(in_dims=d + 1, out_dims=d, n_positions=n + 1, n_embd=e).replace(**changes)


def numpy_gradient(a, b, x0):
    """A^T (A x0 - b) / L in numpy, row by row."""
    a, b, x0 = (np.asarray(v) for v in (a, b, x0))
    g = np.zeros_like(x0)
    for i in range(a.shape[1]):
        g += a[:, i] * (np.sum(a[:, i] * x0, axis=-1) - b[:, i])[:, None]
    return g / a.shape[1]


CASES = {
    "d3_l10_e16": (3, 10, lambda: model_config(3, 10, 16)),
    "published_d5_l20_e64": (5, 20, published_model),
    "d3_minimal_width": (3, 10, lambda: model_config(3, 10, explicit_gradient_width(3), n_layer=2)),
    "d4_longer_table_4_layers": (4, 7, lambda: model_config(4, 7, 30, n_layer=4, n_positions=12)),
}


def test_width_is_d_d_plus_5_over_2():
    assert [explicit_gradient_width(d) for d in (1, 2, 3, 5)] == [3, 7, 12, 25]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", CASES)
def test_params_match_init_structure_shapes_dtypes(name, dtype):
    d, n, make_cfg = CASES[name]
    cfg = make_cfg().replace(dtype=dtype)
    params = explicit_gradient_params(cfg, d, n)
    fresh = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))  # shapes, no compute
    assert jax.tree.structure(params) == jax.tree.structure(fresh)
    for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(fresh)):
        assert p.shape == f.shape and p.dtype == f.dtype == np.dtype(dtype)


@pytest.mark.parametrize("scale_cond", [1.0, 10.0])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.slow
def test_output_is_the_least_squares_gradient(name, scale_cond):
    d, n, make_cfg = CASES[name]
    cfg = make_cfg()
    task = make_task(TaskConfig(name="explicit_gradient", n_dims=d, n_points=n, scale_cond=scale_cond))
    batch = task.sample(example_keys(jax.random.key(7), 0, 0, 64))
    apply = jax.jit(SequenceModel(cfg).apply, static_argnames="last_only")
    variables = {"params": explicit_gradient_params(cfg, d, n)}

    # as train.predict does for a task read at the last position only
    pred = apply(variables, batch.inputs, last_only=True)
    expected = numpy_gradient(batch.raw.a, batch.raw.b, batch.raw.x0)
    got = np.asarray(task.read(pred))[:, 0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13 * np.abs(expected).max())
    full = apply(variables, batch.inputs)
    np.testing.assert_allclose(np.asarray(full[:, -1:]), np.asarray(pred), rtol=0,
                               atol=1e-14 * np.abs(expected).max())

    # the training loss (train.example_loss: task.loss on the prediction), relative to the target's size
    loss = float(task.loss(pred, batch.targets))
    mean_square = float(np.mean(np.square(expected)))
    assert loss <= 1e-28 * mean_square
    assert np.mean(np.square(got - expected)) <= 1e-28 * mean_square


def test_other_length_is_not_the_gradient():
    # 1/L and the lag-L tap are built in: L - 1 rows give a different (wrong) number
    cfg = model_config(3, 10, 16)
    task = make_task(TaskConfig(name="explicit_gradient", n_dims=3, n_points=9))
    batch = task.sample(example_keys(jax.random.key(1), 0, 0, 8))
    pred = jax.jit(SequenceModel(cfg).apply)({"params": explicit_gradient_params(cfg, 3, 10)}, batch.inputs)
    assert np.abs(np.asarray(task.read(pred)) - np.asarray(batch.targets)).max() > 1e-3


@pytest.mark.parametrize("field,value,message", [
    ("n_layer", 1, "n_layer=1"), ("conv_type", "long", "conv_type='long'"), ("causal", False, "causal=False"),
    ("use_resid", False, "use_resid=False"), ("use_mlps", True, "use_mlps=True"),
    ("use_seqop_ln", True, "use_seqop_ln=True"), ("use_final_ln", True, "use_final_ln=True"),
    ("train_proj", False, "train_proj=False"), ("train_pos", False, "train_pos=False"),
    ("mixer", "attention", "mixer='attention'"), ("n_embd", 11, "n_embd=11.*>= D\\(D\\+5\\)/2 = 12"),
    ("n_positions", 10, "n_positions=10.*>= n_points \\+ 1 = 11"), ("in_dims", 5, "in_dims=5"),
    ("out_dims", 2, "out_dims=2"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        explicit_gradient_params(model_config(3, 10, 16).replace(**{field: value}), 3, 10)


@pytest.mark.parametrize("n_dims,n_points,message", [(0, 10, "n_dims=0"), (3, 2.5, "n_points=2.5")])
def test_bad_sizes_name_the_argument(n_dims, n_points, message):
    with pytest.raises(ValueError, match=message):
        explicit_gradient_params(model_config(3, 10, 16), n_dims, n_points)
