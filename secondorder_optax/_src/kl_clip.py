"""KL clipping of a preconditioned direction (Ba, Grosse & Martens, ICLR 2017).

A natural-gradient step `-η Δ` with `Δ ≈ F⁻¹ g` changes the model's predictive distribution
by about `½ η² Δᵀ F Δ ≈ ½ η² Δᵀ g` in KL divergence. Clipping rescales the direction by

    ν = min(1, sqrt(κ / (η² Σ_leaves ⟨Δ, g⟩)))

so that this estimate never exceeds `κ / 2`: steps through directions the (damped, stale)
curvature underestimates are shortened instead of blowing up, which lets a method run at
less damping. `Σ ⟨Δ, g⟩ ≤ 0` (not a descent pairing) leaves the direction unscaled.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src.base import all_finite

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


def clip_by_kl(preconditioner: optax.GradientTransformation, *, kl_clip: Any,
               learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  """Scales the direction Δ of `preconditioner` by `ν ≤ 1` so that `η² ν² ⟨Δ, g⟩ ≤ kl_clip`.

  `soo.build_optimizer(..., kl_clip=κ)` (and every full optimizer's `kl_clip=`) puts this
  around the preconditioner, with the optimizer's own learning rate.

  Args:
    preconditioner: a `soo.scale_by_<method>(...)` transformation; it receives the incoming
      updates `g` (and every extra argument, e.g. `curvature=`) and returns `Δ`.
    kl_clip: κ, a positive number or array (e.g. from `optax.inject_hyperparams`).
    learning_rate: η, the number or optax schedule the full optimizer steps with.

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
    directions = jax.tree.map(lambda d: (d * scale).astype(d.dtype), directions)
    count = state.count + all_finite(updates).astype(state.count.dtype)
    return directions, KLClipState(count=count, inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
