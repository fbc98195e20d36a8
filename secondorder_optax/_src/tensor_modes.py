"""Per-mode (Kronecker) factors of parameter tensors, shared by TNT and Shampoo (DESIGN §5).

Each parameter leaf is viewed as a tensor with modes `(d_1, ..., d_k)`:

* a 0-d scalar has one mode of size 1;
* a vector `(d,)` has one mode, a matrix `(d_in, d_out)` two;
* a rank-3 tensor keeps its three axes;
* a tensor of rank 4 or more merges all but its last two axes, so that a conv kernel
  `(kh, kw, c_in, c_out)` becomes `(kh·kw, c_in, c_out)`;
* axes of size 1 are dropped (they would carry a trivial 1×1 factor).

Every mode carries a symmetric `d_i × d_i` factor, or only its diagonal (a `(d_i,)` vector)
when `d_i` is above `max_factor_dim` or the leaf is a scalar. Whether a factor is diagonal
is visible in its shape, so an optimizer's `update` reads the layout from its state and
needs no static hyperparameters.

Functions here: the layout (`mode_layout`), the per-mode second moments of a tensor
(`mode_statistics`: contraction over all the other modes), applying one factor per mode
(`apply_factors`: `X ×_1 F_1 ×_2 … ×_k F_k`), and `LeafCoverage`, which makes every
parameter leaf one unit of the refresh engine (TNT, Shampoo).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from secondorder_optax._src import blocking, engine, layerwise, linalg, validation
from secondorder_optax._src.base import Curvature, path_to_str, stats_dtype

Array = jax.Array
Factors = Tuple[Array, ...]


@dataclasses.dataclass(frozen=True)
class ModeLayout:
  """How one parameter leaf is seen as a tensor with per-mode factors.

  Attributes:
    shape: the leaf's own shape.
    modes: the mode sizes `(d_1, ..., d_k)`; their product is the leaf's size.
    diagonal: per mode, whether its factor is kept as a diagonal only.
    dtype: the dtype of its statistics (the leaf's, float32 at least).
  """

  shape: Tuple[int, ...]
  modes: Tuple[int, ...]
  diagonal: Tuple[bool, ...]
  dtype: Any = jnp.dtype(jnp.float32)

  @property
  def order(self) -> int:
    """The number of modes `k`."""
    return len(self.modes)

  @property
  def size(self) -> int:
    return math.prod(self.modes)


def tensor_modes(shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The mode sizes of a leaf of this shape (see the module docstring)."""
  shape = tuple(int(d) for d in shape)
  if len(shape) >= 4:
    shape = (math.prod(shape[:-2]),) + shape[-2:]
  modes = tuple(d for d in shape if d != 1)
  if not modes:
    return (1,)
  return modes


def mode_layout(shape: Tuple[int, ...], max_factor_dim: int, dtype: Any = jnp.float32,
                block_size: Optional[int] = None) -> ModeLayout:
  """The layout of a leaf: its modes, diagonal where scalar or where the mode's longest
  block (the whole mode without `block_size`) is above `max_factor_dim`."""
  modes = tensor_modes(shape)
  scalar = math.prod(shape) == 1
  longest = lambda d: blocking.segments(d, block_size)[0][1]  # the longer segments first
  return ModeLayout(shape=tuple(shape), modes=modes,
                    diagonal=tuple(scalar or longest(d) > max_factor_dim for d in modes),
                    dtype=stats_dtype(dtype))


def layout_from_factors(shape: Tuple[int, ...], factors: Factors) -> ModeLayout:
  """The layout of a leaf whose factors (full `(d, d)` or diagonal `(d,)`) are given."""
  modes = tensor_modes(shape)
  if len(factors) != len(modes) or any(f.shape[0] != d for f, d in zip(factors, modes)):
    raise ValueError(
        f"a leaf of shape {tuple(shape)} has modes {modes}, but the optimizer state holds "
        f"factors of shapes {[tuple(f.shape) for f in factors]}; was the state initialised "
        f"for other parameters?")
  return ModeLayout(shape=tuple(shape), modes=modes,
                    diagonal=tuple(f.ndim == 1 for f in factors), dtype=factors[0].dtype)


def layouts(params: Any, max_factor_dim: int) -> Dict[str, ModeLayout]:
  """The layout of every leaf of `params`, keyed by leaf key, in `jax.tree.leaves` order."""
  return {key: mode_layout(jnp.shape(leaf), max_factor_dim, jnp.asarray(leaf).dtype)
          for key, leaf in zip(leaf_keys(params), jax.tree.leaves(params))}


def describe_layout(layout: ModeLayout) -> str:
  """E.g. `"modes (9, 3, 4), full factors"` or `"modes (500, 8), diagonal: mode 0"`."""
  text = f"modes {layout.modes}"
  diagonal = [i for i, diag in enumerate(layout.diagonal) if diag]
  if not diagonal:
    return f"{text}, full factors"
  if len(diagonal) == layout.order:
    return f"{text}, diagonal factors"
  return f"{text}, diagonal: mode{'s' if len(diagonal) > 1 else ''} " + ", ".join(
      str(i) for i in diagonal)


def zero_factors(layout: ModeLayout, dtype: Any) -> Factors:
  """Zero statistics: `(d, d)` per full mode, `(d,)` per diagonal mode."""
  return tuple(jnp.zeros((d,) if diag else (d, d), dtype)
               for d, diag in zip(layout.modes, layout.diagonal))


def identity_factors(layout: ModeLayout, dtype: Any) -> Factors:
  """Identity preconditioners in the layout's factor shapes."""
  return tuple(jnp.ones((d,), dtype) if diag else jnp.eye(d, dtype=dtype)
               for d, diag in zip(layout.modes, layout.diagonal))


def to_modes(leaf: Array, layout: ModeLayout) -> Array:
  return jnp.reshape(leaf, layout.modes)


def from_modes(tensor: Array, layout: ModeLayout) -> Array:
  return jnp.reshape(tensor, layout.shape)


def mode_statistics(tensor: Array, layout: ModeLayout) -> Factors:
  """Per mode i, `contract_all_but_i(X, X)` (`X_(i) X_(i)ᵀ`), or its diagonal only."""
  stats = []
  for i, diag in enumerate(layout.diagonal):
    others = tuple(j for j in range(layout.order) if j != i)
    if diag:
      stats.append(jnp.sum(jnp.square(tensor), axis=others))
    else:
      stats.append(linalg.symmetric_gram(tensor, axis=i))
  return tuple(stats)


def factor_trace(factor: Array) -> Array:
  """Trace of a full factor, or sum of a diagonal one."""
  return jnp.sum(factor) if factor.ndim == 1 else jnp.trace(factor)


def apply_factors(tensor: Array, factors: Factors) -> Array:
  """`X ×_1 F_1 ×_2 … ×_k F_k` (`(X ×_i F)[…a…] = Σ_b F[a, b] X[…b…]`).

  Each product runs in the factor's dtype (`linalg.tensordot`: a bfloat16 factor
  multiplies in bfloat16 with float32 sums); the result keeps the tensor's dtype.
  """
  dtype = tensor.dtype
  for i, factor in enumerate(factors):
    if factor.ndim == 1:
      shape = [1] * tensor.ndim
      shape[i] = factor.shape[0]
      tensor = tensor * factor.reshape(shape).astype(dtype)
    else:
      tensor = jnp.moveaxis(linalg.tensordot(factor, tensor, axes=(1, i)), 0, i)
  return tensor.astype(dtype)


def leaf_keys(tree: Any) -> Tuple[str, ...]:
  """`"Dense_0/kernel"`-style keys of a tree's leaves, in `jax.tree.leaves` order."""
  keys = tuple(path_to_str(p) for p in layerwise.leaf_paths(tree))
  if len(set(keys)) != len(keys):
    raise ValueError(f"parameter leaf paths are ambiguous as '/'-joined keys: {keys}")
  return keys


@dataclasses.dataclass(frozen=True)
class ModeAlgorithm(engine.Algorithm):
  """What TNT and Shampoo share: per-mode statistics of a leaf's gradient tensor, an identity
  preconditioner per mode to start from, and the per-mode product as the direction."""

  preconditioner_dtype: Any = None

  def init_statistics(self, layout):
    return zero_factors(layout, layout.dtype)

  def init_preconditioner(self, layout):
    return identity_factors(layout,
                            linalg.refreshed_dtype(layout.dtype, self.preconditioner_dtype))

  def statistics(self, layout, grad):
    return mode_statistics(grad, layout)

  def apply(self, layout, factors, statistics, grad, damping):
    return apply_factors(grad, factors)

  def describe(self, layout):
    return describe_layout(layout)


def _check_leaves(method: str, source: Any, updates: Any, what: str) -> None:
  """Same leaves (count and shapes, in order) as the updates. Containers may differ: an
  `nnx.State` of `nnx.Param`s and the plain `nnx.State` that `nnx.Optimizer` passes hold the
  same leaves."""
  source_shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(source)]
  update_shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(updates)]
  if source_shapes != update_shapes:
    raise ValueError(
        f"{method}: {what} must have the leaves of the updates; got leaf shapes "
        f"{source_shapes} for updates {update_shapes}")


