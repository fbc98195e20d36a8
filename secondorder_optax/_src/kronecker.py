"""Kronecker factors of a layer's matrix view, and products in their eigenbases (DESIGN §5).

From a layer's (homogeneous) inputs `ā` and per-example output gradients `g` at `T` locations
per example: KFC's factors `A`, `G`, TKFAC's trace-restricted `δΦ`, `δΨ`, EKFAC's per-entry
scalings in an eigenbasis, and the eigen-corrected direction. The KFAC family (`kfac.py`)
is built from these.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from secondorder_optax._src import linalg, patches
from secondorder_optax._src.base import LayerStats

Array = jax.Array
# Smallest trace used when normalising factors: keeps an all-zero layer finite.
TINY = float(jnp.finfo(jnp.float32).tiny)


class KroneckerFactors(NamedTuple):
  """Running averages of a layer's factors: `A`, `G` (KFAC) or `δΦ`, `δΨ` (TKFAC).

  Example:
    >>> import jax.numpy as jnp
    >>> from secondorder_optax._src.kronecker import kronecker_factors
    >>> a, g = jnp.ones((2, 1, 3)), jnp.ones((2, 1, 2))  # 2 examples, 1 location
    >>> [f.shape for f in kronecker_factors(a, g)]
    [(3, 3), (2, 2)]
  """

  input_factor: Array
  output_factor: Array


class KroneckerInverses(NamedTuple):
  """Damped inverses of the factors at the last refresh (the identity before the first).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> state = soo.scale_by_tkfac(damping=1e-3).init({"kernel": jnp.ones((4, 3))})
    >>> type(state.preconditioner[""]).__name__
    'KroneckerInverses'
  """

  input_inverse: Array
  output_inverse: Array


class EigenBases(NamedTuple):
  """EKFAC/TEKFAC's preconditioner.

  Attributes:
    input_basis: eigenvectors (columns) of the input factor at the last refresh.
    output_basis: eigenvectors of the output factor.
    scalings: running average of `S = E_n[(Q_inᵀ D_n Q_out)²]` in the current bases.
    input_basis_t: `input_basis` transposed when the bases are narrower than float32
      (XLA:CPU multiplies bfloat16 fast only with row-major operands), else a `(1,)`
      placeholder.
    output_basis_t: likewise for `output_basis`.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> bases = soo.scale_by_ekfac(damping=1e-3).init({"kernel": jnp.ones((4, 3))})
    >>> bases.preconditioner[""].scalings.shape
    (4, 3)
  """

  input_basis: Array
  output_basis: Array
  scalings: Array
  input_basis_t: Array
  output_basis_t: Array


# ---------------------------------------------------------------------------------------
# Statistics of one layer from its matrix view a: (B, T, d_a), g: (B, T, d_g).


def layer_view(stats: LayerStats, dtype: Any) -> Tuple[Array, Array]:
  """Homogeneous inputs / patches `(B, T, d_in [+1])` and output grads `(B, T, d_out)`."""
  return (patches.layer_inputs(stats).astype(dtype),
          patches.layer_output_grads(stats).astype(dtype))


def _gram(x: Array, scale: float) -> Array:
  """`scale · Σ_{n,t} x xᵀ` for `x: (B, T, d)`."""
  return linalg.symmetric_gram(x.reshape((-1, x.shape[-1]))) * scale


def input_factor(a: Array) -> Array:
  """KFC's input factor `A = E_n Σ_t ā āᵀ` (also K-BFGS's)."""
  return _gram(a, 1.0 / a.shape[0])


def kronecker_factors(a: Array, g: Array) -> KroneckerFactors:
  """KFC factors `A = E_n Σ_t ā āᵀ` and `G = E_n (1/T) Σ_t g gᵀ`."""
  batch, locations = a.shape[0], a.shape[1]
  return KroneckerFactors(input_factor(a), _gram(g, 1.0 / (batch * locations)))


def exact_block_trace(a: Array, g: Array) -> Array:
  """`δ = E_n ‖D_n‖²_F`, `D_n = Σ_t ā_{n,t} g_{n,t}ᵀ`: the trace of the layer's exact Fisher
  block, the cross-location terms `(ā_t·ā_s)(g_t·g_s)` included. Per example it forms `D_n`
  or the two `T×T` location Grams, whichever takes fewer products."""
  batch, locations, d_in = a.shape
  d_out = g.shape[-1]
  if d_in * d_out <= locations * (d_in + d_out):
    return jnp.sum(jnp.square(patches.example_grads(a, g))) / batch
  input_grams = jnp.einsum("btd,bsd->bts", a, a, precision=lax.Precision.HIGHEST)
  output_grams = jnp.einsum("bte,bse->bts", g, g, precision=lax.Precision.HIGHEST)
  return jnp.sum(input_grams * output_grams) / batch


def trace_restricted_factors(a: Array, g: Array) -> KroneckerFactors:
  """TKFAC's `δΦ` and `δΨ`: `Φ ∝ E_n Σ_t |g|² ā āᵀ`, `Ψ ∝ E_n Σ_t |ā|² g gᵀ` with unit
  traces, and `δ` the trace of the exact block (`exact_block_trace`). With one location per
  example (dense layers) `δ = E_n |ā|²|g|²` and the factors are the sums themselves; at `T > 1`
  locations `δ` also counts the cross-location terms that per-location sums leave out (they
  make a convolution's exact block up to `T` times larger when its output gradients are
  spatially correlated, as at initialisation)."""
  batch, locations = a.shape[0], a.shape[1]
  a_norm = jnp.linalg.norm(a, axis=-1, keepdims=True)
  g_norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
  input_sum, output_sum = _gram(a * g_norm, 1.0 / batch), _gram(g * a_norm, 1.0 / batch)
  if locations == 1:
    return KroneckerFactors(input_sum, output_sum)
  per_location_trace = jnp.trace(input_sum)
  scale = exact_block_trace(a, g) / jnp.maximum(per_location_trace, TINY)
  scale = jnp.where(per_location_trace > 0, scale, 1.0).astype(input_sum.dtype)
  return KroneckerFactors(input_sum * scale, output_sum * scale)


def eigen_scalings(a: Array, g: Array, input_basis: Array, output_basis: Array) -> Array:
  """`S = E_n[(Q_inᵀ D_n Q_out)²]` with `D_n = Σ_t ā_{n,t} g_{n,t}ᵀ` (one matmul of squared
  projections when there is one location per example)."""
  batch, locations = a.shape[0], a.shape[1]
  projected_a = linalg.matmul(a, input_basis)
  projected_g = linalg.matmul(g, output_basis)
  if locations == 1:
    return jnp.matmul(jnp.square(projected_a[:, 0]).T, jnp.square(projected_g[:, 0])) / batch
  projected_grads = jnp.einsum("btd,bte->bde", projected_a, projected_g)
  return jnp.mean(jnp.square(projected_grads), axis=0)


def mean_eigenvalue(factor: Array) -> Array:
  return jnp.maximum(jnp.trace(factor) / factor.shape[-1], TINY)


def transposed_bases(input_basis: Array, output_basis: Array) -> Tuple[Array, Array]:
  """Row-major `(Q_inᵀ, Q_outᵀ)` for bases narrower than float32, else `(1,)` placeholders
  (checkpointers refuse zero-size arrays)."""
  if jnp.finfo(input_basis.dtype).bits >= 32:
    return jnp.zeros((1,), input_basis.dtype), jnp.zeros((1,), output_basis.dtype)
  return jnp.transpose(input_basis), jnp.transpose(output_basis)


def eigen_direction(grad: Array, bases: EigenBases, damping: Array) -> Array:
  """`Q_in [(Q_inᵀ ∇W̄ Q_out) / (S + λ)] Q_outᵀ` (products in the bases' dtype)."""
  input_t, output_t = bases.input_basis_t, bases.output_basis_t
  if input_t.ndim == 1:
    input_t, output_t = bases.input_basis.T, bases.output_basis.T
  projected = linalg.matmul(linalg.matmul(input_t, grad), bases.output_basis)
  scaled = projected / (bases.scalings + damping.astype(bases.scalings.dtype))
  return linalg.matmul(linalg.matmul(bases.input_basis, scaled), output_t)
