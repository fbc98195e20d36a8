"""Quasi-Newton pieces of K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020), DESIGN §5.

Dense and testable on their own:

* `bfgs_inverse_update`: the BFGS update of an inverse curvature `H` from a secant pair
  `(s, y)`, `H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`, `ρ = 1 / sᵀy`;
* `two_loop`: the L-BFGS two-loop recursion `H v` over a fixed-size ring of secant pairs
  (unfilled slots are masked out), i.e. the BFGS updates of `H₀ = h₀ I` by the stored pairs,
  oldest first, applied to `v` without forming `H` (its two loops solved as two triangular
  systems in the pairs' coefficients);
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


def _substitution(strict: Array, rhs: Array, lower: bool) -> Array:
  """`x` with `(I + T) x = rhs` for a strictly lower (`lower`) or upper triangular `T`
  (`m × m`) and `rhs` `(m, n)`: forward (back) substitution, one row of `x` at a time."""

  def row(x, i):
    return x.at[i].set(rhs[i] - linalg.matmul(strict[i], x)), None

  order = jnp.arange(strict.shape[0])
  x, _ = lax.scan(row, jnp.zeros_like(rhs), order if lower else order[::-1])
  return x


def two_loop(s: Array, y: Array, filled: Array, next_slot: Array, initial_scale: Array,
             vectors: Array) -> Array:
  """`H v` for every row `v` of `vectors` (`(..., d)`), with `H` the BFGS updates of
  `initial_scale · I` by the filled pairs of the ring `s, y` (`(memory, d)`), oldest first.

  The two loops of the L-BFGS recursion (Nocedal & Wright, Algorithm 7.4), newest pair to
  oldest, `α_i = ρ_i s_iᵀ q`, `q ← q − α_i y_i`, then `r = h₀ q` and oldest to newest
  `β_i = ρ_i y_iᵀ r`, `r ← r + (α_i − β_i) s_i`, are two unit-triangular systems in the
  `memory` coefficients `α` and `α − β`; they are solved here by substitution over the
  `memory` coefficients, with the products involving `v` done as matrix products for all
  rows at once (no sequential pass over the vectors: fast on wide layers). Unfilled slots
  (and pairs with `sᵀy ≤ 0`) get `ρ = 0` and drop out.

  Example:
    >>> import jax.numpy as jnp
    >>> s, y = jnp.array([[1.0, 0.0], [0.0, 0.0]]), jnp.array([[4.0, 0.0], [0.0, 0.0]])
    >>> filled = jnp.array([True, False])  # one pair: y = 4 s along the first axis
    >>> two_loop(s, y, filled, jnp.array(1), jnp.array(1.0), jnp.array([4.0, 1.0]))
    Array([1., 1.], dtype=float32)
  """
  dtype = vectors.dtype
  order = newest_first(next_slot, s.shape[0])  # index 0: the newest pair
  s, y, filled = s[order].astype(dtype), y[order].astype(dtype), filled[order]
  sy = _dot(s, y)
  usable = filled & (sy > 0)
  rho = jnp.where(usable, 1.0 / jnp.where(usable, sy, 1.0), 0.0).astype(dtype)
  shape = vectors.shape
  v = vectors.reshape((-1, shape[-1]))
  s_dot_y = rho[:, None] * linalg.matmul(s, y.T)  # [i, j] = ρ_i s_iᵀ y_j
  # First loop: α_i = ρ_i s_iᵀ v − Σ_{j newer} ρ_i s_iᵀ y_j α_j.
  alpha = _substitution(jnp.tril(s_dot_y, -1), rho[:, None] * linalg.matmul(s, v.T),
                        lower=True)
  r = initial_scale.astype(dtype) * (v - linalg.matmul(alpha.T, y))
  # Second loop: c_i = α_i − ρ_i y_iᵀ r − Σ_{j older} ρ_i y_iᵀ s_j c_j.
  y_dot_s = rho[:, None] * linalg.matmul(y, s.T)
  c = _substitution(jnp.triu(y_dot_s, 1), alpha - rho[:, None] * linalg.matmul(y, r.T),
                    lower=False)
  return (r + linalg.matmul(c.T, s)).reshape(shape)


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
