"""The reference's initialisation, as Flax initialisers.

PyTorch's defaults differ from Flax's: a torch Linear draws weight AND bias from U(-1/sqrt(fan_in),
1/sqrt(fan_in)), and a depthwise Conv1d of kernel K the same with fan_in = K. Those shape training, so the
uniform groups are kept uniform; the GPT-2-style groups are N(0, 0.02^2), the output projections
N(0, (0.02 / sqrt(2 n_layer))^2).
"""
import math

import jax
import jax.numpy as jnp

STD = 0.02


def uniform_fan_in(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for any shape (torch's Linear/Conv1d default, weight and bias)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float64):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal(std: float = STD):
    """N(0, std^2)."""
    return jax.nn.initializers.normal(stddev=std)


def output_projection(n_layer: int):
    """N(0, (0.02 / sqrt(2 n_layer))^2): attention c_proj and MLP c_proj (GPT-2's scaled init)."""
    return normal(STD / math.sqrt(2 * n_layer))


def delta(key, shape, dtype=jnp.float64):
    """A filter of shape (E, L) that is 1 at lag 0 and 0 elsewhere: the long convolution's init."""
    del key
    return jnp.zeros(shape, dtype).at[:, 0].set(1)


def branch_weights(key, shape, dtype=jnp.float64):
    """BaseConv's (main, residual) branch weights, initialised (1, 0)."""
    del key
    return jnp.array([1.0, 0.0], dtype).reshape(shape)
