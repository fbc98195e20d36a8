"""Layer units: the coverage of the layer-wise methods (KFAC family, MBF, SENG).

A layer-wise method preconditions the parameters of every captured layer (a dict node of
`params` holding a `kernel` and optionally a `bias`, as flax's Dense/Conv and NNX's
Linear/Conv have) in the layer's matrix view `W̄ = [kernel; bias]` (DESIGN §4), from the
`LayerStats` that `curvature=` brings. Every other leaf goes through an explicit `fallback`
transformation. `LayerCoverage` tells the engine (`engine.Coverage`) which layers there are,
checks `curvature` against them with errors that name the problem, moves gradients to and
from the matrix view and reads each layer's statistics from the curvature (one
materialization of a deferred curvature per read). `soo.describe` lists the rule of each leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from secondorder_optax._src import engine, patches, validation
from secondorder_optax._src.base import (Curvature, LayerPath, path_keys, path_to_str,
                                         stats_dtype)

Array = jax.Array

# `layers=` values other than a list of paths: the layers the step's curvature records;
# only the dense layers (kernels of rank 2; convolutions go to the fallback).
CAPTURED = "captured"
DENSE = "dense"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """Static description of one preconditioned layer, found in `params` at `init`.

  Attributes:
    path: module path of the layer in `params` (and in `curvature.layers`).
    kernel_shape: shape of its kernel.
    has_bias: whether it has a bias leaf.
    dtype: the kernel's dtype.
    index: the layer's position among the preconditioned layers (sorted by key).
  """

  path: LayerPath
  kernel_shape: Tuple[int, ...]
  has_bias: bool
  dtype: Any
  index: int = 0

  @property
  def key(self) -> str:
    return path_to_str(self.path)

  @property
  def matrix_shape(self) -> Tuple[int, int]:
    return (math.prod(self.kernel_shape[:-1]) + int(self.has_bias), self.kernel_shape[-1])


def to_pure(tree: Any) -> Any:
  """`nnx.State` / `nnx.Variable` leaves (as `nnx.Optimizer` passes them) -> nested dicts
  of arrays, so that paths are module paths; other trees are returned unchanged."""
  tree = nnx.as_pure(tree)
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def restore_like(original: Any, pure: Any) -> Any:
  """Puts the leaves of `pure` (from `to_pure(original)`) back into `original`'s structure.

  An `nnx.State` and its pure dict flatten in the same (sorted-key) order.
  """
  if pure is original:
    return pure
  return jax.tree.unflatten(jax.tree.structure(original), jax.tree.leaves(pure))


def leaf_paths(tree: Any) -> Dict[LayerPath, Any]:
  """All leaves of a params tree keyed by their key path tuples."""
  flat, _ = jax.tree_util.tree_flatten_with_path(to_pure(tree))
  return {path_keys(p): leaf for p, leaf in flat}


def find_layers(params: Any, layers: Union[None, str, Sequence[LayerPath]] = None
                ) -> Dict[str, LayerInfo]:
  """Finds the layers to precondition: nodes with a `kernel` (ndim >= 2) and maybe a `bias`.

  Args:
    params: the parameter tree.
    layers: optional explicit list of layer paths, or `'dense'` for the nodes with a
      kernel of rank exactly 2; by default every node whose only leaves are `kernel` and
      `bias`, with a kernel of rank 2 or more.
  """
  dense_only = isinstance(layers, str) and layers == DENSE
  if dense_only:
    layers = None
  leaves = leaf_paths(params)
  nodes: Dict[LayerPath, Dict[str, Any]] = {}
  for path, leaf in leaves.items():
    nodes.setdefault(path[:-1], {})[path[-1]] = leaf
  found = {}
  wanted = None if layers is None else {tuple(p) for p in layers}
  for node_path, node in nodes.items():
    kernel = node.get("kernel")
    is_layer = (kernel is not None and jnp.ndim(kernel) >= 2
                and set(node) <= {"kernel", "bias"}
                and not (dense_only and jnp.ndim(kernel) > 2))
    if wanted is not None:
      if node_path not in wanted:
        continue
      if not is_layer:
        raise ValueError(f"layers= names {path_to_str(node_path)}, which is not a layer with a "
                         f"'kernel' (and optional 'bias'); its leaves are {sorted(node)}")
    elif not is_layer:
      continue
    info = LayerInfo(path=node_path, kernel_shape=tuple(kernel.shape),
                     has_bias="bias" in node, dtype=kernel.dtype)
    found[info.key] = info
  if wanted is not None:
    missing = wanted - {i.path for i in found.values()}
    if missing:
      raise ValueError(f"layers= names paths not found in params: "
                       f"{sorted(path_to_str(p) for p in missing)}")
  return {key: dataclasses.replace(found[key], index=i) for i, key in enumerate(sorted(found))}


def layer_mask(params: Any, infos: Mapping[str, LayerInfo]) -> Any:
  """Tree of bools: True for leaves outside preconditioned layers (the fallback's leaves)."""
  layer_paths = {info.path for info in infos.values()}
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  mask = [path_keys(p)[:-1] not in layer_paths for p, _ in flat]
  return jax.tree_util.tree_unflatten(treedef, mask)


NOT_CAPTURED = "not captured by this curvature"


def coverage_layers(method: str, layers: Any
                    ) -> Tuple[Union[None, str, Tuple[LayerPath, ...]], bool]:
  """`layers=` of a layer-wise method as (explicit paths, `'dense'` or `None`,
  captured_only)."""
  if isinstance(layers, str):
    if layers == DENSE:
      return DENSE, False
    if layers != CAPTURED:
      raise ValueError(f"{method}: layers= must be None, '{CAPTURED}', '{DENSE}' or a list "
                       f"of layer paths, got {layers!r}")
    return None, True
  return (None if layers is None else tuple(tuple(p) for p in layers)), False


def captured_paths(curvature: Any) -> Optional[set]:
  """The layer paths a `soo.Curvature` records (`None` for anything else)."""
  if not isinstance(curvature, Curvature):
    return None
  return {tuple(p) for p in curvature.layer_meta}


def check_curvature(method: str, curvature: Any, infos: Mapping[str, LayerInfo],
                    needs: str = "per-layer statistics") -> None:
  """Matches `curvature.layer_meta` to the layers found in `params`; clear errors otherwise."""
  if curvature is None:
    raise ValueError(
        f"{method} needs curvature= ({needs}): call tx.update(grads, state, params, "
        f"curvature=curvature) with the curvature returned by soo.linen_curvature / "
        f"soo.nnx_curvature")
  if not isinstance(curvature, Curvature):
    raise ValueError(f"{method}: curvature= must be a soo.Curvature, got {type(curvature).__name__}")
  by_path = {tuple(p): m for p, m in curvature.layer_meta.items()}
  missing = []
  for key, info in infos.items():
    layer = by_path.get(info.path)
    if layer is None:
      missing.append(key)
      continue
    if layer.stack_ndim:
      raise ValueError(
          f"{method}: layer {key} is stacked by nn.scan / nn.vmap (stack_ndim="
          f"{layer.stack_ndim}); layer-wise methods need unstacked layers. Use soo.tnt / "
          f"soo.shampoo for it, or exclude it with layers=[...] so the fallback handles it.")
    if tuple(layer.kernel_shape) != info.kernel_shape or layer.has_bias != info.has_bias:
      raise ValueError(
          f"{method}: curvature for layer {key} has kernel shape {tuple(layer.kernel_shape)} "
          f"(bias={layer.has_bias}) but params have {info.kernel_shape} (bias={info.has_bias}); "
          f"was the curvature computed for another model?")
  if missing:
    raise ValueError(
        f"{method}: curvature has no statistics for layer(s) {missing} found in params "
        f"(captured: {sorted(path_to_str(p) for p in by_path)}). The capture leaves out "
        f"layers it does not support (e.g. DenseGeneral, ConvTranspose, Einsum, masked or "
        f"grouped kernels): pass layers='{CAPTURED}' to the optimizer so that their leaves "
        f"go to its fallback (Adam), or an explicit layers=[...].")


def is_tracing(tree: Any) -> bool:
  """Whether any leaf of `tree` is a tracer (we are inside `jit` / `grad` / ...)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def ready_curvature(curvature: Curvature) -> Curvature:
  """A deferred curvature stays deferred inside a traced step (its backward pass then runs
  only in the statistics branch); an eager one is materialized now, so the engine's compiled
  step is not keyed on a fresh VJP at every call."""
  if curvature.is_deferred and not is_tracing(curvature.finite_check_leaves()):
    return curvature.materialized()
  return curvature


@dataclasses.dataclass(frozen=True)
class LayerCoverage(engine.Coverage):
  """The captured layers of `params` (or only `layers`), in their matrix views.

  Attributes:
    layers: optional explicit layer paths or `'dense'` (default: every kernel/bias node).
    needs: what the method needs from `curvature`, for the missing-curvature error.
    fisher: the capture kind the method accepts (`None`: either).
    captured_only: precondition only the layers the step's curvature records; the others
      keep their state and pass their updates through (`layers='captured'`; the full
      optimizers send those leaves to their first-order fallback).
  """

  layers: Union[None, str, Tuple[LayerPath, ...]] = None
  needs: str = "per-layer inputs and output gradients"
  fisher: Optional[str] = None
  captured_only: bool = False

  def present(self, units, curvature):
    if not self.captured_only:
      return units
    captured = captured_paths(curvature)
    if captured is None:
      return units  # source() raises its clear error about the missing curvature
    return {key: info for key, info in units.items() if info.path in captured}

  def units(self, method, params, statistics):
    del statistics
    try:
      return find_layers(params, self.layers)
    except ValueError as e:
      raise ValueError(f"{method}: {e}") from None

  def source(self, method, updates, units, curvature, extra_args):
    del updates, extra_args
    check_curvature(method, curvature, units, self.needs)
    if self.fisher is not None and curvature.fisher != self.fisher:
      raise ValueError(
          f"{method} expects curvature captured with fisher='{self.fisher}' but got "
          f"fisher='{curvature.fisher}'. Capture with soo.linen_curvature(model, loss, "
          f"fisher='{self.fisher}') (or soo.nnx_curvature(..., fisher='{self.fisher}')).")
    return ready_curvature(curvature)

  def read(self, source, units):
    layers, _ = source.materialize()
    by_path = {tuple(p): s for p, s in layers.items()}
    return {key: by_path[info.path] for key, info in units.items()}

  def gather(self, updates, units):
    return {key: patches.params_to_matrix(patches.tree_get(updates, info.path),
                                          info.has_bias).astype(stats_dtype(info.dtype))
            for key, info in units.items()}

  def scatter(self, directions, updates, units):
    out = updates
    for key, info in units.items():
      like = patches.tree_get(updates, info.path)
      out = _tree_set(out, info.path,
                      patches.matrix_to_params(directions[key], like, info.has_bias))
    return out

  def uncovered(self, params, units):
    return layer_mask(params, units)

  def leaf_rules(self, algorithm, params, units, fallback_name, captured=None):
    rules = {}
    for path in leaf_paths(params):
      info = units.get(path_to_str(path[:-1]))
      if info is None:
        rules[path] = f"fallback ({fallback_name})"
      elif captured is not None and info.path not in captured and self.captured_only:
        rules[path] = f"fallback ({fallback_name}; {NOT_CAPTURED})"
      elif captured is not None and info.path not in captured:
        rules[path] = (f"{algorithm.name}: NOT CAPTURED by this curvature (update raises); "
                       f"pass layers='{CAPTURED}' so the fallback trains it")
      else:
        rules[path] = f"{algorithm.name}: {algorithm.describe(info)}"
    return rules


def _tree_set(tree: Any, path: LayerPath, value: Any) -> Any:
  """Functional `tree[path] = value` for nested dicts (and nnx.State)."""
  if not path:
    return value
  head, rest = path[0], path[1:]
  if isinstance(tree, (list, tuple)):
    items = list(tree)
    items[head] = _tree_set(items[head], rest, value)
    return type(tree)(items)
  copy = type(tree)(dict(tree)) if not isinstance(tree, dict) else dict(tree)
  copy[head] = _tree_set(tree[head], rest, value)
  return copy


def transform_name(tx: Any) -> str:
  """A transformation's name for `describe` (e.g. `scale_by_adam`)."""
  update = getattr(tx, "update", None)
  qualname = getattr(update, "__qualname__", "")
  return qualname.split(".<locals>")[0] if qualname else type(tx).__name__


def layer_transformation(algorithm: "engine.Algorithm", *, damping: Any, stats_decay: Any,
                         stats_every: Any, inverse_every: Any, fallback: Any = None,
                         layers: Optional[Sequence[LayerPath]] = None,
                         needs: str = "per-layer inputs and output gradients",
                         fisher: Optional[str] = None):
  """The engine's transformation of a layer-wise `algorithm`, its arguments checked."""
  validation.check_schedule(algorithm.name, damping=damping, stats_decay=stats_decay,
                      stats_every=stats_every, inverse_every=inverse_every,
                      positive_damping=algorithm.positive_damping)
  paths, captured_only = coverage_layers(algorithm.name, layers)
  coverage = LayerCoverage(layers=paths, needs=needs, fisher=fisher,
                           captured_only=captured_only)
  return engine.transformation(algorithm, coverage, damping=damping, stats_decay=stats_decay,
                               stats_every=stats_every, inverse_every=inverse_every,
                               fallback=fallback)
