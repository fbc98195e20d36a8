"""Mini-block partitions of a layer's matrix view, and their packed statistics (MBF, DESIGN §5).

A partition (`MBFPartition`) cuts a layer's matrix view `W̄ = [kernel; bias]` into named
groups of same-size blocks and back; `MiniBlocks` is the MBF paper's, `RowBlocks` one block
per output unit. A block's statistic `E_n[vec(D_n|_b) vec(D_n|_b)ᵀ]` is stored packed (its
upper triangle); dense layers seen once per example get it without per-example gradients,
as a weighted Gram of input chunks.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from secondorder_optax._src import patches
from secondorder_optax._src.base import LayerStats
from secondorder_optax._src.layerwise import LayerInfo

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------
# Packed symmetric storage: a size-s block is stored as its upper triangle (s(s+1)/2).


@functools.lru_cache(maxsize=None)
def _triu_indices(size: int) -> Tuple[np.ndarray, np.ndarray]:
  return np.triu_indices(size)


@functools.lru_cache(maxsize=None)
def _symmetric_gather(size: int) -> np.ndarray:
  """`(size, size)` positions of each entry of a symmetric block in its packed vector."""
  rows, cols = _triu_indices(size)
  where = np.zeros((size, size), np.int32)
  where[rows, cols] = np.arange(rows.size)
  where[cols, rows] = np.arange(rows.size)
  return where


def packed_size(size: int) -> int:
  """Length `size (size + 1) / 2` of a packed symmetric `size × size` block."""
  return size * (size + 1) // 2


def pack(blocks: Array) -> Array:
  """`(..., s, s)` symmetric blocks -> `(..., s(s+1)/2)` upper triangles (row-major)."""
  rows, cols = _triu_indices(blocks.shape[-1])
  return blocks[..., rows, cols]


def unpack(packed: Array, size: int) -> Array:
  """Inverse of `pack`: `(..., s(s+1)/2)` -> symmetric `(..., s, s)`."""
  return packed[..., _symmetric_gather(size)]


def packed_gram(vectors: Array) -> Array:
  """`E_n[v_n v_nᵀ]` of per-example block vectors `(B, num_blocks, s)`, packed."""
  gram = jnp.einsum("bns,bnr->nsr", vectors, vectors, precision=_HIGHEST)
  return pack(gram) / vectors.shape[0]


def weighted_chunk_gram(chunks: Array, weights: Array) -> Array:
  """`E_n[w_{n,j} x_{n,c} x_{n,c}ᵀ]` for every unit j and chunk c, packed.

  The dense mini-block statistic without per-example weight gradients: for a layer seen once
  per example, `D_n|_{(j, c)} = g_{n,j} ā_{n,c}`, so its Gram is the Gram of the input chunk
  weighted by `g_{n,j}²`. One matrix product over the batch computes all of them, on the
  upper triangles only.

  Args:
    chunks: `(B, C, s)` input chunks.
    weights: `(B, d_out)` per-example weights (squared output gradients).

  Returns:
    `(d_out * C, s(s+1)/2)`, block `(j, c)` at row `j * C + c`.
  """
  rows, cols = _triu_indices(chunks.shape[-1])
  products = chunks[..., rows] * chunks[..., cols]
  gram = jnp.einsum("bj,bcp->jcp", weights, products, precision=_HIGHEST) / chunks.shape[0]
  return gram.reshape((-1, gram.shape[-1]))


# --------------------------------------------------------------------------------------
# Partitions.


class MBFPartition(abc.ABC):
  """How one layer's matrix view `W̄ = [kernel; bias]` is cut into mini-blocks.

  A partition maps a `(d_in [+1], d_out)` matrix (a gradient, a direction or one example's
  weight gradient `D_n`) to named groups of same-size blocks, `{name: (num_blocks, size)}`,
  and back. Every entry must be in exactly one block. Subclasses implement `split` and
  `merge`; `statistics` has a generic version (per-example gradients, then `split`) that a
  subclass may replace by a cheaper formula. Partitions should be frozen dataclasses (they
  are static configuration and compared by value).
  """

  @abc.abstractmethod
  def split(self, matrix: Array, info: LayerInfo) -> Dict[str, Array]:
    """`(d_in [+1], d_out)` matrix -> `{group: (num_blocks, size)}`."""

  @abc.abstractmethod
  def merge(self, blocks: Mapping[str, Array], info: LayerInfo) -> Array:
    """Inverse of `split`."""

  def statistics(self, stats: LayerStats, info: LayerInfo) -> Dict[str, Array]:
    """Packed `E_n[vec(D_n|_b) vec(D_n|_b)ᵀ]` of every block: `{group: (num_blocks, s(s+1)/2)}`."""
    per_example = patches.per_example_grads(stats)
    vectors = jax.vmap(lambda d: self.split(d, info))(per_example)
    return {name: packed_gram(v) for name, v in vectors.items()}


def _is_dense(info: LayerInfo) -> bool:
  return len(info.kernel_shape) == 2


def _seen_once(stats: LayerStats) -> bool:
  """A dense layer applied once per example (no locations, no repeated calls)."""
  return stats.kind == "dense" and patches.num_locations(stats) == 1


@dataclasses.dataclass(frozen=True)
class MiniBlocks(MBFPartition):
  """The MBF paper's partition (the default).

  * Dense kernel `(d_in, d_out)`: for every output unit j, its incoming weights
    `kernel[:, j]` in contiguous chunks of `block_size` inputs; group `"chunks"` holds the
    full chunks (block `j * C + c` is chunk c of unit j), group `"last_chunk"` the shorter
    remainder of each unit when `block_size` does not divide `d_in`. With
    `block_size >= d_in` each unit's kernel weights are one block.
  * Conv kernel `(*kernel_size, c_in, c_out)`: group `"spatial"`, one block of
    `prod(kernel_size)` weights per `(c_in, c_out)` pair (block `i * c_out + o`).
  * Bias: group `"bias"`, one 1×1 block per unit.

  Attributes:
    block_size: chunk length for dense kernels (ignored for convolutions).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_mbf(damping=1e-2, partitions={"Dense_0": soo.MiniBlocks(2)})
    >>> state = tx.init({"Dense_0": {"kernel": jnp.ones((5, 3)), "bias": jnp.ones(3)}})
    >>> {g: x.shape for g, x in state.preconditioner["Dense_0"].items()}
    {'bias': (3, 1, 1), 'chunks': (6, 2, 2), 'last_chunk': (3, 1, 1)}
  """

  block_size: int = 16

  def __post_init__(self):
    if not isinstance(self.block_size, (int, np.integer)) or self.block_size < 1:
      raise ValueError(f"MiniBlocks: block_size must be an integer >= 1, got {self.block_size!r}")

  def split(self, matrix, info):
    d_rows = math.prod(info.kernel_shape[:-1])
    kernel, d_out = matrix[:d_rows], matrix.shape[-1]
    groups = {}
    if _is_dense(info):
      full, rest = divmod(d_rows, self.block_size)
      if full:
        chunked = kernel[:full * self.block_size].reshape(full, self.block_size, d_out)
        groups["chunks"] = chunked.transpose(2, 0, 1).reshape(d_out * full, self.block_size)
      if rest:
        groups["last_chunk"] = kernel[full * self.block_size:].T
    else:
      spatial, c_in = math.prod(info.kernel_shape[:-2]), info.kernel_shape[-2]
      blocks = kernel.reshape(spatial, c_in, d_out).transpose(1, 2, 0)
      groups["spatial"] = blocks.reshape(c_in * d_out, spatial)
    if info.has_bias:
      groups["bias"] = matrix[d_rows][:, None]
    return groups

  def merge(self, blocks, info):
    d_rows = math.prod(info.kernel_shape[:-1])
    d_out = info.kernel_shape[-1]
    parts = []
    if _is_dense(info):
      full, rest = divmod(d_rows, self.block_size)
      if full:
        chunked = blocks["chunks"].reshape(d_out, full, self.block_size)
        parts.append(chunked.transpose(1, 2, 0).reshape(full * self.block_size, d_out))
      if rest:
        parts.append(blocks["last_chunk"].T)
    else:
      spatial, c_in = math.prod(info.kernel_shape[:-2]), info.kernel_shape[-2]
      kernel = blocks["spatial"].reshape(c_in, d_out, spatial).transpose(2, 0, 1)
      parts.append(kernel.reshape(spatial * c_in, d_out))
    if info.has_bias:
      parts.append(blocks["bias"].T)
    return jnp.concatenate(parts, axis=0)

  def statistics(self, stats, info):
    if not _seen_once(stats):
      return super().statistics(stats, info)
    inputs = patches.layer_inputs(stats, homogeneous=False)[:, 0]
    out_sq = jnp.square(patches.layer_output_grads(stats)[:, 0])
    batch, d_in = inputs.shape
    full, rest = divmod(d_in, self.block_size)
    groups = {}
    if full:
      chunks = inputs[:, :full * self.block_size].reshape(batch, full, self.block_size)
      groups["chunks"] = weighted_chunk_gram(chunks, out_sq)
    if rest:
      groups["last_chunk"] = weighted_chunk_gram(inputs[:, None, full * self.block_size:], out_sq)
    if info.has_bias:
      groups["bias"] = jnp.mean(out_sq, axis=0)[:, None]
    return groups


@dataclasses.dataclass(frozen=True)
class RowBlocks(MBFPartition):
  """One block per output unit: all its incoming weights and its bias (group `"rows"`).

  For narrow layers where a unit's whole row of `W̄` (`prod(kernel.shape[:-1]) + 1` entries
  with a bias) is small enough to invert; block j is column j of the matrix view.
  """

  def split(self, matrix, info):
    del info
    return {"rows": matrix.T}

  def merge(self, blocks, info):
    del info
    return blocks["rows"].T

  def statistics(self, stats, info):
    if not _seen_once(stats):
      return super().statistics(stats, info)
    inputs = patches.layer_inputs(stats)[:, 0]
    out_sq = jnp.square(patches.layer_output_grads(stats)[:, 0])
    return {"rows": weighted_chunk_gram(inputs[:, None], out_sq)}


def block_shapes(partition: MBFPartition, info: LayerInfo) -> Dict[str, Tuple[int, int]]:
  """`{group: (num_blocks, size)}` of a layer, checked to round-trip through `merge`."""
  matrix = jax.ShapeDtypeStruct(info.matrix_shape, jnp.float32)
  name = type(partition).__name__
  try:
    groups = jax.eval_shape(lambda m: partition.split(m, info), matrix)
    merged = jax.eval_shape(lambda m: partition.merge(partition.split(m, info), info), matrix)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"mbf: partition {name} cannot split layer {info.key} with kernel shape "
                     f"{info.kernel_shape}: {e}") from e
  shapes = {g: tuple(s.shape) for g, s in groups.items()}
  bad = {g: s for g, s in shapes.items() if len(s) != 2}
  if bad or tuple(merged.shape) != tuple(info.matrix_shape):
    raise ValueError(f"mbf: partition {name} of layer {info.key} must split the "
                     f"{info.matrix_shape} matrix view into (num_blocks, size) groups and merge "
                     f"them back; got groups {shapes} merging to {tuple(merged.shape)}")
  entries = sum(n * s for n, s in shapes.values())
  if entries != math.prod(info.matrix_shape):
    raise ValueError(f"mbf: partition {name} of layer {info.key} has {entries} block entries "
                     f"for a matrix view of {math.prod(info.matrix_shape)}; every entry must be "
                     f"in exactly one block")
  return shapes
