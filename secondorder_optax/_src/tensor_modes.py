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
(`apply_factors`: `X ×_1 F_1 ×_2 … ×_k F_k`) and mapping a function over every factor of a
model with one batched call per group of same-size factors (`map_factors`, through
`linalg.bucketed_keep_finite`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from secondorder_optax._src import layerwise, linalg
from secondorder_optax._src.base import path_to_str, stats_dtype

Array = jax.Array
Factors = Tuple[Array, ...]


@dataclasses.dataclass(frozen=True)
class ModeLayout:
  """How one parameter leaf is seen as a tensor with per-mode factors.

  Attributes:
    shape: the leaf's own shape.
    modes: the mode sizes `(d_1, ..., d_k)`; their product is the leaf's size.
    diagonal: per mode, whether its factor is kept as a diagonal only.
  """

  shape: Tuple[int, ...]
  modes: Tuple[int, ...]
  diagonal: Tuple[bool, ...]

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


def mode_layout(shape: Tuple[int, ...], max_factor_dim: int) -> ModeLayout:
  """The layout of a leaf: its modes, diagonal where above `max_factor_dim` or scalar."""
  modes = tensor_modes(shape)
  scalar = math.prod(shape) == 1
  return ModeLayout(shape=tuple(shape), modes=modes,
                    diagonal=tuple(scalar or d > max_factor_dim for d in modes))


def layout_from_factors(shape: Tuple[int, ...], factors: Factors) -> ModeLayout:
  """The layout of a leaf whose factors (full `(d, d)` or diagonal `(d,)`) are given."""
  modes = tensor_modes(shape)
  if len(factors) != len(modes) or any(f.shape[0] != d for f, d in zip(factors, modes)):
    raise ValueError(
        f"a leaf of shape {tuple(shape)} has modes {modes}, but the optimizer state holds "
        f"factors of shapes {[tuple(f.shape) for f in factors]}; was the state initialised "
        f"for other parameters?")
  return ModeLayout(shape=tuple(shape), modes=modes,
                    diagonal=tuple(f.ndim == 1 for f in factors))


def static_int(value: Any, name: str) -> int:
  """A concrete positive integer setting (it decides factor shapes), with clear errors."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{name} decides the shapes of the factors and must be a concrete integer; with "
        f"optax.inject_hyperparams pass static_args=('{name}',) or call init outside jit")
  number = int(value)
  if number != value or number < 1:
    raise ValueError(f"{name} must be a positive integer, got {value}")
  return number


def check_periods(**periods: Any) -> None:
  """Validates refresh periods (`stats_every=...`) that are concrete; traced ones pass."""
  for name, value in periods.items():
    if not isinstance(value, jax.core.Tracer) and (int(value) != value or int(value) < 1):
      raise ValueError(f"{name} must be a positive integer, got {value}")


def layouts(params: Any, max_factor_dim: Any) -> Dict[str, ModeLayout]:
  """The layout of every leaf of `params`, keyed by leaf key, in `jax.tree.leaves` order."""
  limit = static_int(max_factor_dim, "max_factor_dim")
  return {key: mode_layout(jnp.shape(leaf), limit)
          for key, leaf in zip(leaf_keys(params), jax.tree.leaves(params))}


def describe_leaves(method: str, params: Any, max_factor_dim: Any) -> Dict[tuple, str]:
  """`{leaf path tuple: "<method>: modes (...), ..."}` for `soo.describe`."""
  by_key = layouts(params, max_factor_dim)
  return {path: f"{method}: {describe_layout(by_key[path_to_str(path)])}"
          for path in layerwise.leaf_paths(params)}


def state_layouts(method: str, keys: Tuple[str, ...], leaves: Any,
                  statistics: Dict[str, Factors]) -> Dict[str, ModeLayout]:
  """The layout of every updated leaf, read from the factor shapes held in the state."""
  if set(keys) != set(statistics):
    raise ValueError(f"{method}: the updates have leaves {sorted(keys)} but the state was "
                     f"initialised for {sorted(statistics)}")
  return {key: layout_from_factors(jnp.shape(leaf), statistics[key])
          for key, leaf in zip(keys, leaves)}


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


def initial_factors(params: Any, max_factor_dim: Any, preconditioner_dtype: Any = None
                    ) -> Tuple[Dict[str, ModeLayout], Dict[str, Factors], Dict[str, Factors]]:
  """Per leaf key: its layout, zero statistics (float32 at least) and identity
  preconditioners (in `preconditioner_dtype`, default the statistics' dtype), the
  starting state shared by TNT and Shampoo."""
  leaf_layouts = layouts(params, max_factor_dim)
  statistics, identities = {}, {}
  for (key, layout), leaf in zip(leaf_layouts.items(), jax.tree.leaves(params)):
    dtype = stats_dtype(jnp.asarray(leaf).dtype)
    statistics[key] = zero_factors(layout, dtype)
    identities[key] = identity_factors(layout,
                                       linalg.refreshed_dtype(dtype, preconditioner_dtype))
  return leaf_layouts, statistics, identities


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


def map_factors(fn: Callable[[Any], Array], items: Dict[str, Tuple[Any, ...]],
                previous: Dict[str, Factors]) -> Tuple[Dict[str, Factors], Array]:
  """Applies `fn` to every per-mode item of every leaf, one batched call per size group.

  Args:
    fn: function of one item (a factor, or a pytree holding one) returning an array; it
      is `vmap`ped over all items of the same shapes in the whole model.
    items: per leaf key, a tuple with one item per mode.
    previous: per leaf key, the previous results; a non-finite result keeps its previous
      value (`linalg.bucketed_keep_finite`).

  Returns:
    `(results, failures)`: per leaf key a tuple of results, and the number of failures.
  """
  flat = {(key, i): item for key, per_mode in items.items() for i, item in enumerate(per_mode)}
  flat_previous = {(key, i): prev for key, per_mode in previous.items()
                   for i, prev in enumerate(per_mode)}
  results, failures = linalg.bucketed_keep_finite(fn, flat, flat_previous)
  return {key: tuple(results[(key, i)] for i in range(len(per_mode)))
          for key, per_mode in items.items()}, failures
