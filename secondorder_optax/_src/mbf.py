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

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from secondorder_optax._src import alias, engine, layerwise, linalg, mini_blocks, validation
from secondorder_optax._src.base import LayerPath, ScalarOrSchedule, path_to_str, stats_dtype
from secondorder_optax._src.damping import relative as relative_damping
from secondorder_optax._src.layerwise import LayerInfo
from secondorder_optax._src.mini_blocks import MBFPartition, MiniBlocks, packed_size, unpack
from secondorder_optax._src.periods import INVERSE_EVERY, STATS_EVERY, Period

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------
# The transformation.


PartitionKey = Union[str, LayerPath]


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


def _layer_diagonal(matrices: Mapping[str, Array]) -> Array:
  """The diagonals of all mini-blocks of a layer, concatenated (their mean is the mean
  eigenvalue of the layer's block-diagonal curvature)."""
  return jnp.concatenate([jnp.diagonal(m, axis1=-2, axis2=-1).reshape(-1)
                          for m in matrices.values()])


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
    shapes = mini_blocks.block_shapes(self.partition(info), info)
    return {g: jnp.zeros((n, packed_size(s)), stats_dtype(info.dtype))
            for g, (n, s) in shapes.items()}

  def init_preconditioner(self, info):
    dtype = linalg.refreshed_dtype(stats_dtype(info.dtype), self.preconditioner_dtype)
    shapes = mini_blocks.block_shapes(self.partition(info), info)
    return {g: jnp.broadcast_to(jnp.eye(s, dtype=dtype), (n, s, s))
            for g, (n, s) in shapes.items()}

  def statistics(self, info, stats):
    dtype = stats_dtype(info.dtype)
    layer = stats.replace(inputs=stats.inputs.astype(dtype),
                          output_grads=stats.output_grads.astype(dtype))
    return self.partition(info).statistics(layer, info)

  def refresh(self, info, statistics, previous, damping, data):
    matrices = {group: unpack(packed, previous[group].shape[-1])
                for group, packed in statistics.items()}
    shift = relative_damping(damping, _layer_diagonal(matrices))
    blocks = {group: engine.Stacked((matrix, jnp.broadcast_to(shift, matrix.shape[:1])))
              for group, matrix in matrices.items()}
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
    counts = ", ".join(f"{g} {n}×{s}" for g, (n, s) in mini_blocks.block_shapes(partition, info).items())
    return f"{partition!r} mini-blocks: {counts}"


