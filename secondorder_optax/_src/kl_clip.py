"""KL clipping of a preconditioned direction (Ba, Grosse & Martens, ICLR 2017).

A natural-gradient step `-η Δ` with `Δ ≈ F⁻¹ g` changes the model's predictive distribution
by about `½ η² Δᵀ F Δ ≈ ½ η² Δᵀ g` in KL divergence. Clipping rescales the direction by

    ν = min(1, sqrt(κ / (η² Σ_leaves ⟨Δ, g⟩)))

so that this estimate never exceeds `κ / 2`: steps through directions the (damped, stale)
curvature underestimates are shortened instead of blowing up, which lets a method run at
less damping. `Σ ⟨Δ, g⟩ ≤ 0` (not a descent pairing) leaves the direction unscaled.

That estimate uses the method's own curvature, which can miss what it approximates away
(cross-layer and cross-block terms, a stale or rank-deficient factor). Where each example's
loss is one categorical distribution (`Curvature.one_categorical`), the step is also capped
at the minimiser of the *exact* empirical-Fisher model of this batch's loss along it,

    ν ≤ E_n[d_n] / (η E_n[d_n²]),   d_n = ⟨∇l_n, Δ⟩ over the captured layers,

whose `d_n` the capture's own backward pass provides (`Curvature.empirical_layers`: one
product with each layer's inputs, no extra pass). The model's `E_n[d_n²]` grows with the
spread of the examples' derivatives, so a step that would lower some examples' losses by
raising others' a lot is shortened. Losses summed over many outputs (an autoencoder's
pixels) are left to the KL estimate: their empirical Fisher overstates the curvature by up
to the number of outputs, and a step at the cap lowers the model by at most ½.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import patches
from secondorder_optax._src.base import all_finite
from secondorder_optax._src.capture.common import nested_get

Array = jax.Array


class KLClipState(NamedTuple):
  """State of `clip_by_kl`.

  Attributes:
    count: steps with finite gradients (the learning-rate schedule's step).
    inner: the wrapped preconditioner's state.
  """

  count: Array
  inner: Any


def kl_clip_scale(directions: Any, grads: Any, kl_clip: Any, learning_rate: Any) -> Array:
  """`ν = min(1, sqrt(κ / (η² Σ ⟨Δ, g⟩)))`, 1 where `Σ ⟨Δ, g⟩ ≤ 0`."""
  pairing = sum(jnp.vdot(d.astype(jnp.float32), g.astype(jnp.float32))
                for d, g in zip(jax.tree.leaves(directions), jax.tree.leaves(grads)))
  pairing = jnp.asarray(pairing, jnp.float32)
  step_kl = jnp.square(jnp.asarray(learning_rate, jnp.float32)) * pairing
  safe = jnp.where(step_kl > 0, step_kl, 1.0)
  return jnp.where(step_kl > 0, jnp.minimum(1.0, jnp.sqrt(kl_clip / safe)), 1.0)


def _layer_direction(directions: Any, path: tuple) -> Any:
  """The direction's `{"kernel", "bias"}` of the layer at `path`, `None` where this part of
  the optimizer does not hold that layer (a partition's masked leaves)."""
  layer = nested_get(directions, path)
  leaves = jax.tree.leaves(layer)
  return layer if leaves and all(hasattr(x, "ndim") for x in leaves) else None


def exact_model_cap_scale(directions: Any, curvature: Any, learning_rate: Any) -> Array:
  """`E_n[d_n] / (η E_n[d_n²])` with `d_n = ⟨∇l_n, Δ⟩` summed over the captured layers (the
  step `η ν Δ` at which the exact empirical-Fisher model of the batch's loss is lowest);
  `inf` where the curvature has no per-example statistics at the given targets, no
  captured layer is in `directions` or `E_n[d_n] ≤ 0`."""
  layers = getattr(curvature, "empirical_layers", None)
  if not layers or not getattr(curvature, "one_categorical", False):
    return jnp.asarray(jnp.inf, jnp.float32)
  derivatives = []
  for path, stats in layers.items():
    layer = _layer_direction(directions, path)
    if layer is None:
      continue
    # Stacked layers (nn.scan / nn.vmap): one member per entry of the stacking axes.
    flat = jax.tree.map(lambda x, k=stats.stack_ndim: x.reshape((-1,) + x.shape[k:]), layer)
    for i, member in enumerate(patches.unstack(stats)):
      derivatives.append(patches.directional_derivatives(
          member, jax.tree.map(lambda x, i=i: x[i], flat)))
  if not derivatives:
    return jnp.asarray(jnp.inf, jnp.float32)
  d = sum(derivatives).astype(jnp.float32)
  mean, second = jnp.mean(d), jnp.mean(jnp.square(d))
  eta = jnp.asarray(learning_rate, jnp.float32)
  usable = (mean > 0) & (second > 0) & (eta > 0)
  return jnp.where(usable, mean / jnp.where(usable, eta * second, 1.0), jnp.inf)


def clip_by_kl(preconditioner: optax.GradientTransformation, *, kl_clip: Any,
               learning_rate: optax.ScalarOrSchedule,
               exact_model_cap: bool = True) -> optax.GradientTransformationExtraArgs:
  """Scales the direction Δ of `preconditioner` by `ν ≤ 1` so that `η² ν² ⟨Δ, g⟩ ≤ kl_clip`.

  `soo.build_optimizer(..., kl_clip=κ)` (and every full optimizer's `kl_clip=`) puts this
  around the preconditioner, with the optimizer's own learning rate.

  When the update also receives a `curvature=` whose loss is one categorical distribution
  per example (`Curvature.one_categorical`: softmax cross-entropy on `(batch, classes)`
  logits), `ν` is also at most the exact model cap `E_n[d_n] / (η E_n[d_n²])`, with `d_n`
  each example's derivative along Δ over the captured layers (see the module docstring).
  Its per-example derivatives come from the capture's own backward pass; `kl_clip=None` on
  a full optimizer turns off both bounds.

  Args:
    preconditioner: a `soo.scale_by_<method>(...)` transformation; it receives the incoming
      updates `g` (and every extra argument, e.g. `curvature=`) and returns `Δ`.
    kl_clip: κ, a positive number or array (e.g. from `optax.inject_hyperparams`).
    learning_rate: η, the number or optax schedule the full optimizer steps with.
    exact_model_cap: also cap `ν` at the exact model's minimiser where the curvature
      allows it (default). SENG turns it off: its centred Fisher leaves out the mean
      gradient's outer product on purpose, and the uncentred model would cut every step.

  Returns:
    An `optax.GradientTransformationExtraArgs` returning `ν Δ`.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.clip_by_kl(soo.scale_by_shampoo(), kl_clip=1e-3, learning_rate=0.1)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> grads = {"w": jnp.full((3, 2), 5.0)}
    >>> direction, state = tx.update(grads, tx.init(params), params)
    >>> unclipped, _ = soo.scale_by_shampoo().update(grads, soo.scale_by_shampoo().init(params))
    >>> nu = float(direction["w"][0, 0] / unclipped["w"][0, 0])
    >>> round(0.1 ** 2 * nu ** 2 * float(jnp.vdot(unclipped["w"], grads["w"])), 6)
    0.001
  """
  if isinstance(kl_clip, (int, float)) and not kl_clip > 0:
    raise ValueError(f"kl_clip must be positive, got {kl_clip}")
  preconditioner = optax.with_extra_args_support(preconditioner)

  def init_fn(params):
    return KLClipState(count=jnp.zeros((), jnp.int32), inner=preconditioner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    directions, inner = preconditioner.update(updates, state.inner, params, **extra_args)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    scale = kl_clip_scale(directions, updates, kl_clip, lr)
    if exact_model_cap:
      cap = exact_model_cap_scale(directions, extra_args.get("curvature"), lr)
      scale = jnp.minimum(scale, cap)
    directions = jax.tree.map(lambda d: (d * scale).astype(d.dtype), directions)
    count = state.count + all_finite(updates).astype(state.count.dtype)
    return directions, KLClipState(count=count, inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
