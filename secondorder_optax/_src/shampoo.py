"""Shampoo (Gupta, Koren & Singer, ICML 2018), DESIGN §5.

Every parameter tensor with modes `(d_1, ..., d_k)` (see `tensor_modes`) gets one statistic
per mode, `H_i = contract_all_but_i(G, G)` of the gradient, either summed over steps (the
original, AdaGrad-like Shampoo; `stats_decay=None`) or running-averaged. At each inverse
refresh every factor's root `R_i = (H_i + εI)^(-1/(2k))` is computed by `eigh` (all
same-size factors of the model in one batched call) and the direction is
`∇ ×_1 R_1 ×_2 … ×_k R_k`. Modes larger than `max_factor_dim` (and scalars) keep only the
diagonal of their statistic.

With `graft="rmsprop"` or `graft="adam"` each tensor's direction is rescaled to the norm of
that optimizer's step for the same tensor (layer-wise grafting), so that Shampoo supplies
the direction and the well-tuned first-order method the step size.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import alias, layerwise, linalg
from secondorder_optax._src import tensor_modes as tm
from secondorder_optax._src.base import (ScalarOrSchedule, all_finite, hyperparameter_value,
                                         is_due, refresh, refresh_statistics, running_average,
                                         select_tree)

Array = jax.Array
_GRAFTS = ("rmsprop", "adam")


class ShampooState(NamedTuple):
  """State of `scale_by_shampoo`.

  Attributes:
    count: number of steps taken (with finite gradients).
    statistics: per leaf key (`"Dense_0/kernel"`), the statistics `H_i` per mode
      (`(d_i, d_i)`, or `(d_i,)` for a diagonal mode), summed or running-averaged.
    roots: per leaf key, the inverse roots `(H_i + εI)^(-1/(2k))` per mode.
    graft: state of the grafting transformation over the leaves keyed by leaf key
      (`optax.EmptyState()` without grafting).
    failures: how many eigendecompositions gave non-finite results (each kept the previous
      root).
  """

  count: Array
  statistics: Dict[str, tm.Factors]
  roots: Dict[str, tm.Factors]
  graft: Any
  failures: Array


def _inverse_root(damping: Array):
  def root(item) -> Array:
    factor, exponent = item
    if factor.ndim == 1:
      return (jnp.maximum(factor, 0.0) + damping.astype(factor.dtype)) ** (-1.0 / exponent)
    return linalg.inverse_root(factor, exponent, damping)
  return root


def _graft_transformation(graft: Optional[str], decay: float, eps: float,
                          momentum: float) -> optax.GradientTransformation:
  if graft is None:
    return optax.identity()
  if graft == "rmsprop":
    return optax.scale_by_rms(decay=decay, eps=eps, eps_in_sqrt=False, bias_correction=True)
  if graft == "adam":
    return optax.scale_by_adam(b1=momentum, b2=decay, eps=eps)
  raise ValueError(f"shampoo: graft must be None or one of {_GRAFTS}, got {graft!r}")


def _graft_norm(direction: Array, graft_step: Array) -> Array:
  """`direction` rescaled to the norm of `graft_step` (zero where the direction is zero)."""
  norm = jnp.linalg.norm(direction)
  scale = jnp.where(norm > 0, jnp.linalg.norm(graft_step) / jnp.where(norm > 0, norm, 1.0),
                    0.0)
  return direction * scale


class _Settings(NamedTuple):
  """The step's hyperparameters as arrays (they may be traced by `inject_hyperparams`)."""

  damping: Array
  stats_decay: Array
  stats_every: Array
  inverse_every: Array
  graft_decay: Array
  graft_eps: Array
  graft_momentum: Array


