"""A scale-equivariant model (model.scale_equivariant): explicit_gradient's normalisation against the gradient
computed in numpy, a model's exact equivariance under both of the problem's scales, the one-line refusal
for other tasks, and a run's report whose scale cells all have the in-distribution error."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.config.check import ConfigError
from lsq_jax.config.experiment import experiment_from_config
from lsq_jax.config.model import ModelConfig
from lsq_jax.data.lsq import explicit_gradient_inputs, explicit_gradient_normalization
from lsq_jax.models.backbone import SequenceModel, init_params

from config_files import SMALL_REPORT_FLAGS, get_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _problems(seed=0, n=5, rows=7, dims=3):
    """Problems at very different scales of A and of x: (a, b, x0), b = A x*."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, rows, dims)) * np.logspace(-2, 2, n)[:, None, None]
    x_star = rng.normal(size=(n, dims)) * np.logspace(1, -1, n)[:, None]
    x0 = rng.normal(size=(n, dims)) * np.logspace(1, -1, n)[::-1, None]
    return a, np.einsum("nld,nd->nl", a, x_star), x0


def _gradient(a, b, x):
    return np.einsum("nld,nl->nd", a, np.einsum("nld,nd->nl", a, x) - b) / a.shape[1]


def test_the_normalised_problem_times_its_factor_has_the_original_gradient():
    """A at Frobenius norm sqrt(D) (its rows divided by s sqrt(L), s = rms(A)), beta^2 the mean of x0's and
    b / s's mean squares, and s^2 beta times the normalised problem's A^T (A x0 - b), a sum with no 1/L
    (numpy), equal to the original gradient (numpy) to round-off."""
    a, b, x0 = _problems()
    n_rows, n_dims = a.shape[1:]
    tokens, factor = explicit_gradient_normalization(explicit_gradient_inputs(*map(jnp.asarray, (a, b, x0))))
    tokens, factor = np.asarray(tokens), np.asarray(factor)
    a_hat, b_hat, x_hat = tokens[:, 1:, :-1], tokens[:, 1:, -1], tokens[:, 0, :-1]
    np.testing.assert_array_equal(tokens[:, 0, -1], 0)
    np.testing.assert_allclose(np.sum(a_hat ** 2, axis=(1, 2)), n_dims, rtol=1e-14)
    s = np.sqrt(np.mean(a ** 2, axis=(1, 2)))
    beta = np.sqrt((np.mean(x0 ** 2, axis=1) + np.mean((b / s[:, None]) ** 2, axis=1)) / 2)
    np.testing.assert_allclose(factor[:, 0, 0], s ** 2 * beta, rtol=1e-14)
    mean_squares = np.mean(x_hat ** 2, axis=1) + n_rows * np.mean(b_hat ** 2, axis=1)
    np.testing.assert_allclose(mean_squares, 2, rtol=1e-14)
    g = _gradient(a, b, x0)
    np.testing.assert_allclose(factor[:, 0] * n_rows * _gradient(a_hat, b_hat, x_hat), g, rtol=1e-13)


def test_the_normalised_rows_do_not_depend_on_their_number():
    """The same rows repeated k times (L -> kL, the same gradient): x0's token and the factor are unchanged and
    every normalised row is the original's over sqrt(k), so the per-row terms of the normalised sum shrink as
    1/k and their sum is unchanged."""
    a, b, x0 = _problems(n=3)
    k = 3
    once, factor = map(np.asarray, explicit_gradient_normalization(
        explicit_gradient_inputs(*map(jnp.asarray, (a, b, x0)))))
    tiled, tiled_factor = map(np.asarray, explicit_gradient_normalization(
        explicit_gradient_inputs(*map(jnp.asarray, (np.tile(a, (1, k, 1)), np.tile(b, (1, k)), x0)))))
    np.testing.assert_allclose(tiled_factor, factor, rtol=1e-14)
    np.testing.assert_allclose(tiled[:, 0], once[:, 0], rtol=1e-14)
    np.testing.assert_allclose(tiled[:, 1:], np.tile(once[:, 1:], (1, k, 1)) / np.sqrt(k), rtol=1e-14)


