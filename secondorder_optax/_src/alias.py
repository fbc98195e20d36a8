"""Full optimizers: a preconditioner chained with weight decay, momentum and the learning rate.

`soo.<method>(learning_rate, ...)` is `build_optimizer(soo.scale_by_<method>(...), ...)`:

    preconditioner -> + weight_decay * params -> momentum (an average) -> -learning_rate

or, with `precondition_momentum=True` (TNT, following the paper's code), momentum first and
the preconditioner applied to the momentum buffer. Weight decay is decoupled (added after
preconditioning), as in the TNT/MBF papers' code. The momentum of a full optimizer (but
Shampoo's) restarts at the preconditioner's refreshes (its `inverse_every`) while that
period grows (at every refresh for an integer period: SENG's, K-BFGS(L)'s), so that it does
not average the directions of the fast-changing first preconditioners; then it is one
debiased average (`soo.restarting_ema`, `periods.while_growing`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import layerwise, periods

from secondorder_optax._src.base import all_finite, select_tree
from secondorder_optax._src.kl_clip import clip_by_kl
from secondorder_optax._src.momentum import restarting_ema


def build_optimizer(
    preconditioner: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    precondition_momentum: bool = False,
    kl_clip: Optional[float] = None,
    restart_momentum_every: Any = None,
    exact_model_cap: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Chains a preconditioner with decoupled weight decay, momentum and the learning rate.

  Args:
    preconditioner: a `soo.scale_by_<method>(...)` transformation.
    learning_rate: a number or an optax schedule.
    momentum: β of the momentum, a bias-corrected exponential moving average of the
      directions (`optax.ema(β, debias=True)`: heavy-ball momentum with dampening `1 − β`,
      so a step is as long as one direction and a KL-clipped direction keeps its bound);
      `None` or 0 for none.
    weight_decay: decoupled weight decay coefficient.
    precondition_momentum: apply momentum before the preconditioner (TNT's convention).
    kl_clip: `None` (default) or κ > 0: rescale the preconditioned direction Δ by `ν ≤ 1`
      so that the step's estimated KL change `η² ν² ⟨Δ, g⟩` stays below κ and, for a
      classifier's `curvature=`, the step stops at the minimiser of the exact
      empirical-Fisher model of the batch's loss along Δ (`soo.clip_by_kl`).
    restart_momentum_every: `None` (default) or a refresh period (an integer or a schedule
      such as `soo.growing_period(50)`): the momentum average restarts at the steps where
      that period is due (`soo.restarting_ema`); the full optimizers pass their
      `inverse_every` while it grows (every refresh for an integer period).
    exact_model_cap: with `kl_clip`, also stop each step at the exact empirical-Fisher
      model's minimiser where the curvature is a classifier's (`soo.clip_by_kl`).

  Returns:
    An `optax.GradientTransformationExtraArgs` forwarding `curvature=` to the preconditioner.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.build_optimizer(soo.scale_by_shampoo(), learning_rate=1e-2, momentum=0.9)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> updates, state = tx.update({"w": jnp.full((3, 2), 0.1)}, tx.init(params), params)
    >>> updates["w"].shape
    (3, 2)
  """
  # Python zeros/None skip a stage; traced values (inject_hyperparams) always keep it.
  # The preconditioners keep their own state on non-finite input; the other stateful parts
  # (momentum, a schedule's count) are guarded here, each on the updates it receives, so no
  # state is selected twice.
  if kl_clip is not None:
    preconditioner = clip_by_kl(preconditioner, kl_clip=kl_clip, learning_rate=learning_rate,
                                exact_model_cap=exact_model_cap)
  if _is_zero(momentum):
    momentum_tx = optax.identity()
  elif restart_momentum_every is None:
    momentum_tx = optax.ema(momentum, debias=True)
  else:
    momentum_tx = restarting_ema(momentum, restart_every=restart_momentum_every)
  tail = []
  if not _is_zero(weight_decay):
    tail.append(optax.add_decayed_weights(weight_decay))
  if precondition_momentum:
    parts = [keep_state_if_nonfinite(momentum_tx), preconditioner]
  else:
    parts = [preconditioner]
    tail.append(momentum_tx)
  tail.append(optax.scale_by_learning_rate(learning_rate))
  parts.append(keep_state_if_nonfinite(optax.chain(*tail)))
  return optax.chain(*parts)