@functools.partial(jax.jit, static_argnames=("layouts", "graft", "summed"))
def _shampoo_step(updates: Dict[str, Array], state: ShampooState, settings: _Settings, *,
                  layouts: Tuple[Tuple[str, tm.ModeLayout], ...], graft: Optional[str],
                  summed: bool):
  """One Shampoo step on leaves keyed by leaf key; compiled once per model layout, so
  eager (un-jitted) use is fast too."""
  layouts = dict(layouts)
  count = state.count
  # A step with non-finite gradients leaves the state as it is (no whole-state select).
  active = all_finite(updates)
  grads = {key: tm.to_modes(leaf.astype(state.statistics[key][0].dtype), layouts[key])
           for key, leaf in updates.items()}

  def new_statistics():
    batch = {key: tm.mode_statistics(grads[key], layout) for key, layout in layouts.items()}
    if summed:
      return jax.tree.map(jnp.add, state.statistics, batch)
    return running_average(state.statistics, batch, settings.stats_decay, count == 0)

  statistics = refresh_statistics(is_due(count, settings.stats_every) & active,
                                  new_statistics, state.statistics)

  def new_roots():
    items = {key: tuple((stat, jnp.asarray(2.0 * layout.order, stat.dtype))
                        for stat in statistics[key]) for key, layout in layouts.items()}
    return tm.map_factors(_inverse_root(settings.damping), items, state.roots)

  roots, failures = refresh(is_due(count, settings.inverse_every) & active, new_roots,
                            (state.roots, jnp.zeros((), jnp.int32)))
  directions = {key: tm.apply_factors(grads[key], roots[key]) for key in layouts}
  grafting = _graft_transformation(graft, settings.graft_decay, settings.graft_eps,
                                   settings.graft_momentum)
  graft_steps, graft_state = grafting.update(updates, state.graft)
  if graft is not None:
    directions = {key: _graft_norm(directions[key], graft_steps[key].astype(directions[key].dtype))
                  for key in layouts}
  out = {key: tm.from_modes(directions[key], layout).astype(updates[key].dtype)
         for key, layout in layouts.items()}
  new_state = ShampooState(count=count + active.astype(count.dtype), statistics=statistics,
                           roots=roots, graft=select_tree(active, graft_state, state.graft),
                           failures=state.failures + failures)
  return out, new_state


