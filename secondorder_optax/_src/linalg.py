"""Batched linear algebra shared by every method (DESIGN §6).

All functions act on one matrix; the refresh engine (`engine.solve_blocks`) runs them over
many same-shape matrices at once, so a model with forty 16×16 mini-blocks and three
1000×1000 factors makes two calls, not 43. `reject` marks a finite but unusable result as
failed, so the engine keeps the previous preconditioner.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax

from secondorder_optax._src.base import stats_dtype

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST


def compute_dtype(*operands: Array) -> Any:
  """The narrowest floating dtype among `operands` (where a product of them is computed)."""
  dtypes = [jnp.asarray(x).dtype for x in operands]
  return min(dtypes, key=lambda d: (jnp.finfo(d).bits, d.name))


def _product(fn, a: Array, b: Array, **kwargs) -> Array:
  dtype = compute_dtype(a, b)
  return fn(a.astype(dtype), b.astype(dtype), precision=_HIGHEST,
            preferred_element_type=stats_dtype(dtype), **kwargs)


def matmul(a: Array, b: Array) -> Array:
  """`a @ b` for applying a stored preconditioner.

  Computed in the narrower dtype of the two operands and accumulated in float32 at least:
  a bfloat16 preconditioner (`preconditioner_dtype=jnp.bfloat16`) multiplies at bfloat16
  speed with float32 sums and a float32 result; float32 operands multiply at full float32
  precision (`Precision.HIGHEST`, also on accelerators).
  """
  return _product(jnp.matmul, a, b)


def tensordot(a: Array, b: Array, axes) -> Array:
  """`jnp.tensordot(a, b, axes)` with `matmul`'s dtype rule."""
  return _product(jnp.tensordot, a, b, axes=axes)


def refreshed_dtype(statistics_dtype: Any, preconditioner_dtype: Any) -> Any:
  """Dtype of a stored preconditioner: `preconditioner_dtype`, or by default the dtype of
  the statistics it is computed from."""
  return statistics_dtype if preconditioner_dtype is None else preconditioner_dtype


def symmetrize(matrix: Array) -> Array:
  """`(M + Mᵀ) / 2` over the last two axes."""
  return 0.5 * (matrix + jnp.swapaxes(matrix, -1, -2))


def add_to_diagonal(matrix: Array, value: Array) -> Array:
  """`M + value * I` over the last two axes (`value` broadcasts over leading axes)."""
  eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
  return matrix + jnp.asarray(value, matrix.dtype)[..., None, None] * eye


def damped_inverse(matrix: Array, damping: Array) -> Array:
  """`(M + λI)⁻¹` of a symmetric PSD matrix by Cholesky."""
  damped = add_to_diagonal(symmetrize(matrix), damping)
  factor = jnp.linalg.cholesky(damped)
  eye = jnp.broadcast_to(jnp.eye(matrix.shape[-1], dtype=matrix.dtype), matrix.shape)
  return symmetrize(jsl.cho_solve((factor, True), eye))


def reject(ok: Array, result: Any) -> Any:
  """`result` where `ok`, else all-NaN: marks a finite but unusable refresh as failed (the
  engine keeps the previous preconditioner for a non-finite result)."""
  return jax.tree.map(lambda x: jnp.where(ok, x, jnp.nan).astype(x.dtype), result)


def _probe(dim: int, dtype: Any) -> Array:
  """A fixed vector with no structure a PSD factor is likely to share (not all ones)."""
  return jnp.cos(jnp.arange(1, dim + 1, dtype=jnp.float32) * 2.399963).astype(dtype)


def checked_damped_inverse(matrix: Array, damping: Array, tolerance: float = 0.1) -> Array:
  """`damped_inverse`, rejected (`reject`) when its residual on a probe vector,
  `‖(M + λI) X v − v‖ / ‖v‖`, exceeds `tolerance`: a near-singular system can come out of
  Cholesky finite but meaningless (e.g. at damping 0). Costs one matrix-vector product.
  """
  inverse = damped_inverse(matrix, damping)
  damped = add_to_diagonal(symmetrize(matrix), damping)
  v = _probe(matrix.shape[-1], matrix.dtype)
  residual = jnp.matmul(damped, jnp.matmul(inverse, v, precision=_HIGHEST),
                        precision=_HIGHEST) - v
  ok = jnp.linalg.norm(residual) <= tolerance * jnp.linalg.norm(v)
  return reject(ok, inverse)


def damped_solve(matrix: Array, rhs: Array, damping: Array) -> Array:
  """`(M + λI)⁻¹ rhs` of a symmetric PSD matrix by Cholesky (`rhs`: vector or matrix)."""
  damped = add_to_diagonal(symmetrize(matrix), damping)
  factor = jnp.linalg.cholesky(damped)
  return jsl.cho_solve((factor, True), rhs)


