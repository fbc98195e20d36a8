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

import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import alias, layerwise, linalg
from secondorder_optax._src import tensor_modes as tm
from secondorder_optax._src.base import (Curvature, ScalarOrSchedule, all_finite,
                                         hyperparameter_value, is_due, refresh,
                                         refresh_statistics, running_average)

Array = jax.Array


class TNTState(NamedTuple):
  """State of `scale_by_tnt`.

  Attributes:
    count: number of steps taken (with finite gradients).
    statistics: per leaf key (`"Dense_0/kernel"`), the running averages `C_i` per mode
      (`(d_i, d_i)`, or `(d_i,)` for a diagonal mode).
    inverses: per leaf key, the damped inverses `P_i = (U_i + εI)⁻¹` per mode.
    failures: how many factor inversions gave non-finite results (each kept the previous
      inverse).
  """

  count: Array
  statistics: Dict[str, tm.Factors]
  inverses: Dict[str, tm.Factors]
  failures: Array


def normalized_factors(statistics: tm.Factors, layout: tm.ModeLayout) -> tm.Factors:
  """`U_i = C_i · c · d_i / t` with `t = tr C_1`, `c = (t/d)^(1/k)`; zeros when `t = 0`."""
  total = tm.factor_trace(statistics[0])
  positive = total > 0
  safe_total = jnp.where(positive, total, 1.0)
  shared = (safe_total / layout.size) ** (1.0 / layout.order)
  return tuple(jnp.where(positive, stat * (shared * dim / safe_total), 0.0).astype(stat.dtype)
               for stat, dim in zip(statistics, layout.modes))


def _damped_inverse(damping: Array):
  def invert(factor: Array) -> Array:
    if factor.ndim == 1:
      return 1.0 / (factor + damping.astype(factor.dtype))
    return linalg.damped_inverse(factor, damping)
  return invert


def _statistics_source(updates: Any, curvature: Optional[Curvature],
                       statistics_grads: Optional[Any]) -> Any:
  """The gradients the factors are estimated from, with clear errors for bad input."""
  if curvature is None:
    source, what = (updates, None) if statistics_grads is None else (
        statistics_grads, "statistics_grads")
  elif isinstance(curvature, Curvature):
    if _defer_reading(curvature):
      # Checked on shapes only; the extra backward pass runs inside the statistics refresh.
      shapes = jax.eval_shape(lambda c: c.fisher_grads, curvature)
      _check_structure(shapes, updates, "curvature.fisher_grads")
      return curvature
    source, what = curvature.fisher_grads, "curvature.fisher_grads"
  else:
    raise ValueError(f"tnt: curvature= must be a soo.Curvature (or None), got "
                     f"{type(curvature).__name__}")
  if what is not None:
    _check_structure(source, updates, what)
  return source


def _check_structure(source: Any, updates: Any, what: str) -> None:
  """Same leaves (count and shapes, in order) as the updates. Containers may differ: an
  `nnx.State` of `nnx.Param`s and the plain `nnx.State` that `nnx.Optimizer` passes hold the
  same leaves."""
  source_shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(source)]
  update_shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(updates)]
  if source_shapes != update_shapes:
    raise ValueError(
        f"tnt: {what} must have the leaves of the updates; got leaf shapes {source_shapes} "
        f"for updates {update_shapes} ({jax.tree.structure(source)} vs "
        f"{jax.tree.structure(updates)})")


def _defer_reading(curvature: Curvature) -> bool:
  """Read a deferred curvature inside the jitted step only when already tracing (eager
  calls materialize it now, so the step's compile cache is not keyed on a fresh VJP)."""
  return curvature.is_deferred and any(
      isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(curvature.finite_check_leaves()))


def _source_leaves(sources: Any, keys) -> Dict[str, Array]:
  """Leaves keyed like the updates, from a dict of leaves or a deferred `Curvature`."""
  if isinstance(sources, Curvature):
    return dict(zip(keys, jax.tree.leaves(sources.fisher_grads)))
  return sources


class _Settings(NamedTuple):
  """The step's hyperparameters as arrays (they may be traced by `inject_hyperparams`)."""

  damping: Array
  stats_decay: Array
  stats_every: Array
  inverse_every: Array


@functools.partial(jax.jit, static_argnames=("layouts",))
def _tnt_step(updates: Dict[str, Array], sources: Any, state: TNTState,
              settings: _Settings, *, layouts: Tuple[Tuple[str, tm.ModeLayout], ...]):
  """One TNT step on leaves keyed by leaf key; compiled once per model layout, so eager
  (un-jitted) use is fast too."""
  layouts = dict(layouts)
  count = state.count
  # A step with non-finite gradients leaves the state as it is; statistics from a
  # non-finite curvature are dropped inside the refresh (no whole-state select).
  active = all_finite(updates)

  def new_statistics():
    batch = {}
    for key, grad in _source_leaves(sources, tuple(layouts)).items():
      dtype = state.statistics[key][0].dtype
      batch[key] = tm.mode_statistics(tm.to_modes(grad.astype(dtype), layouts[key]),
                                      layouts[key])
    return running_average(state.statistics, batch, settings.stats_decay, count == 0)

  statistics = refresh_statistics(is_due(count, settings.stats_every) & active,
                                  new_statistics, state.statistics)

  def new_inverses():
    factors = {key: normalized_factors(statistics[key], layout)
               for key, layout in layouts.items()}
    return tm.map_factors(_damped_inverse(settings.damping), factors, state.inverses)

  inverses, failures = refresh(is_due(count, settings.inverse_every) & active, new_inverses,
                               (state.inverses, jnp.zeros((), jnp.int32)))
  directions = {}
  for key, update in updates.items():
    tensor = tm.to_modes(update.astype(state.statistics[key][0].dtype), layouts[key])
    directions[key] = tm.from_modes(tm.apply_factors(tensor, inverses[key]),
                                    layouts[key]).astype(update.dtype)
  new_state = TNTState(count=count + active.astype(count.dtype), statistics=statistics,
                       inverses=inverses, failures=state.failures + failures)
  return directions, new_state


