"""Loss families with a sampler for their predictive distribution (DESIGN §3).

Example:
  >>> import jax, jax.numpy as jnp, secondorder_optax as soo
  >>> outputs = jnp.zeros((2, 4))
  >>> soo.losses.squared_error.per_example_loss(outputs, jnp.ones((2, 4)))
  Array([2., 2.], dtype=float32)
"""

from secondorder_optax._src.losses import (
    LossFamily,
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
    squared_error,
)

__all__ = [
    "LossFamily",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
]