def scale_by_mbf(
    *,
    damping: ScalarOrSchedule = 1.0,
    stats_decay: ScalarOrSchedule = 0.95,
    stats_every: Period = STATS_EVERY,
    inverse_every: Period = INVERSE_EVERY,
    block_size: int = 16,
    fisher: str = "empirical",
    preconditioner_dtype: Any = None,
    partitions: Optional[Mapping[PartitionKey, MBFPartition]] = None,
    fallback: Optional[optax.GradientTransformation] = None,
    layers: Union[None, str, Sequence[LayerPath]] = None,
) -> optax.GradientTransformationExtraArgs:
  """MBF preconditioner: `(M_b + λI)⁻¹ ∇|_b` on every mini-block b of every captured layer.

  MBF is an *empirical* Fisher method: capture the curvature with
  `soo.linen_curvature(model, loss, fisher="empirical")`. Statistics captured at sampled
  targets raise an error unless `fisher="sampled"` asks for them (mini-blocks of the true
  Fisher instead).

  The arguments are those of `soo.mbf` (all but the first four).

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
    found = layerwise.find_layers(layerwise.to_pure(params),
                                  layerwise.coverage_layers("mbf", layers)[0])
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
    learning_rate: optax.ScalarOrSchedule = 0.1,
    *,
    damping: ScalarOrSchedule = 0.03,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    kl_clip: Optional[float] = 0.02,
    stats_decay: ScalarOrSchedule = 0.95,
    stats_every: Period = STATS_EVERY,
    inverse_every: Period = INVERSE_EVERY,
    block_size: int = 16,
    fisher: str = "empirical",
    preconditioner_dtype: Any = None,
    partitions: Optional[Mapping[PartitionKey, MBFPartition]] = None,
    fallback: Optional[optax.GradientTransformation] = None,
    fallback_learning_rate: optax.ScalarOrSchedule = 1e-3,
    layers: Union[None, str, Sequence[LayerPath]] = None,
) -> optax.GradientTransformationExtraArgs:
  """The MBF optimizer: `scale_by_mbf` + decoupled weight decay + momentum + learning rate.

  Args:
    learning_rate: a number or an optax schedule.
    damping: relative damping λ (read at inverse refreshes): every mini-block of a layer gets
      `λ` times the mean of the layer's block diagonals (`soo` DESIGN §6). Default 0.03
      (chosen with `kl_clip` 0.03): two epochs of the full MNIST autoencoder end at 73.7
      (87.4 at the former 0.3 / 0.01, 77.0 at 0.1, 74.2 at 0.01; `docs/defaults.md`).
    momentum: `β` of the debiased EMA of the preconditioned directions, restarted at the
      refreshes of the preconditioner while `inverse_every` grows (`soo.restarting_ema`;
      with the default, up to step 96), then one average: on the full MNIST autoencoder
      each later restart raised the loss for a few steps (eight rises, up to 2.7; 59.13
      after ten epochs against 59.88 restarting at every refresh, 60.78 with a plain EMA,
      which starts slowly; `docs/defaults.md`, tenth round; the other methods' momentum
      restarts the same way). An integer `inverse_every` restarts it at every refresh.
      `None` or 0 for none (68.69 after ten epochs).
    weight_decay: decoupled weight decay.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change exceeds κ
      (`soo.clip_by_kl`). The clip sets MBF's step length at the defaults (learning rates
      0.1 and 0.2 trained identically); without it the autoencoder diverged. Default 0.02:
      at 0.03 the digits MLP ended three seeds at 0.056, 1.03 (a spike above Adam's 0.46)
      and 0.137, at 0.02 at 0.058, 0.051 and 0.059; the autoencoder's curve is the same
      within 0.45 (`docs/defaults.md`, ninth round). The spikes came from steps the
      mini-blocks underestimate; the exact model cap that `soo.clip_by_kl` now applies to
      a classifier's steps removes them (seed 1 at 0.03: 0.038), and the digits end at
      0.032 / 0.038 / 0.032 at 0.02 (thirteenth round).
    stats_decay: EMA weight of the old statistics.
    stats_every: statistics are updated at steps with `count % stats_every == 0` (an
      integer or a schedule `count -> period`; default `soo.growing_period(5)`).
    inverse_every: inverses are recomputed at steps with `count % inverse_every == 0`;
      default `soo.growing_period(50)`, frequent early and every 50 steps later
      (`docs/defaults.md`).
    block_size: chunk length of the default `MiniBlocks` partition of dense kernels.
    fisher: which capture the statistics must come from, `"empirical"` (default, the
      paper's) or `"sampled"`; a curvature with the other `fisher` raises a `ValueError`.
    preconditioner_dtype: dtype in which the mini-block inverses are stored and applied
      (default: the statistics' dtype, float32 at least); `jnp.bfloat16` halves the
      largest part of MBF's state and the memory traffic of applying it, with float32
      sums and a float32 direction.
    partitions: optional per-layer partitions overriding `MiniBlocks(block_size)`, keyed by
      layer path (`"Encoder_0/Dense_1"` or `("Encoder_0", "Dense_1")`).
    fallback: transformation for parameter leaves outside captured layers (default
      `optax.adamw(fallback_learning_rate, weight_decay=weight_decay)`, as optax's Muon
      does for non-matrix leaves); `soo.describe(tx, params)` lists the rule of every leaf.
    fallback_learning_rate: the default fallback's learning rate (Adam's own scale).
    layers: as `soo.kfac`: `None` (every kernel/bias node), `'captured'` (the layers the
      step's curvature records; the others go to `fallback`) or an explicit list of paths.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` takes `curvature=`. Under
    `optax.inject_hyperparams` every argument may be injected (`block_size` is read from
    the state after `init`).

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
