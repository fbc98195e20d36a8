"""secondorder_optax: second-order (approximate natural-gradient) optimizers for optax."""

from secondorder_optax import losses
from secondorder_optax._src.base import ConvConfig, Curvature, LayerStats
from secondorder_optax._src.capture.linen import linen_curvature

__version__ = "0.1.0"

__all__ = [
    "ConvConfig",
    "Curvature",
    "LayerStats",
    "linen_curvature",
    "losses",
]
