"""secondorder_optax: second-order (approximate natural-gradient) optimizers for optax.

Each method is an `optax.GradientTransformationExtraArgs`: `soo.scale_by_<method>(...)` gives
the preconditioned direction, `soo.<method>(learning_rate, ...)` the full optimizer. Methods
that need curvature take `curvature=` (from `soo.linen_curvature` / `soo.nnx_curvature`) in
`update`.
"""

from secondorder_optax import losses
from secondorder_optax._src.alias import build_optimizer
from secondorder_optax._src.base import ConvConfig, Curvature, LayerStats
from secondorder_optax._src.capture.linen import linen_curvature
from secondorder_optax._src.describe import describe
from secondorder_optax._src.kl_clip import KLClipState, clip_by_kl
from secondorder_optax._src.engine import PreconditionerState
# -- nnx exports (issue 2, nnx) --
from secondorder_optax._src.capture.nnx import nnx_curvature
# -- kfac exports (issue 3) --
from secondorder_optax._src.kfac import (EigenBases, KroneckerFactors, KroneckerInverses,
                                         ekfac, kfac, scale_by_ekfac, scale_by_kfac,
                                         scale_by_tekfac, scale_by_tkfac, tekfac, tkfac)
# -- tnt/shampoo exports (issue 4) --
from secondorder_optax._src.shampoo import GraftState, scale_by_shampoo, shampoo
from secondorder_optax._src.tnt import scale_by_tnt, tnt
# -- mbf exports (issue 5) --
from secondorder_optax._src.mbf import MBFPartition, MiniBlocks, RowBlocks, mbf, scale_by_mbf
# -- seng exports (issue 6) --
from secondorder_optax._src.seng import (ExplicitFactors, OuterProductFactors, SengLayerState,
                                        SengPlan, scale_by_seng, seng)

__version__ = "0.1.0"

__all__ = [
    "ConvConfig",
    "Curvature",
    "KLClipState",
    "LayerStats",
    "PreconditionerState",
    "build_optimizer",
    "clip_by_kl",
    "describe",
    "linen_curvature",
    "losses",
    # -- nnx names (issue 2, nnx) --
    "nnx_curvature",
    # -- kfac names (issue 3) --
    "EigenBases",
    "KroneckerFactors",
    "KroneckerInverses",
    "ekfac",
    "kfac",
    "scale_by_ekfac",
    "scale_by_kfac",
    "scale_by_tekfac",
    "scale_by_tkfac",
    "tekfac",
    "tkfac",
    # -- tnt/shampoo names (issue 4) --
    "GraftState",
    "scale_by_shampoo",
    "scale_by_tnt",
    "shampoo",
    "tnt",
    # -- mbf names (issue 5) --
    "MBFPartition",
    "MiniBlocks",
    "RowBlocks",
    "mbf",
    "scale_by_mbf",
    # -- seng names (issue 6) --
    "ExplicitFactors",
    "OuterProductFactors",
    "SengLayerState",
    "SengPlan",
    "scale_by_seng",
    "seng",
]