def optimizer(scale_by, *, learning_rate: optax.ScalarOrSchedule, momentum: Optional[float],
              weight_decay: float, kl_clip: Optional[float], restart_momentum: bool = True,
              exact_model_cap: bool = True,
              **preconditioner_args) -> optax.GradientTransformationExtraArgs:
  """`build_optimizer(scale_by(**preconditioner_args), ...)`: the body of every full optimizer
  (called with the full optimizer's own arguments).

  A layer-wise method (its `scale_by` takes `layers=`) trains the leaves outside its layers
  with a first-order optimizer of their own, `fallback` (default
  `optax.adamw(fallback_learning_rate, weight_decay=weight_decay)`), through
  `optax.partition`: norm scales, embeddings and attention projections get Adam's step, not
  the second-order learning rate. With `restart_momentum` the momentum restarts at the
  preconditioner's refreshes (`inverse_every`), only while that period grows if it is a
  `soo.growing_period` (`periods.while_growing`).
  """
  restart_every = (periods.while_growing(preconditioner_args.get("inverse_every"))
                   if restart_momentum else None)
  build = functools.partial(
      build_optimizer, learning_rate=learning_rate, momentum=momentum,
      weight_decay=weight_decay, kl_clip=kl_clip, restart_momentum_every=restart_every,
      exact_model_cap=exact_model_cap)
  if "layers" not in preconditioner_args:
    return build(scale_by(**preconditioner_args))
  fallback = preconditioner_args.pop("fallback")
  fallback_learning_rate = preconditioner_args.pop("fallback_learning_rate")
  if fallback is None:
    fallback = optax.adamw(fallback_learning_rate, weight_decay=weight_decay)
  fallback = keep_state_if_nonfinite(fallback)
  layers = preconditioner_args["layers"]
  second_order = build(scale_by(**preconditioner_args))
  if layers == layerwise.CAPTURED:
    return route_by_capture(second_order, fallback)
  return optax.partition({PRECONDITIONED: second_order, FALLBACK: fallback},
                         functools.partial(layer_labels, layers=layers))


PRECONDITIONED, FALLBACK = "preconditioned", "fallback"


def layer_labels(tree: Any, layers=None) -> Any:
  """`"preconditioned"` for the leaves of the layers a layer-wise method covers in `tree`
  (params or updates), `"fallback"` for the others."""
  outside = layerwise.layer_mask(tree, layerwise.find_layers(tree, layers))
  return jax.tree.map(lambda out: FALLBACK if out else PRECONDITIONED, outside)


def route_by_capture(second_order: optax.GradientTransformation,
                     fallback: optax.GradientTransformation
                     ) -> optax.GradientTransformationExtraArgs:
  """`layers='captured'`: at every step, the layers the step's curvature records go to
  `second_order`, every other leaf to `fallback`.

  Which layers a capture records is known only from the curvature, so `fallback` keeps its
  state for every leaf and `second_order` for every candidate layer; each sees zeros on the
  leaves that are not its own, whose outputs are discarded.
  """
  second_order = optax.masked(
      second_order, lambda tree: jax.tree.map(lambda label: label == PRECONDITIONED,
                                              layer_labels(tree)))

  def init_fn(params):
    return optax.PartitionState({PRECONDITIONED: second_order.init(params),
                                 FALLBACK: fallback.init(params)})

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    captured = layerwise.captured_paths(curvature) or set()
    layers = layerwise.find_layers(updates)
    to_fallback = layerwise.layer_mask(
        updates, {k: info for k, info in layers.items() if info.path in captured})
    zero_where = lambda mask, tree: jax.tree.map(
        lambda m, x: jnp.zeros_like(x) if m else x, mask, tree)
    second_updates, second_state = second_order.update(
        zero_where(to_fallback, updates), state.inner_states[PRECONDITIONED], params,
        curvature=curvature, **extra_args)
    fallback_updates, fallback_state = fallback.update(
        zero_where(jax.tree.map(lambda m: not m, to_fallback), updates),
        state.inner_states[FALLBACK], params)
    out = jax.tree.map(lambda m, a, b: a if m else b, to_fallback, fallback_updates,
                       second_updates)
    return out, optax.PartitionState({PRECONDITIONED: second_state, FALLBACK: fallback_state})

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_zero(value) -> bool:
  return value is None or (isinstance(value, (int, float)) and value == 0)


def keep_state_if_nonfinite(
    tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Leaves the state of `tx` untouched when its incoming updates are not finite.

  The updates are passed through (so a non-finite step stays visible); wrap the optimizer
  in `optax.apply_if_finite` to skip such steps.
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = tx.update(updates, state, params, **extra_args)
    finite = all_finite(updates)
    return new_updates, select_tree(finite, new_state, state)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
