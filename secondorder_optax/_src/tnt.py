"""TNT: Tensor Normal Training (Ren & Goldfarb, NeurIPS 2021), DESIGN §5.

Every parameter tensor `W` with modes `(d_1, ..., d_k)` (see `tensor_modes`) gets one factor
per mode. The statistics are running averages of `C_i = contract_all_but_i(G̃, G̃)` of the
minibatch gradient `G̃` at targets sampled from the model (`curvature.fisher_grads`), or of
the ordinary gradient when no `curvature` is given. At each inverse refresh they are
normalised to share one average eigenvalue,

    t = tr C_1,   c = (t / d)^(1/k),   U_i = C_i · c · d_i / t     (so tr(⊗U_i) = t),

and inverted with damping: `P_i = (U_i + εI)⁻¹`, all same-size factors of the model in one
batched Cholesky call. The direction is `∇ ×_1 P_1 ×_2 … ×_k P_k`. Modes larger than
`max_factor_dim` (and scalars) keep only the diagonal of their factor.

TNT only needs parameter shapes, so it works on any pytree, with or without `curvature=`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import alias, linalg, validation
from secondorder_optax._src import tensor_modes as tm
from secondorder_optax._src.base import ScalarOrSchedule
from secondorder_optax._src.damping import relative as relative_damping
from secondorder_optax._src.periods import INVERSE_EVERY, STATS_EVERY, Period

Array = jax.Array


def normalized_factors(statistics: tm.Factors, layout: tm.ModeLayout) -> tm.Factors:
  """`U_i = C_i · c · d_i / t` with `t = tr C_1`, `c = (t/d)^(1/k)`; zeros when `t = 0`."""
  total = tm.factor_trace(statistics[0])
  positive = total > 0
  safe_total = jnp.where(positive, total, 1.0)
  shared = (safe_total / layout.size) ** (1.0 / layout.order)
  return tuple(jnp.where(positive, stat * (shared * dim / safe_total), 0.0).astype(stat.dtype)
               for stat, dim in zip(statistics, layout.modes))


@dataclasses.dataclass(frozen=True)
class TNT(tm.ModeAlgorithm):
  """Tensor Normal Training: per-mode factors normalised to share one average eigenvalue
  `c`, each damped relative to it and inverted: `P_i = (U_i + γ c I)⁻¹`,
  `(1 + γ)^k = 1 + λ`."""

  name = "tnt"

  def refresh(self, layout, statistics, previous, damping, data):
    factors = normalized_factors(statistics, layout)
    blocks = {str(i): (factor, relative_damping(damping, factor, order=layout.order))
              for i, factor in enumerate(factors)}
    return blocks, lambda solved: tuple(solved[str(i)] for i in range(layout.order))

  def solve(self, block):
    factor, damping = block
    damping = damping.astype(factor.dtype)
    if factor.ndim == 1:
      return 1.0 / (factor + damping)
    return linalg.checked_damped_inverse(factor, damping)


def scale_by_tnt(
    *,
    damping: ScalarOrSchedule = 1.0,
    stats_decay: ScalarOrSchedule = 0.9,
    stats_every: Period = STATS_EVERY,
    inverse_every: Period = INVERSE_EVERY,
    max_factor_dim: int = 4096,
    preconditioner_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions every parameter tensor by TNT's per-mode damped inverse factors.

  `update(updates, state, params=None, *, curvature=None, statistics_grads=None)`: the
  factors are estimated from `curvature.fisher_grads` when `curvature` is given, else from
  `statistics_grads` when given (the full optimizer `soo.tnt` passes the raw gradient there,
  as it preconditions the momentum buffer), else from `updates`. The arguments are those
  of `soo.tnt` (all but the first four).

  Returns:
    An `optax.GradientTransformationExtraArgs` returning the preconditioned gradient with
    the gradient's sign.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2), "scale": jnp.ones(())}
    >>> tx = soo.scale_by_tnt(damping=0.1)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2), "scale": jnp.ones(())}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape, int(state.count)
    ((3, 2), 1)
  """
  preconditioner_dtype = validation.check_preconditioner_dtype("tnt", preconditioner_dtype)
  return tm.factor_transformation(
      TNT(preconditioner_dtype), damping=damping, stats_decay=stats_decay,
      stats_every=stats_every, inverse_every=inverse_every, max_factor_dim=max_factor_dim,
      uses_curvature=True)