def test_a_zero_problem_keeps_unit_scales():
    """x0 = b = 0 (then g = 0): beta is taken as 1, nothing is divided by 0."""
    a, _, _ = _problems(n=2)
    tokens = explicit_gradient_inputs(jnp.asarray(a), jnp.zeros(a.shape[:2]), jnp.zeros((2, a.shape[2])))
    normalised, factor = explicit_gradient_normalization(tokens)
    assert np.all(np.isfinite(np.asarray(normalised)))
    np.testing.assert_allclose(np.asarray(factor)[:, 0, 0], np.mean(a ** 2, axis=(1, 2)), rtol=1e-14)


@pytest.mark.parametrize("mixer", ["linear_attention", "baseconv"])
def test_the_model_is_equivariant_under_both_scales(mixer):
    """f(alpha A, alpha beta b, beta x0) = alpha^2 beta f(A, b, x0) for a randomly initialised model with the
    normalisation, to round-off; the same model without it is not (its output is a polynomial of high
    degree in the tokens)."""
    a, b, x0 = _problems(n=3, rows=6, dims=3)
    cfg = ModelConfig(in_dims=4, out_dims=3, n_positions=7, n_embd=8, n_head=2, mixer=mixer, causal=False)
    params = init_params(cfg, jax.random.key(1))

    def predict(normalize, alpha, beta):
        tokens = explicit_gradient_inputs(*map(jnp.asarray, (alpha * a, alpha * beta * b, beta * x0)))
        return np.asarray(SequenceModel(cfg, normalize).apply({"params": params}, tokens))[:, -1]

    for alpha, beta in [(10.0, 1.0), (1.0, 0.01), (0.3, 70.0)]:
        np.testing.assert_allclose(predict(explicit_gradient_normalization, alpha, beta),
                                   alpha ** 2 * beta * predict(explicit_gradient_normalization, 1.0, 1.0), rtol=1e-11)
        plain = predict(None, alpha, beta)
        assert not np.allclose(plain, alpha ** 2 * beta * predict(None, 1.0, 1.0), rtol=1e-3)


def test_it_is_refused_for_a_target_without_the_normalisation():
    for name, arg, override in [("baseconv", "smoke", {"task.setting": "all"}),
                                ("transformer_lsq", "smoke", {})]:
        config = get_config(name, arg)
        config.model.scale_equivariant = True
        for key, value in override.items():
            section, field = key.split(".")
            config[section][field] = value
        with pytest.raises(ConfigError, match="^model.scale_equivariant: got True; allowed False unless "
                                              "task.name='explicit_gradient' with setting='last'"):
            experiment_from_config(config)


@pytest.mark.slow
def test_a_runs_scale_cells_have_the_in_distribution_error(tmp_path):
    """Trained at target scale 1 only, a scale-equivariant model's one-step error is the same in every cell
    of the grid's scale axis (the same problems, rescaled) as in distribution: gaps of 1 to round-off."""
    from lsq_jax import main

    out = []
    status = main.run(["lsq_jax.main", f"--config={REPO / 'configs' / 'linear_attention.py'}:smoke",
                       f"--workdir={tmp_path}", "--config.train.num_steps=4", "--config.model.scale_equivariant=True",
                       "--config.optim.schedule=step", "--config.train.grad_stats_batches=0", *SMALL_REPORT_FLAGS],
                      log=out.append)
    assert status == 0, out[-20:]
    cells = json.loads((tmp_path / "eval" / "report.json").read_text())["ood"]["cells"]
    scale_cells = [c for c in cells if c["axis"] == "scale"]
    assert {c["scale_target"] for c in scale_cells} == {0.01, 0.1, 10.0, 100.0}
    for cell in scale_cells:
        np.testing.assert_allclose(cell["methods"]["learned"]["step_error_gap"], 1.0, rtol=1e-6)
    in_distribution = next(c for c in cells if c["axis"] == "in_distribution")["methods"]["learned"]
    assert in_distribution["step_error"]["median"] > 1e-6  # a model still far from exact: the gaps say something
