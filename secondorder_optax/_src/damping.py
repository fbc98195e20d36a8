"""Relative damping: one meaning of `damping` for every method and every data scale (DESIGN §6).

Every method damps a curvature block `F` (a Kronecker product of factors, a mini-block, an
eigen-corrected diagonal, a low-rank Gram) so that the damped block's mean eigenvalue is
`(1 + damping)` times the block's own:

* one matrix or diagonal `F`: `F + λ m(F) I`, with `m(F) = tr F / dim F`;
* a Kronecker product of `k` factors `F_1 ⊗ … ⊗ F_k`: each factor gets
  `F_i + γ m(F_i) I` with `(1 + γ)^k = 1 + λ` (for KFAC's two factors this is the π-corrected
  factored damping of Martens & Grosse, at `π√λ' = γ m(A)`);
* a low-rank block (SENG's empirical Fisher of `N` examples in `d > N` dimensions): `m` is the
  mean of its nonzero spectrum, `tr F / min(N, d)`.

The damping is therefore dimensionless: the same value works when the inputs are rescaled
by 1e4 (the damped preconditioner rescales with the curvature, as natural-gradient steps
should), and the same value means the same thing for KFAC and EKFAC, TNT and Shampoo. A
block whose curvature is all zero (nothing measured yet, an unused parameter) is damped
with `m = 1`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def mean_eigenvalue(block: Array, rank: int | None = None) -> Array:
  """`tr F / rank` (`rank` defaults to the dimension) of a matrix or a diagonal (1-D);
  1 where that is not positive and finite."""
  trace = jnp.trace(block) if block.ndim == 2 else jnp.sum(block)
  mean = trace / (block.shape[-1] if rank is None else rank)
  return jnp.where(jnp.isfinite(mean) & (mean > 0), mean, 1.0).astype(block.dtype)


def per_factor(damping: Array, order: int) -> Array:
  """`γ` with `(1 + γ)^order = 1 + damping`: each factor's share of a Kronecker product's
  relative damping."""
  damping = jnp.asarray(damping, jnp.float32)
  if order == 1:
    return damping
  return jnp.power(1.0 + damping, 1.0 / order) - 1.0


def relative(damping: Array, block: Array, order: int = 1, rank: int | None = None) -> Array:
  """The absolute diagonal shift of `block`: `γ m(F)` (`γ = per_factor(damping, order)`)."""
  return (per_factor(damping, order) * mean_eigenvalue(block, rank)).astype(block.dtype)