def tnt(
    learning_rate: ScalarOrSchedule = 0.1,
    *,
    damping: ScalarOrSchedule = 1.0,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    kl_clip: Optional[float] = 0.03,
    stats_decay: ScalarOrSchedule = 0.9,
    stats_every: Period = STATS_EVERY,
    inverse_every: Period = INVERSE_EVERY,
    max_factor_dim: int = 4096,
    preconditioner_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """TNT optimizer: TNT direction, KL clipping, decoupled weight decay, momentum, `-lr`.

  The factors come from `curvature.fisher_grads` (scaled to the per-example Fisher, like
  KFAC's), or from the raw gradient without `curvature`. The defaults are chosen for the
  first (pass `curvature=`): the raw minibatch gradient gives rank-one statistics whose
  inverse does not shrink the step as the gradient shrinks, and that mode needs a larger
  damping (about 10; at 1 a small mixed-pytree regression does not train).

  Unlike the paper's code, the gradient is preconditioned before the momentum average, as
  for every other method here (on the digits MLP at the defaults, preconditioning the
  momentum buffer instead ended at 0.295 after 75 steps, this order at 0.045;
  `docs/defaults.md`).

  Args:
    learning_rate: a number or an optax schedule.
    damping: relative damping λ: the damped product of the normalised factors has `1 + λ`
      times their mean eigenvalue (each factor `U_i + γ c I`, `(1 + γ)^k = 1 + λ`). Default 1
      with `kl_clip` 0.03: ten epochs of the full MNIST autoencoder end at 58.77, ahead of
      KFAC at every epoch and within 2% of Shampoo (61.14 at the former 3 with clip 0.05;
      57.99 at 1 with 0.05, but then the Fashion-MNIST CNN ends above Adam on one seed;
      `docs/defaults.md`).
    momentum: `β` of the debiased EMA of the preconditioned directions, restarted at the
      refreshes of the preconditioner while `inverse_every` grows (`soo.restarting_ema`;
      up to step 96 at the default), then one average; `None` or 0 for none (see
      `soo.kfac` and `docs/defaults.md`).
    weight_decay: decoupled weight decay coefficient.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change exceeds κ
      (`soo.clip_by_kl`). 0.03 at damping 1: the Fashion-MNIST CNN ends its 78 steps at
      0.33 / 0.38 / 0.38 on seeds 0 / 1 / 2 (0.67 / 0.51 / 0.37 at 0.05; Adam 0.54), the
      digits MLP at 0.056 / 0.124 / 0.136 (Adam 0.52 / 0.46); `docs/defaults.md`. With
      the exact model cap `soo.clip_by_kl` now also applies to a classifier's steps (the
      thirteenth round): 0.267 / 0.267 / 0.266 and 0.020 / 0.024 / 0.031.
    stats_decay: EMA weight of the old statistics (the first finite statistic initialises
      them).
    stats_every: update the statistics at steps where `count % stats_every == 0` (an
      integer or a schedule `count -> period`; default `soo.growing_period(5)`).
    inverse_every: recompute the inverses at steps where `count % inverse_every == 0`
      (a failed refresh keeps the previous inverses); default `soo.growing_period(50)`,
      frequent early and every 50 steps later (`docs/defaults.md`).
    max_factor_dim: modes larger than this keep a diagonal factor. Default 4096: the
      Fashion-MNIST CNN's dense layer reads 3136 features, and its diagonal input factor
      at the former 2048 ended the 78 steps at 0.49 / 0.50 against 0.38 / 0.34 with the
      full factor (damping 3, seeds 0 / 1). A `d × d` factor costs `d²` floats and `d³`
      per refresh.
    preconditioner_dtype: dtype in which the inverses are stored and applied (default:
      the statistics' dtype, float32 at least); `jnp.bfloat16` halves their memory and,
      where bfloat16 multiplies faster (accelerators, CPUs with AVX512-BF16), the cost
      of applying them, with float32 sums and a float32 direction.

  Returns:
    An `optax.GradientTransformationExtraArgs`; pass `curvature=` to `update` to use
    sampled-target gradients for the factors.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, secondorder_optax as soo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> y = x @ jnp.array([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]])
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> curv_fn = jax.jit(soo.linen_curvature(model, soo.losses.squared_error))
    >>> tx = soo.tnt()
    >>> state = tx.init(params)
    >>> for i in range(40):
    ...   loss, grads, curvature = curv_fn(params, x, y, jax.random.key(i))
    ...   updates, state = tx.update(grads, state, params, curvature=curvature)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss < 1.0)  # from 4.3
    True
  """
  inner = alias.optimizer(scale_by_tnt, learning_rate=learning_rate, momentum=momentum,
                          weight_decay=weight_decay, kl_clip=kl_clip, damping=damping,
                          stats_decay=stats_decay, stats_every=stats_every,
                          inverse_every=inverse_every, max_factor_dim=max_factor_dim,
                          preconditioner_dtype=preconditioner_dtype)

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    if curvature is None:
      extra_args.setdefault("statistics_grads", updates)
    return inner.update(updates, state, params, curvature=curvature, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)

