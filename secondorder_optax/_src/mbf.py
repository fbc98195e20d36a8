"""MBF: the Mini-Block Fisher method (Bahamou, Goldfarb & Ren, AISTATS 2023; DESIGN §5).

Every captured layer's block of the empirical Fisher is approximated by a block-diagonal
matrix of many small *mini-blocks*. A mini-block `b` is a set of entries of the layer's
matrix view `W̄ = [kernel; bias]` (DESIGN §4); its statistic is

    M_b = EMA of E_n[vec(D_n|_b) vec(D_n|_b)ᵀ]

with `D_n` the per-example weight gradient, and the direction on the block is
`(M_b + λI)⁻¹ ∇|_b`.

Which entries form the mini-blocks is a pluggable `MBFPartition`, chosen per layer:

* `MiniBlocks(block_size)` (default, the paper's): a conv kernel `(kh, kw, c_in, c_out)` gives
  one `kh·kw` block per `(c_in, c_out)` pair; a dense kernel gives, for every output unit,
  its incoming weights in contiguous chunks of `block_size` inputs (a last, shorter chunk
  when `block_size` does not divide `d_in`); the bias gives one 1×1 block per unit.
* `RowBlocks()`: one block per output unit over all its incoming weights and its bias (for
  narrow layers).

Cost: statistics of dense layers seen once per example are weighted Grams of input chunks
(`E_n[g_{n,j}² ā_c ā_cᵀ]`, one matrix product for the whole layer, only the upper triangle),
so per-example weight gradients are never formed; conv layers (and dense layers seen at
several locations per example) form them once per statistics refresh. All mini-blocks of
equal size in the whole model are damped and inverted by Cholesky in one batched call under
`lax.cond`; the inverses live in the state, so other steps only apply them.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from secondorder_optax._src import alias, engine, layerwise, linalg, patches, validation
from secondorder_optax._src.base import (LayerPath, LayerStats, ScalarOrSchedule, path_to_str,
                                         stats_dtype)
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


# --------------------------------------------------------------------------------------
# The transformation.


PartitionKey = Union[str, LayerPath]


def _block_shapes(partition: MBFPartition, info: LayerInfo) -> Dict[str, Tuple[int, int]]:
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


def _normalize_overrides(partitions: Optional[Mapping[PartitionKey, MBFPartition]]
                         ) -> Dict[str, MBFPartition]:
  out = {}
  for key, partition in (partitions or {}).items():
    name = key if isinstance(key, str) else path_to_str(tuple(key))
    if not isinstance(partition, MBFPartition):
      raise ValueError(f"mbf: partitions[{key!r}] must be an MBFPartition (e.g. "
                       f"soo.MiniBlocks(8) or soo.RowBlocks()), got {type(partition).__name__}")
    out[name] = partition
  return out


def _apply_inverses(inverses: Array, vectors: Array) -> Array:
  """`inverses[n] @ vectors[n]` for every block n (float32 result at least).

  Narrower stored inverses (`preconditioner_dtype`) are widened inside an elementwise
  product-sum: XLA:CPU has no fast batched matrix-vector product for bfloat16 (measured
  ~6x slower than float32 on 177k 16x16 blocks), the fused product-sum runs at float32's
  speed on half the bytes.
  """
  dtype = stats_dtype(vectors.dtype)
  if inverses.dtype == dtype:
    return jnp.einsum("nij,nj->ni", inverses, vectors.astype(dtype), precision=_HIGHEST)
  return jnp.sum(inverses.astype(dtype) * vectors.astype(dtype)[:, None, :], axis=-1)


@dataclasses.dataclass(frozen=True)
class MBF(engine.Algorithm):
  """Mini-block Fisher: `(M_b + λI)⁻¹ ∇|_b` on every mini-block b of a layer.

  Attributes:
    default_partition: the partition of layers without an override.
    overrides: `((layer key, partition), ...)`.
    preconditioner_dtype: dtype of the stored inverses (`None`: the statistics' dtype).
  """

  name = "mbf"
  default_partition: MBFPartition = MiniBlocks()
  overrides: Tuple[Tuple[str, MBFPartition], ...] = ()
  preconditioner_dtype: Any = None

  def partition(self, info: LayerInfo) -> MBFPartition:
    return dict(self.overrides).get(info.key, self.default_partition)

  def init_statistics(self, info):
    shapes = _block_shapes(self.partition(info), info)
    return {g: jnp.zeros((n, packed_size(s)), stats_dtype(info.dtype))
            for g, (n, s) in shapes.items()}

  def init_preconditioner(self, info):
    dtype = linalg.refreshed_dtype(stats_dtype(info.dtype), self.preconditioner_dtype)
    shapes = _block_shapes(self.partition(info), info)
    return {g: jnp.broadcast_to(jnp.eye(s, dtype=dtype), (n, s, s))
            for g, (n, s) in shapes.items()}

  def statistics(self, info, stats):
    dtype = stats_dtype(info.dtype)
    layer = stats.replace(inputs=stats.inputs.astype(dtype),
                          output_grads=stats.output_grads.astype(dtype))
    return self.partition(info).statistics(layer, info)

  def refresh(self, info, statistics, previous, damping, data):
    blocks = {}
    for group, packed in statistics.items():
      size = previous[group].shape[-1]
      blocks[group] = engine.Stacked((unpack(packed, size),
                                      jnp.broadcast_to(damping, packed.shape[:1])))
    return blocks, dict

  def solve(self, block):
    matrix, damping = block
    return linalg.checked_damped_inverse(matrix, damping.astype(matrix.dtype))

  def apply(self, info, inverses, statistics, grad, damping):
    partition = self.partition(info)
    blocks = partition.split(grad, info)
    return partition.merge({g: _apply_inverses(inverses[g], b) for g, b in blocks.items()},
                           info)

  def describe(self, info):
    partition = self.partition(info)
    counts = ", ".join(f"{g} {n}×{s}" for g, (n, s) in _block_shapes(partition, info).items())
    return f"{partition!r} mini-blocks: {counts}"


def scale_by_mbf(
    *,
    damping: ScalarOrSchedule,
    stats_decay: ScalarOrSchedule = 0.95,
    stats_every: int = 1,
    inverse_every: int = 20,
    block_size: int = 16,
    fisher: str = "empirical",
    preconditioner_dtype: Any = None,
    partitions: Optional[Mapping[PartitionKey, MBFPartition]] = None,
    fallback: Optional[optax.GradientTransformation] = None,
    layers: Optional[Sequence[LayerPath]] = None,
) -> optax.GradientTransformationExtraArgs:
  """MBF preconditioner: `(M_b + λI)⁻¹ ∇|_b` on every mini-block b of every captured layer.

  MBF is an *empirical* Fisher method: capture the curvature with
  `soo.linen_curvature(model, loss, fisher="empirical")`. Statistics captured at sampled
  targets raise an error unless `fisher="sampled"` asks for them (mini-blocks of the true
  Fisher instead).

  Args:
    damping: λ added to every mini-block before inversion (number or optax schedule; read
      at inverse refreshes).
    stats_decay: EMA weight of the old statistics.
    stats_every: statistics are updated at steps with `count % stats_every == 0`.
    inverse_every: inverses are recomputed at steps with `count % inverse_every == 0`.
    block_size: chunk length of the default `MiniBlocks` partition of dense kernels.
    fisher: which capture the statistics must come from, `"empirical"` (default, the
      paper's) or `"sampled"`; a curvature with the other `fisher` raises a `ValueError`.
    preconditioner_dtype: dtype in which the mini-block inverses are stored and applied
      (default: the statistics' dtype, float32 at least); `jnp.bfloat16` halves the
      largest part of MBF's state and the memory traffic of applying it, with float32
      sums and a float32 direction.
    partitions: optional per-layer partitions overriding `MiniBlocks(block_size)`, keyed by
      layer path (`"Encoder_0/Dense_1"` or `("Encoder_0", "Dense_1")`).
    fallback: transformation for leaves outside captured layers (default identity).
    layers: optional explicit list of layer paths to precondition.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` takes `curvature=`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, secondorder_optax as soo
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((8, 5)), jnp.arange(8) % 3
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy,
    ...                               fisher="empirical")
    >>> loss, grads, curvature = curv_fn(params, x, y, jax.random.key(1))
    >>> tx = soo.scale_by_mbf(damping=1e-3, block_size=2)
    >>> state = tx.init(params)
    >>> direction, state = tx.update(grads, state, params, curvature=curvature)
    >>> direction["kernel"].shape
    (5, 3)
  """
  validation.check_fisher("mbf", fisher)
  overrides = tuple(sorted(_normalize_overrides(partitions).items()))
  dtype = validation.check_preconditioner_dtype("mbf", preconditioner_dtype)
  static_block_size = validation.check_structural_int("mbf", "block_size", block_size)

  def build(size: int) -> optax.GradientTransformationExtraArgs:
    return layerwise.layer_transformation(
        MBF(MiniBlocks(size), overrides, dtype), damping=damping, stats_decay=stats_decay,
        stats_every=stats_every, inverse_every=inverse_every, fallback=fallback,
        layers=layers, fisher=fisher,
        needs=f"per-layer inputs and output gradients, captured with fisher='{fisher}'")

  build(static_block_size or 16)  # Checks the shared arguments now.

  def init_fn(params):
    found = layerwise.find_layers(layerwise.to_pure(params), layers)
    unknown = sorted(set(dict(overrides)) - set(found))
    if unknown:
      raise ValueError(f"mbf: partitions= names layer(s) {unknown} that are not preconditioned "
                       f"layers of params (found: {sorted(found)})")
    if static_block_size is None:
      raise ValueError("mbf: block_size fixes the state's shapes and must be concrete at init")
    return build(static_block_size).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    size = static_block_size
    if size is None:  # Traced by inject_hyperparams: the state's shapes hold it.
      size = _state_block_size(state, dict(overrides))
    return build(size).update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _state_block_size(state: engine.PreconditionerState, overrides: Mapping[str, Any]) -> int:
  """The default partition's chunk length, read from the state: the size of any full chunk;
  without one, every dense layer is one chunk per unit and any size above them all does."""
  for key, groups in state.preconditioner.items():
    if key not in overrides and "chunks" in groups:
      return int(groups["chunks"].shape[-1])
  return max([g.shape[-1] for groups in state.preconditioner.values()
              for g in groups.values()] + [1])


def mbf(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: ScalarOrSchedule,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    kl_clip: Optional[float] = None,
    stats_decay: ScalarOrSchedule = 0.95,
    stats_every: int = 1,
    inverse_every: int = 20,
    block_size: int = 16,
    fisher: str = "empirical",
    preconditioner_dtype: Any = None,
    partitions: Optional[Mapping[PartitionKey, MBFPartition]] = None,
    fallback: Optional[optax.GradientTransformation] = None,
    layers: Optional[Sequence[LayerPath]] = None,
) -> optax.GradientTransformationExtraArgs:
  """The MBF optimizer: `scale_by_mbf` + decoupled weight decay + momentum + learning rate.

  Args:
    learning_rate: a number or an optax schedule.
    damping: λ added to every mini-block (see `scale_by_mbf`).
    momentum: heavy-ball momentum; `None` or 0 for none.
    weight_decay: decoupled weight decay.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change exceeds κ
      (`soo.clip_by_kl`).
    stats_decay: EMA weight of the old statistics.
    stats_every: steps between statistics updates.
    inverse_every: steps between inverse refreshes.
    block_size: chunk length of dense kernels in the default `MiniBlocks` partition.
    fisher: `"empirical"` (default) or `"sampled"`: the capture the statistics come from.
    preconditioner_dtype: as in `scale_by_mbf`.
    partitions: optional per-layer `MBFPartition` overrides keyed by layer path.
    fallback: transformation for leaves outside captured layers.
    layers: optional explicit list of layer paths to precondition.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` takes `curvature=`. With
    `optax.inject_hyperparams`, pass the integer arguments (`stats_every`, `inverse_every`,
    `block_size`) through `static_args`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, secondorder_optax as soo
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((8, 5)), jnp.arange(8) % 3
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy,
    ...                               fisher="empirical")
    >>> tx = soo.mbf(0.1, damping=1e-2)
    >>> state = tx.init(params)
    >>> loss, grads, curvature = curv_fn(params, x, y, jax.random.key(1))
    >>> updates, state = tx.update(grads, state, params, curvature=curvature)
    >>> params = optax.apply_updates(params, updates)
  """
  return alias.optimizer(scale_by_mbf, **locals())
