"""Loss families with a sampler for their predictive distribution (DESIGN §3)."""

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