@dataclasses.dataclass(frozen=True)
class LeafCoverage(engine.Coverage):
  """Every parameter leaf is a unit, seen as a tensor with per-mode factors, or, with
  `block_size`, cut into blocks that are units of their own (`blocking`).

  Attributes:
    max_factor_dim: modes (with `block_size`: modes whose blocks are) larger than this keep
      a diagonal factor (read at `init`; at
      `update` the layout is read from the factor shapes in the state, so this may be
      traced by `optax.inject_hyperparams`).
    uses_curvature: the statistics come from `curvature.fisher_grads` when a curvature is
      given (TNT), else from `statistics_grads=` or the updates; without it (Shampoo) they
      always come from the updates.
    block_size: `None`, or full modes longer than this are cut into nearly equal segments
      and the leaf into the blocks they make (block-diagonal factors).
  """

  max_factor_dim: Optional[int] = None
  uses_curvature: bool = False
  block_size: Optional[int] = None

  def leaf_layout(self, leaf: Any) -> ModeLayout:
    """The layout of a whole leaf at `init` (its diagonal modes): a mode above
    `max_factor_dim` is cut into blocks when they fit under it, else kept diagonal."""
    return mode_layout(jnp.shape(leaf), self.max_factor_dim, jnp.asarray(leaf).dtype,
                       self.block_size)

  def _cut(self, key: str, shape: Tuple[int, ...], diagonal: Tuple[bool, ...]
           ) -> Tuple[Tuple[str, ...], Optional[blocking.Partition]]:
    """A leaf's unit keys and its partition (`None` when it stays one unit)."""
    part = blocking.partition(tensor_modes(shape), diagonal, self.block_size)
    if part.count == 1:
      return (key,), None
    return tuple(blocking.block_key(key, index) for index in part.indices()), part

  def _leaf_units(self, key: str, layout: ModeLayout) -> Dict[str, ModeLayout]:
    """`{unit key: layout}` of one leaf: the leaf itself, or its blocks."""
    keys, part = self._cut(key, layout.shape, layout.diagonal)
    if part is None:
      return {key: layout}
    return {block: ModeLayout(shape=part.block_modes(index), modes=part.block_modes(index),
                              diagonal=layout.diagonal, dtype=layout.dtype)
            for block, index in zip(keys, part.indices())}

  def _stored_layout(self, method: str, key: str, leaf: Any, statistics) -> ModeLayout:
    """The whole leaf's layout at `update`, its diagonal modes read from the state (from
    the first block's factors when the leaf is cut)."""
    shape = jnp.shape(leaf)
    if key in statistics:
      return layout_from_factors(shape, statistics[key])
    modes = tensor_modes(shape)
    first = blocking.block_key(key, (0,) * len(modes))
    if first not in statistics:
      raise ValueError(f"{method}: the updates have leaf {key!r} (shape {tuple(shape)}), "
                       f"but the state holds no factors for it; was the state initialised "
                       f"for other parameters?")
    factors = statistics[first]
    if len(factors) != len(modes):
      raise ValueError(f"{method}: a leaf of shape {tuple(shape)} has modes {modes}, but the "
                       f"optimizer state holds {len(factors)} factors per block; was the "
                       f"state initialised for other parameters?")
    return ModeLayout(shape=tuple(shape), modes=modes,
                      diagonal=tuple(f.ndim == 1 for f in factors), dtype=factors[0].dtype)

  def units(self, method, params, statistics):
    keys, leaves = leaf_keys(params), jax.tree.leaves(params)
    units = {}
    if statistics is None:
      if self.max_factor_dim is None:
        raise ValueError(f"{method}: max_factor_dim fixes the factor shapes and must be a "
                         f"concrete integer at init (call init outside jit)")
      for key, leaf in zip(keys, leaves):
        units.update(self._leaf_units(key, self.leaf_layout(leaf)))
      return units
    for key, leaf in zip(keys, leaves):
      units.update(self._leaf_units(key, self._stored_layout(method, key, leaf, statistics)))
    if set(units) != set(statistics):
      raise ValueError(f"{method}: the updates have units {sorted(units)} but the state was "
                       f"initialised for {sorted(statistics)}")
    for key, layout in units.items():
      expected = [f.shape for f in zero_factors(layout, layout.dtype)]
      if [jnp.shape(f) for f in statistics[key]] != expected:
        raise ValueError(f"{method}: the state's factors of {key!r} do not match the "
                         f"leaf's; was the state initialised for other parameters?")
    return units

  def source(self, method, updates, units, curvature, extra_args):
    statistics_grads = extra_args.get("statistics_grads")
    if self.uses_curvature and curvature is not None:
      if not isinstance(curvature, Curvature):
        raise ValueError(f"{method}: curvature= must be a soo.Curvature (or None), got "
                         f"{type(curvature).__name__}")
      shapes = jax.eval_shape(lambda c: c.materialize()[1], curvature)
      _check_leaves(method, shapes, updates, "curvature.fisher_grads")
      return layerwise.ready_curvature(curvature)
    if self.uses_curvature and statistics_grads is not None:
      _check_leaves(method, statistics_grads, updates, "statistics_grads")
      return layerwise.to_pure(statistics_grads)
    return updates

  def _leaf_blocks(self, tree: Any, units: Dict[str, ModeLayout]):
    """Per leaf of `tree`: its unit keys, its partition (`None`: one unit) and the leaf."""
    for key, leaf in zip(leaf_keys(tree), jax.tree.leaves(tree)):
      shape = jnp.shape(leaf)
      unit = units.get(key) or units[blocking.block_key(key, (0,) * len(tensor_modes(shape)))]
      yield (*self._cut(key, shape, unit.diagonal), leaf)

  def read(self, source, units):
    if isinstance(source, Curvature):
      # Per-example Fisher scale: N × the Gram of the mean gradient at Fisher targets, as
      # KFAC's factors (a step of the mean gradient's Gram alone is N times too long).
      root_batch = math.sqrt(source.batch_size or 1)
      source = jax.tree.map(lambda g: g * root_batch, source.materialize()[1])
    data = {}
    for keys, part, leaf in self._leaf_blocks(source, units):
      dtype = units[keys[0]].dtype
      if part is None:
        data[keys[0]] = to_modes(leaf.astype(dtype), units[keys[0]])
      else:
        tensor = jnp.reshape(leaf.astype(dtype), tensor_modes(jnp.shape(leaf)))
        data.update(zip(keys, part.split(tensor)))
    return data

  def gather(self, updates, units):
    return self.read(updates, units)

  def scatter(self, directions, updates, units):
    leaves, treedef = jax.tree.flatten(updates)
    out = []
    for (keys, part, leaf) in self._leaf_blocks(updates, units):
      if part is None:
        direction = from_modes(directions[keys[0]], units[keys[0]])
      else:
        direction = jnp.reshape(part.join([directions[k] for k in keys]), jnp.shape(leaf))
      out.append(direction.astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)

  def leaf_rules(self, algorithm, params, units, fallback_name, captured=None):
    rules = {}
    for path, (keys, part, _) in zip(layerwise.leaf_paths(params),
                                     self._leaf_blocks(params, units)):
      text = algorithm.describe(units[keys[0]])
      if part is not None:
        grid = "×".join(str(n) for n in part.grid)
        sizes = sorted({units[k].modes for k in keys})
        text = (f"{part.count} blocks ({grid}) of modes "
                f"{', '.join(str(s) for s in sizes)}; {text}")
      rules[path] = f"{algorithm.name}: {text}"
    return rules