def scale_by_shampoo(
    *,
    damping: ScalarOrSchedule = 1e-4,
    stats_decay: Optional[ScalarOrSchedule] = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    max_factor_dim: int = 2048,
    preconditioner_dtype: Any = None,
    graft: Optional[str] = None,
    graft_decay: float = 0.999,
    graft_eps: float = 1e-8,
    graft_momentum: float = 0.9,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions every parameter tensor by Shampoo's per-mode inverse roots.

  Works on any pytree from the gradients alone; a `curvature=` argument is accepted and
  ignored (Shampoo's statistics are those of the ordinary gradient).

  Args:
    damping: `ε` added to every statistic before its root (number or schedule).
    stats_decay: EMA weight of the old statistics (the first update takes the batch
      statistic itself); `None` sums the statistics over steps as in the original paper.
    stats_every: update the statistics at steps where `count % stats_every == 0`.
    inverse_every: recompute the roots at steps where `count % inverse_every == 0`.
    max_factor_dim: modes larger than this keep a diagonal statistic.
    preconditioner_dtype: dtype in which the roots are stored and applied (default: the
      statistics' dtype, float32 at least); `jnp.bfloat16` halves their memory and, where
      bfloat16 multiplies faster (accelerators, CPUs with AVX512-BF16), the cost of
      applying them, with float32 sums and a float32 direction.
    graft: `None`, `"rmsprop"` or `"adam"`: rescale each tensor's direction to the norm of
      that method's step (bias-corrected, `eps` outside the square root).
    graft_decay: second-moment decay of the grafted method.
    graft_eps: its `eps`.
    graft_momentum: first-moment decay of the grafted Adam.

  Returns:
    An `optax.GradientTransformationExtraArgs` returning the preconditioned gradient with
    the gradient's sign.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> params = {"w": jnp.ones((3, 2)), "scale": jnp.ones(())}
    >>> tx = soo.scale_by_shampoo(damping=1e-4, graft="rmsprop")
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((3, 2), 0.5), "scale": jnp.ones(())}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape, int(state.count)
    ((3, 2), 1)
  """
  tm.check_periods(stats_every=stats_every, inverse_every=inverse_every)
  preconditioner_dtype = linalg.check_preconditioner_dtype("shampoo", preconditioner_dtype)
  grafting = _graft_transformation(graft, graft_decay, graft_eps, graft_momentum)

  def init_fn(params):
    layouts, statistics, roots = tm.initial_factors(params, max_factor_dim,
                                                    preconditioner_dtype)
    return ShampooState(count=jnp.zeros((), jnp.int32), statistics=statistics, roots=roots,
                        graft=grafting.init(dict(zip(layouts, jax.tree.leaves(params)))),
                        failures=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    keys = tm.leaf_keys(updates)
    leaves, treedef = jax.tree.flatten(updates)
    layouts = tm.state_layouts("shampoo", keys, leaves, state.statistics)
    settings = _Settings(
        damping=hyperparameter_value(damping, state.count),
        stats_decay=hyperparameter_value(0.0 if stats_decay is None else stats_decay,
                                         state.count),
        stats_every=jnp.asarray(stats_every, jnp.int32),
        inverse_every=jnp.asarray(inverse_every, jnp.int32),
        graft_decay=jnp.asarray(graft_decay, jnp.float32),
        graft_eps=jnp.asarray(graft_eps, jnp.float32),
        graft_momentum=jnp.asarray(graft_momentum, jnp.float32))
    directions, new_state = _shampoo_step(
        dict(zip(keys, leaves)), state, settings, layouts=tuple(layouts.items()),
        graft=graft, summed=stats_decay is None)
    return jax.tree.unflatten(treedef, [directions[key] for key in keys]), new_state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def describe(params):
    rules = tm.describe_leaves("shampoo", params, max_factor_dim)
    if graft is not None:
      rules = {path: f"{rule}, grafted to {graft}" for path, rule in rules.items()}
    return rules

  layerwise.register_description(tx, describe)
  return tx


def shampoo(
    learning_rate: ScalarOrSchedule,
    *,
    damping: ScalarOrSchedule = 1e-4,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    kl_clip: Optional[float] = None,
    stats_decay: Optional[ScalarOrSchedule] = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    max_factor_dim: int = 2048,
    preconditioner_dtype: Any = None,
    graft: Optional[str] = None,
    graft_decay: float = 0.999,
    graft_eps: float = 1e-8,
    graft_momentum: float = 0.9,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo optimizer: Shampoo direction, decoupled weight decay, momentum, `-lr`.

  Args:
    learning_rate: a number or an optax schedule.
    damping: `ε` added to every statistic before its root.
    momentum: heavy-ball momentum (`optax.trace`) on the preconditioned direction.
    weight_decay: decoupled weight decay coefficient.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change exceeds κ
      (`soo.clip_by_kl`).
    stats_decay: EMA weight of the old statistics; `None` sums them.
    stats_every: statistics refresh period (steps).
    inverse_every: root refresh period (steps).
    max_factor_dim: modes larger than this keep a diagonal statistic.
    preconditioner_dtype: as in `soo.scale_by_shampoo`.
    graft: `None`, `"rmsprop"` or `"adam"` (per-tensor step-norm grafting).
    graft_decay: second-moment decay of the grafted method.
    graft_eps: its `eps`.
    graft_momentum: first-moment decay of the grafted Adam.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a `curvature=` argument is ignored).

  Example:
    >>> import jax, jax.numpy as jnp, optax, secondorder_optax as soo
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> loss = lambda p: jnp.sum((jnp.ones(3) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = soo.shampoo(learning_rate=0.05, damping=1e-3)
    >>> state = tx.init(params)
    >>> for _ in range(50):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 0.1)
    True
  """
  preconditioner = scale_by_shampoo(
      damping=damping, stats_decay=stats_decay, stats_every=stats_every,
      inverse_every=inverse_every, max_factor_dim=max_factor_dim,
      preconditioner_dtype=preconditioner_dtype, graft=graft,
      graft_decay=graft_decay, graft_eps=graft_eps, graft_momentum=graft_momentum)
  return alias.build_optimizer(preconditioner, learning_rate=learning_rate, momentum=momentum,
                               weight_decay=weight_decay, kl_clip=kl_clip)
