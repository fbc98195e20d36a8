"""secondorder_optax: second-order (approximate natural-gradient) optimizers for optax.

Each method is an `optax.GradientTransformationExtraArgs`: `soo.scale_by_<method>(...)` gives
the preconditioned direction, `soo.<method>(learning_rate, ...)` the full optimizer. Methods
that need curvature take `curvature=` (from `soo.linen_curvature` / `soo.nnx_curvature`) in
`update`. Every method runs on one refresh engine; its state is a `soo.PreconditionerState`.
"""

from secondorder_optax import losses
from secondorder_optax._src.alias import build_optimizer
from secondorder_optax._src.base import ConvConfig, Curvature, LayerStats
from secondorder_optax._src.capture.linen import linen_curvature
from secondorder_optax._src.capture.nnx import nnx_curvature
from secondorder_optax._src.describe import describe
from secondorder_optax._src.engine import PreconditionerState
from secondorder_optax._src.kfac import (ekfac, kfac, scale_by_ekfac, scale_by_kfac,
                                         scale_by_tekfac, scale_by_tkfac, tekfac, tkfac)
from secondorder_optax._src.kbfgs import (KbfgsPreconditioner, KbfgsState, KbfgsStatistics,
                                          SecantPair, kbfgs, scale_by_kbfgs)
from secondorder_optax._src.kl_clip import KLClipState, clip_by_kl
from secondorder_optax._src.kronecker import EigenBases, KroneckerFactors, KroneckerInverses
from secondorder_optax._src.mbf import mbf, scale_by_mbf
from secondorder_optax._src.mini_blocks import MBFPartition, MiniBlocks, RowBlocks
from secondorder_optax._src.momentum import RestartingEmaState, restarting_ema
from secondorder_optax._src.periods import GrowingPeriod, growing_period
from secondorder_optax._src.seng import scale_by_seng, seng
from secondorder_optax._src.seng_factors import (ExplicitFactors, OuterProductFactors,
                                                SengLayerState, SengPlan)
from secondorder_optax._src.soap import SoapPreconditioner, scale_by_soap, soap
from secondorder_optax._src.shampoo import GraftState, scale_by_shampoo, shampoo
from secondorder_optax._src.state_sharding import state_sharding_path, state_shardings
from secondorder_optax._src.tnt import scale_by_tnt, tnt

__version__ = "0.2.0"

__all__ = [
    "ConvConfig",
    "Curvature",
    "EigenBases",
    "ExplicitFactors",
    "GraftState",
    "GrowingPeriod",
    "KLClipState",
    "KbfgsPreconditioner",
    "KbfgsState",
    "KbfgsStatistics",
    "KroneckerFactors",
    "KroneckerInverses",
    "LayerStats",
    "MBFPartition",
    "MiniBlocks",
    "OuterProductFactors",
    "PreconditionerState",
    "RestartingEmaState",
    "RowBlocks",
    "SecantPair",
    "SengLayerState",
    "SengPlan",
    "SoapPreconditioner",
    "build_optimizer",
    "clip_by_kl",
    "describe",
    "ekfac",
    "growing_period",
    "kbfgs",
    "kfac",
    "linen_curvature",
    "losses",
    "mbf",
    "nnx_curvature",
    "restarting_ema",
    "scale_by_ekfac",
    "scale_by_kbfgs",
    "scale_by_kfac",
    "scale_by_mbf",
    "scale_by_seng",
    "scale_by_shampoo",
    "scale_by_soap",
    "scale_by_tekfac",
    "scale_by_tkfac",
    "scale_by_tnt",
    "seng",
    "shampoo",
    "soap",
    "state_sharding_path",
    "state_shardings",
    "tekfac",
    "tkfac",
    "tnt",
]
