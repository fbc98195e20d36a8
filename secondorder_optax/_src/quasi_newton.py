"""Quasi-Newton pieces of K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020), DESIGN §5.

Dense and testable on their own:

* `bfgs_inverse_update`: the BFGS update of an inverse curvature `H` from a secant pair
  `(s, y)`, `H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`, `ρ = 1 / sᵀy`;
* `two_loop`: the L-BFGS two-loop recursion `H v` over a fixed-size ring of secant pairs
  (unfilled slots are masked out), i.e. the BFGS updates of `H₀ = h₀ I` by the stored pairs,
  oldest first, applied to `v` without forming `H`;
* `double_damping`: the paper's double damping of a pair, Powell's damping on `H`
  (`s̃ = θ s + (1 − θ) H y` so that `s̃ᵀy ≥ μ₁ yᵀHy`) followed by Levenberg–Marquardt
  damping on `B = H⁻¹` (`ỹ = y + μ₂ s̃`, so that the pairs describe `B + μ₂ I`);
* `push_pair`: a pair into the ring (where it is accepted).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

from secondorder_optax._src import linalg

Array = jax.Array
# Powell damping's μ₁ (the paper's value).
POWELL = 0.2


def _dot(a: Array, b: Array) -> Array:
  return jnp.sum(a * b, axis=-1)


def curvature_ok(s: Array, y: Array) -> Array:
  """Whether `(s, y)` can update a positive definite inverse: `sᵀy > 0`, all finite."""
  sy = _dot(s, y)
  return jnp.isfinite(sy) & (sy > 0) & jnp.all(jnp.isfinite(s)) & jnp.all(jnp.isfinite(y))


def bfgs_inverse_update(inverse: Array, s: Array, y: Array) -> Array:
  """`(I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ` (`ρ = 1/sᵀy`); `H` itself where `sᵀy ≤ 0`.

  Example:
    >>> import jax.numpy as jnp
    >>> h = bfgs_inverse_update(jnp.eye(2), jnp.array([1.0, 0.0]), jnp.array([2.0, 0.0]))
    >>> h @ jnp.array([2.0, 0.0])  # the secant equation H⁺ y = s
    Array([1., 0.], dtype=float32)
  """
  ok = curvature_ok(s, y)
  rho = 1.0 / jnp.where(ok, _dot(s, y), 1.0)
  hy = linalg.matmul(inverse, y)
  yhy = _dot(y, hy)
  updated = (inverse - rho * (jnp.outer(s, hy) + jnp.outer(hy, s))
             + (rho * rho * yhy + rho) * jnp.outer(s, s))
  return jnp.where(ok, linalg.symmetrize(updated), inverse).astype(inverse.dtype)


def newest_first(next_slot: Array, memory: int) -> Array:
  """Ring slots from the newest pair to the oldest (`next_slot` is where the next goes)."""
  return (next_slot - 1 - jnp.arange(memory)) % memory


def two_loop(s: Array, y: Array, filled: Array, next_slot: Array, initial_scale: Array,
             vectors: Array) -> Array:
  """`H v` for every row `v` of `vectors` (`(..., d)`), with `H` the BFGS updates of
  `initial_scale · I` by the filled pairs of the ring `s, y` (`(memory, d)`), oldest first.

  Example:
    >>> import jax.numpy as jnp
    >>> s, y = jnp.array([[1.0, 0.0], [0.0, 0.0]]), jnp.array([[4.0, 0.0], [0.0, 0.0]])
    >>> filled = jnp.array([True, False])  # one pair: y = 4 s along the first axis
    >>> two_loop(s, y, filled, jnp.array(1), jnp.array(1.0), jnp.array([4.0, 1.0]))
    Array([1., 1.], dtype=float32)
  """
  order = newest_first(next_slot, s.shape[0])
  s, y, filled = s[order], y[order], filled[order]
  sy = _dot(s, y)
  usable = filled & (sy > 0)
  rho = jnp.where(usable, 1.0 / jnp.where(usable, sy, 1.0), 0.0).astype(vectors.dtype)

  def newest_to_oldest(q, pair):
    s_i, y_i, rho_i = pair
    alpha = rho_i * _dot(q, s_i)
    return q - alpha[..., None] * y_i, alpha

  q, alphas = lax.scan(newest_to_oldest, vectors, (s, y, rho))
  r = initial_scale.astype(vectors.dtype) * q

  def oldest_to_newest(r, pair):
    s_i, y_i, rho_i, alpha = pair
    beta = rho_i * _dot(r, y_i)
    return r + (alpha - beta)[..., None] * s_i, None

  r, _ = lax.scan(oldest_to_newest, r, (s, y, rho, alphas), reverse=True)
  return r


def double_damping(s: Array, y: Array, hy: Array, lm_damping: Array,
                   powell: float = POWELL) -> Tuple[Array, Array]:
  """`(s̃, ỹ)`: Powell's damping on `H`, then Levenberg–Marquardt damping on `B = H⁻¹`.

  `hy = H y` with the current inverse. Where `sᵀy < μ₁ yᵀHy`, `s̃ = θ s + (1 − θ) H y` with
  `θ = (1 − μ₁) yᵀHy / (yᵀHy − sᵀy)` (then `s̃ᵀy = μ₁ yᵀHy`), else `s̃ = s`; and
  `ỹ = y + μ₂ s̃`, so that `s̃ᵀỹ ≥ μ₁ yᵀHy + μ₂ |s̃|² > 0` whenever `s̃ ≠ 0`.

  Example:
    >>> import jax.numpy as jnp
    >>> s, y = jnp.array([1.0, 0.0]), jnp.array([-1.0, 0.0])  # negative curvature
    >>> s_d, y_d = double_damping(s, y, hy=y, lm_damping=jnp.array(0.5))
    >>> float(s_d @ y_d) > 0
    True
  """
  sy, yhy = _dot(s, y), _dot(y, hy)
  damp = sy < powell * yhy
  theta = jnp.where(damp, (1.0 - powell) * yhy / jnp.where(damp, yhy - sy, 1.0), 1.0)
  damped_s = theta * s + (1.0 - theta) * hy
  return damped_s, y + lm_damping.astype(y.dtype) * damped_s


def push_pair(s_ring: Array, y_ring: Array, filled: Array, next_slot: Array, s: Array,
              y: Array, accept: Array) -> Tuple[Array, Array, Array, Array]:
  """The ring with `(s, y)` written at `next_slot` (replacing the oldest pair when full),
  or unchanged where not `accept`."""
  new_s = s_ring.at[next_slot].set(s.astype(s_ring.dtype))
  new_y = y_ring.at[next_slot].set(y.astype(y_ring.dtype))
  new_filled = filled.at[next_slot].set(True)
  new_next = (next_slot + 1) % s_ring.shape[0]
  pick = lambda new, old: jnp.where(accept, new, old)
  return (pick(new_s, s_ring), pick(new_y, y_ring), pick(new_filled, filled),
          pick(new_next, next_slot).astype(next_slot.dtype))