def check_block_size(method: str, block_size: Any) -> Optional[int]:
  """`None`, or a concrete integer >= 2 (it fixes the units, so it cannot be traced)."""
  if block_size is None:
    return None
  if isinstance(block_size, jax.core.Tracer):
    raise ValueError(f"{method}: block_size fixes the factor shapes and must be a concrete "
                     f"integer or None; with optax.inject_hyperparams pass "
                     f"static_args=('block_size',)")
  return validation.check_structural_int(method, "block_size", block_size, minimum=2)


def factor_transformation(algorithm: engine.Algorithm, *, damping: Any, stats_decay: Any,
                          stats_every: Any, inverse_every: Any, max_factor_dim: Any,
                          block_size: Optional[int] = None, uses_curvature: bool = False,
                          summed_statistics: bool = False):
  """The engine's transformation of a per-leaf `algorithm`, its arguments checked."""
  validation.check_schedule(algorithm.name, damping=damping, stats_decay=stats_decay,
                            stats_every=stats_every, inverse_every=inverse_every,
                            positive_damping=algorithm.positive_damping,
                            summed_statistics=summed_statistics)
  limit = validation.check_structural_int(algorithm.name, "max_factor_dim", max_factor_dim)
  return engine.transformation(
      algorithm, LeafCoverage(max_factor_dim=limit, uses_curvature=uses_curvature,
                              block_size=check_block_size(algorithm.name, block_size)),
      damping=damping, stats_decay=stats_decay, stats_every=stats_every,
      inverse_every=inverse_every)
