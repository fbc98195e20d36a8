"""The shared skeleton of layer-wise methods (KFAC family, MBF, SENG).

A layer-wise method preconditions the parameters of every captured layer (a dict node of
`params` holding a `kernel` and optionally a `bias`, as flax's Dense/Conv and NNX's
Linear/Conv have) in the layer's matrix view `W̄ = [kernel; bias]` (DESIGN §4), from the
`LayerStats` that `curvature=` brings. Every other leaf goes through an explicit `fallback`
transformation (default: `optax.identity()`, so the full optimizer applies plain momentum
SGD to it). `soo.describe` lists which rule preconditions each leaf.

`layerwise_transformation` does everything that is not the method's own math: finding the
layers at `init`, checking `curvature` against `params` with errors that name the problem,
moving gradients to and from the matrix view, the fallback and the step counter. State
hygiene is shared by all methods without a whole-state select at every step: `update_layers`
gets an `active` flag (false when the gradients are not finite) that it ANDs into its
refresh predicates, and it refreshes statistics with `base.refresh_statistics`, which drops a
non-finite result (e.g. from a non-finite curvature) inside the refresh branch only.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from secondorder_optax._src import patches
from secondorder_optax._src.base import (Curvature, LayerPath, LayerStats, all_finite,
                                         path_to_str, select_tree)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """Static description of one preconditioned layer, found in `params` at `init`.

  Attributes:
    path: module path of the layer in `params` (and in `curvature.layers`).
    kernel_shape: shape of its kernel.
    has_bias: whether it has a bias leaf.
    dtype: the kernel's dtype.
  """

  path: LayerPath
  kernel_shape: Tuple[int, ...]
  has_bias: bool
  dtype: Any

  @property
  def key(self) -> str:
    return path_to_str(self.path)

  @property
  def matrix_shape(self) -> Tuple[int, int]:
    return (math.prod(self.kernel_shape[:-1]) + int(self.has_bias), self.kernel_shape[-1])


class LayerwiseState(NamedTuple):
  """State of a layer-wise method.

  Attributes:
    count: number of steps taken (with finite gradients and statistics).
    layers: per-layer state of the method, keyed by `"Module_0/Dense_1"`-style paths.
    fallback: state of the fallback transformation for leaves outside captured layers.
    failures: how many inversions/eigendecompositions gave non-finite results (each kept
      the previous value).
  """

  count: Array
  layers: Dict[str, Any]
  fallback: Any
  failures: Array


def _path_keys(path) -> LayerPath:
  out = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        out.append(getattr(entry, attr))
        break
    else:
      out.append(str(entry))
  return tuple(out)


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
  return {_path_keys(p): leaf for p, leaf in flat}


def find_layers(params: Any, layers: Optional[Sequence[LayerPath]] = None) -> Dict[str, LayerInfo]:
  """Finds the layers to precondition: nodes with a `kernel` (ndim >= 2) and maybe a `bias`.

  Args:
    params: the parameter tree.
    layers: optional explicit list of layer paths; by default every node whose only leaves
      are `kernel` and `bias`, with a kernel of rank 2 or more.
  """
  leaves = leaf_paths(params)
  nodes: Dict[LayerPath, Dict[str, Any]] = {}
  for path, leaf in leaves.items():
    nodes.setdefault(path[:-1], {})[path[-1]] = leaf
  found = {}
  wanted = None if layers is None else {tuple(p) for p in layers}
  for node_path, node in nodes.items():
    kernel = node.get("kernel")
    is_layer = (kernel is not None and jnp.ndim(kernel) >= 2
                and set(node) <= {"kernel", "bias"})
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
  return found


def layer_mask(params: Any, infos: Mapping[str, LayerInfo]) -> Any:
  """Tree of bools: True for leaves outside preconditioned layers (the fallback's leaves)."""
  layer_paths = {info.path for info in infos.values()}
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  mask = [_path_keys(p)[:-1] not in layer_paths for p, _ in flat]
  return jax.tree_util.tree_unflatten(treedef, mask)


def check_curvature(method: str, curvature: Any, infos: Mapping[str, LayerInfo],
                    needs: str = "per-layer statistics") -> "LayerStatsView":
  """Matches `curvature.layer_meta` to the layers found at `init`; clear errors otherwise.

  Returns:
    a read-on-access mapping from layer key to `LayerStats` (see `LayerStatsView`).
  """
  if curvature is None:
    raise ValueError(
        f"{method} needs curvature= ({needs}): call tx.update(grads, state, params, "
        f"curvature=curvature) with the curvature returned by soo.linen_curvature / "
        f"soo.nnx_curvature")
  if not isinstance(curvature, Curvature):
    raise ValueError(f"{method}: curvature= must be a soo.Curvature, got {type(curvature).__name__}")
  by_path = {tuple(p): m for p, m in curvature.layer_meta.items()}
  keys = {}
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
    keys[key] = info.path
  if missing:
    raise ValueError(
        f"{method}: curvature has no statistics for layer(s) {missing} found in params "
        f"(captured: {sorted(path_to_str(p) for p in by_path)}). Layers the capture does not "
        f"support (e.g. ConvTranspose, DenseGeneral) must be excluded: pass "
        f"layers=list(curvature.layers) to the optimizer so their leaves use the fallback.")
  return LayerStatsView(curvature, keys)


def _current_trace() -> Any:
  """The JAX trace being built now (None if unknown); used to scope a cache."""
  try:
    from jax._src import core  # pylint: disable=g-import-not-at-top
    return core.trace_ctx.trace
  except (ImportError, AttributeError):
    return None


class LayerStatsView(Mapping):
  """`{layer key: LayerStats}` read from a `Curvature` only when an entry is accessed.

  A deferred curvature (sampled Fisher) runs its extra backward pass where its statistics
  are first read; methods that read `stats[key]` inside their statistics refresh (under
  `lax.cond`) so pay for it only at refresh steps. Within one trace the materialized
  statistics are cached, so reading many layers costs one backward pass.
  """

  def __init__(self, curvature: Curvature, paths: Dict[str, LayerPath]):
    self._curvature = curvature
    self._paths = paths
    self._cache: list = []

  def _layers(self) -> Dict[LayerPath, LayerStats]:
    trace = _current_trace()
    for cached_trace, layers in self._cache:
      if trace is not None and cached_trace is trace:
        return layers
    layers = {tuple(p): s for p, s in self._curvature.layers.items()}
    if trace is not None:
      self._cache.append((trace, layers))
    return layers

  def __getitem__(self, key: str) -> LayerStats:
    return self._layers()[self._paths[key]]

  def __iter__(self):
    return iter(self._paths)

  def __len__(self) -> int:
    return len(self._paths)


UpdateLayers = Callable[..., Tuple[Dict[str, Array], Dict[str, Any], Array]]


def layerwise_transformation(
    method: str,
    *,
    init_layer: Callable[[LayerInfo], Any],
    update_layers: UpdateLayers,
    fallback: Optional[optax.GradientTransformation] = None,
    layers: Optional[Sequence[LayerPath]] = None,
    describe_layer: Optional[Callable[[LayerInfo], str]] = None,
    needs: str = "per-layer statistics",
) -> optax.GradientTransformationExtraArgs:
  """Builds a layer-wise preconditioner from the method's own two functions.

  Args:
    method: the method's name, used in errors and `describe`.
    init_layer: `info -> state` of one layer.
    update_layers: `(infos, grad_matrices, stats, layer_states, count, active) ->
      (direction_matrices, new_layer_states, failures)`, every dict keyed by layer key;
      `grad_matrices[k]` is the float32 gradient in the matrix view `(d_in [+1], d_out)`.
      `active` is False on a step with non-finite gradients: every refresh predicate must
      include it (so the state is left as it is), and statistics must be refreshed with
      `base.refresh_statistics` (so a non-finite curvature is never averaged in).
    fallback: transformation for the leaves outside preconditioned layers (default
      `optax.identity()`).
    layers: optional explicit layer paths (default: every kernel/bias node).
    describe_layer: `info -> str` for `soo.describe`.
    needs: what the method needs from `curvature`, for the missing-curvature error.
  """
  fallback = optax.identity() if fallback is None else fallback
  fallback_name = _transform_name(fallback)

  def init_fn(params):
    params = to_pure(params)
    infos = find_layers(params, layers)
    return LayerwiseState(
        count=jnp.zeros((), jnp.int32),
        layers={k: init_layer(info) for k, info in infos.items()},
        fallback=optax.masked(fallback, layer_mask(params, infos)).init(params),
        failures=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"{method} needs params: call tx.update(grads, state, params, ...)")
    original_updates, updates, params = updates, to_pure(updates), to_pure(params)
    infos = find_layers(params, layers)
    stats = check_curvature(method, curvature, infos, needs)
    grad_mats = {}
    for key, info in infos.items():
      leaves = patches.tree_get(updates, info.path)
      grad_mats[key] = patches.params_to_matrix(leaves, info.has_bias).astype(jnp.float32)
    active = all_finite(updates)
    directions, new_layers, failures = update_layers(
        infos, grad_mats, stats, state.layers, state.count, active)
    masked_fallback = optax.masked(fallback, layer_mask(params, infos))
    out, new_fallback = masked_fallback.update(updates, state.fallback, params)
    new_fallback = select_tree(active, new_fallback, state.fallback)
    for key, info in infos.items():
      like = patches.tree_get(updates, info.path)
      out = _tree_set(out, info.path, patches.matrix_to_params(directions[key], like,
                                                               info.has_bias))
    new_state = LayerwiseState(count=state.count + active.astype(state.count.dtype),
                               layers=new_layers, fallback=new_fallback,
                               failures=state.failures + failures)
    return restore_like(original_updates, out), new_state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def describe(params):
    params = to_pure(params)
    infos = find_layers(params, layers)
    rules = {}
    for path in leaf_paths(params):
      info = infos.get(path_to_str(path[:-1]))
      if info is not None:
        text = describe_layer(info) if describe_layer else f"layer {info.key}"
        rules[path] = f"{method}: {text}"
      else:
        rules[path] = f"fallback ({fallback_name})"
    return rules

  register_description(tx, describe)
  return tx


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


def _transform_name(tx: Any) -> str:
  update = getattr(tx, "update", None)
  qualname = getattr(update, "__qualname__", "")
  return qualname.split(".<locals>")[0] if qualname else type(tx).__name__


# describe() registry: transformation -> function(params) -> {leaf path: rule}.
_DESCRIPTIONS: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def register_description(tx: Any, describe_fn: Callable[[Any], Dict[LayerPath, str]]) -> None:
  """Makes `soo.describe(tx, params)` work for a transformation built by this library."""
  _DESCRIPTIONS[tx.update] = describe_fn


def description_of(tx: Any) -> Optional[Callable[[Any], Dict[LayerPath, str]]]:
  return _DESCRIPTIONS.get(getattr(tx, "update", None))