def eigh(matrix: Array, min_eigenvalue: float = 0.0) -> Tuple[Array, Array]:
  """Eigendecomposition of a symmetric matrix with eigenvalues clamped below.

  Returns:
    `(eigenvalues, eigenvectors)` with `M ≈ Q diag(λ) Qᵀ`, `λ >= min_eigenvalue`.
  """
  values, vectors = jnp.linalg.eigh(symmetrize(matrix))
  return jnp.maximum(values, min_eigenvalue), vectors


def inverse_root(matrix: Array, p: float, damping: Array) -> Array:
  """`(M + λI)^(-1/p)` of a symmetric PSD matrix via `eigh` (eigenvalues clamped at 0)."""
  values, vectors = eigh(matrix)
  scaled = vectors * (values + damping) ** (-1.0 / p)
  return jnp.matmul(scaled, vectors.T, precision=_HIGHEST)


# Symmetric Grams at least this wide are computed block by block, upper blocks only.
_GRAM_BLOCKING_MIN_DIM = 320
_GRAM_BLOCK_DIM = 160
_GRAM_MAX_BLOCKS = 4


def _gram_block_bounds(dim: int) -> Tuple[int, ...]:
  if dim < _GRAM_BLOCKING_MIN_DIM:
    return (0, dim)
  blocks = min(_GRAM_MAX_BLOCKS, dim // _GRAM_BLOCK_DIM)
  return tuple(i * dim // blocks for i in range(blocks + 1))


def symmetric_gram(x: Array, axis: int = -1) -> Array:
  """`X_(axis) X_(axis)ᵀ`: the contraction of `x` with itself over every axis but `axis`.

  For rows `x: (n, d)` and `axis=-1` this is `xᵀ x`. XLA has no symmetric rank-k update,
  so a wide Gram (`d >= 320`) is cut into up to 4×4 blocks and only the upper ones are
  multiplied, the lower ones mirrored: about 30–40% fewer flops (measured ~20–25% faster
  on CPU for d = 500–1000). The result is exactly symmetric (diagonal blocks are averaged
  with their transposes).
  """
  axis = axis % x.ndim
  others = tuple(i for i in range(x.ndim) if i != axis)
  bounds = _gram_block_bounds(x.shape[axis])
  pieces = [lax.slice_in_dim(x, lo, hi, axis=axis) for lo, hi in zip(bounds, bounds[1:])]
  upper = {}
  for i, left in enumerate(pieces):
    for j in range(i, len(pieces)):
      upper[i, j] = lax.dot_general(left, pieces[j], ((others, others), ((), ())),
                                    precision=_HIGHEST)
    # A diagonal block's product is symmetric only up to rounding (XLA:CPU may split the
    # contraction differently for its two triangles); averaging with its transpose is exact.
    upper[i, i] = 0.5 * (upper[i, i] + upper[i, i].T)
  if len(pieces) == 1:
    return upper[0, 0]
  rows = [jnp.concatenate([upper[i, j] if j >= i else upper[j, i].T
                           for j in range(len(pieces))], axis=1)
          for i in range(len(pieces))]
  return jnp.concatenate(rows, axis=0)


def after(value: Any, dependency: Any) -> Any:
  """`value`, but not available before `dependency` has been computed.

  Chains batched LAPACK calls so that XLA:CPU never runs two at once: jaxlib's batched
  Cholesky/eigh split their batch over the intra-op thread pool and block a pool thread
  waiting for it, so two of them running concurrently can deadlock a small (2-core) pool.
  """
  if dependency is None:
    return value
  # A real (if trivial) read of `dependency`: XLA:CPU schedules by buffer use, so an
  # optimization barrier alone does not order the calls. `x * 0.0` is not folded for floats.
  # Each leaf is read through its own reduction over two elements (a one-element or a
  # concatenated reduction is simplified into plain elementwise ops): XLA:CPU does not fuse
  # a reduction into its consumers. Without that boundary, where `dependency` depends
  # elementwise on an earlier `after` (as in `engine.solve_blocks`, through the kept
  # previous results), the probes of all earlier groups fuse into one loop kernel whose
  # scalar expression DAG grows with the number of groups, and LLVM's loop vectorizer
  # takes time exponential in its depth (minutes of compile for an 8-layer MLP's EKFAC).
  probe = sum(jnp.min(jnp.nan_to_num(jnp.ravel(x)[:2].astype(jnp.float32)))
              for x in jax.tree.leaves(dependency))
  zero = jnp.where(jnp.isfinite(probe), probe, 0.0) * 0.0
  return jax.tree.map(
      lambda v: v + zero.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.inexact) else v, value)