def scale_by_tnt(
    *,
    damping: ScalarOrSchedule = 0.1,
    stats_decay: ScalarOrSchedule = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    max_factor_dim: int = 2048,
    preconditioner_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions every parameter tensor by TNT's per-mode damped inverse factors.

  `update(updates, state, params=None, *, curvature=None, statistics_grads=None)`: the
  factors are estimated from `curvature.fisher_grads` when `curvature` is given, else from
  `statistics_grads` when given (the full optimizer `soo.tnt` passes the raw gradient there,
  as it preconditions the momentum buffer), else from `updates`.

  Args:
    damping: `ε` added to every normalised factor (number or schedule of the step).
    stats_decay: EMA weight of the old statistics (the first update takes the batch
      statistic itself).
    stats_every: update the statistics at steps where `count % stats_every == 0`.
    inverse_every: recompute the inverses at steps where `count % inverse_every == 0`.
    max_factor_dim: modes larger than this keep a diagonal factor.
    preconditioner_dtype: dtype in which the inverses are stored and applied (default:
      the statistics' dtype, float32 at least); `jnp.bfloat16` halves their memory and,
      where bfloat16 multiplies faster (accelerators, CPUs with AVX512-BF16), the cost
      of applying them, with float32 sums and a float32 direction.

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
  tm.check_periods(stats_every=stats_every, inverse_every=inverse_every)
  preconditioner_dtype = linalg.check_preconditioner_dtype("tnt", preconditioner_dtype)

  def init_fn(params):
    _, statistics, inverses = tm.initial_factors(params, max_factor_dim, preconditioner_dtype)
    return TNTState(count=jnp.zeros((), jnp.int32), statistics=statistics, inverses=inverses,
                    failures=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, curvature=None, statistics_grads=None,
                **extra_args):
    del params, extra_args
    source = _statistics_source(updates, curvature, statistics_grads)
    keys = tm.leaf_keys(updates)
    leaves, treedef = jax.tree.flatten(updates)
    layouts = tm.state_layouts("tnt", keys, leaves, state.statistics)
    settings = _Settings(
        damping=hyperparameter_value(damping, state.count),
        stats_decay=hyperparameter_value(stats_decay, state.count),
        stats_every=jnp.asarray(stats_every, jnp.int32),
        inverse_every=jnp.asarray(inverse_every, jnp.int32))
    if not isinstance(source, Curvature):
      source = dict(zip(keys, jax.tree.leaves(source)))
    directions, new_state = _tnt_step(dict(zip(keys, leaves)), source, state,
                                      settings, layouts=tuple(layouts.items()))
    return jax.tree.unflatten(treedef, [directions[key] for key in keys]), new_state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def describe(params):
    return tm.describe_leaves("tnt", params, max_factor_dim)

  layerwise.register_description(tx, describe)
  return tx


def tnt(
    learning_rate: ScalarOrSchedule,
    *,
    damping: ScalarOrSchedule = 0.1,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    kl_clip: Optional[float] = None,
    stats_decay: ScalarOrSchedule = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    max_factor_dim: int = 2048,
    preconditioner_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """TNT optimizer: momentum, TNT preconditioning of the momentum, weight decay, `-lr`.

  Following the paper's code, the momentum buffer is preconditioned (the factors still
  come from `curvature.fisher_grads`, or from the raw gradient without `curvature`) and
  the weight decay is decoupled. The paper's hyperparameters (ε = 0.1, learning rate 1e-4
  at batch 1000 on the MNIST autoencoder, decay 0.9) carry over.

  Args:
    learning_rate: a number or an optax schedule.
    damping: `ε` added to every normalised factor.
    momentum: heavy-ball momentum (`optax.trace`); `None` or 0 for none.
    weight_decay: decoupled weight decay coefficient.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change exceeds κ
      (`soo.clip_by_kl`).
    stats_decay: EMA weight of the old statistics.
    stats_every: statistics refresh period (steps).
    inverse_every: inverse refresh period (steps).
    max_factor_dim: modes larger than this keep a diagonal factor.
    preconditioner_dtype: as in `soo.scale_by_tnt`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; pass `curvature=` to `update` to use
    sampled-target gradients for the factors.

  Example:
    >>> import jax, jax.numpy as jnp, optax, secondorder_optax as soo
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> loss = lambda p: jnp.sum((jnp.ones(3) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = soo.tnt(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> for _ in range(20):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 0.1)
    True
  """
  preconditioner = scale_by_tnt(damping=damping, stats_decay=stats_decay,
                                stats_every=stats_every, inverse_every=inverse_every,
                                max_factor_dim=max_factor_dim,
                                preconditioner_dtype=preconditioner_dtype)
  inner = alias.build_optimizer(preconditioner, learning_rate=learning_rate,
                                momentum=momentum, weight_decay=weight_decay,
                                kl_clip=kl_clip,
                                precondition_momentum=True)

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    if curvature is None:
      extra_args.setdefault("statistics_grads", updates)
    return inner.update(updates, state, params, curvature=curvature, **extra_args)

  tx = optax.GradientTransformationExtraArgs(inner.init, update_fn)
  layerwise.register_description(tx, layerwise.description_of(preconditioner))
  return tx

