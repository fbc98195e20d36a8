"""`soo.describe`: which rule preconditions every parameter leaf."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import jax

from secondorder_optax._src import alias, engine, layerwise
from secondorder_optax._src.base import Curvature, path_to_str
from secondorder_optax._src.shampoo import GraftState

_GRAFT_NAMES = {"ScaleByRmsWithCountState": "rmsprop", "ScaleByRmsState": "rmsprop",
                "ScaleByAdamState": "adam", "TraceState": "momentum"}


def _curvature_rules(curvature: Curvature, params: Any) -> Dict[tuple, str]:
  captured = {tuple(p): m for p, m in curvature.layer_meta.items()}
  rules = {}
  for path in layerwise.leaf_paths(params):
    meta = captured.get(path[:-1])
    if meta is None:
      rules[path] = "not captured (fallback)"
    else:
      extra = f", {meta.calls} calls" if meta.calls > 1 else ""
      rules[path] = f"captured {meta.kind} layer, kernel {tuple(meta.kernel_shape)}{extra}"
  return rules


def _specs(state: Any) -> List[Tuple[engine.StateSpec, str]]:
  """Every method's `StateSpec` in an optimizer state, through any optax wrapper, with the
  grafted method's name where it is grafted."""
  is_node = lambda x: isinstance(x, (engine.PreconditionerState, GraftState))
  found = []
  for node in jax.tree.leaves(state, is_leaf=is_node):
    if isinstance(node, engine.PreconditionerState):
      found.append((node.spec, ""))
    elif isinstance(node, GraftState):
      name = _GRAFT_NAMES.get(type(node.graft).__name__, type(node.graft).__name__)
      found += [(spec, f", grafted to {name}") for spec, _ in _specs(node.direction)]
  return found


def _initial_state(init: Callable[[Any], Any], params: Any) -> Any:
  """The optimizer's initial state, abstract where possible (an `inject_hyperparams` state
  holds structural integers, e.g. MBF's `block_size`, that must be concrete at `init`)."""
  try:
    return jax.eval_shape(init, params)
  except (ValueError, TypeError, jax.errors.ConcretizationTypeError):
    return init(params)


def _first_order_name(state: Any) -> Optional[str]:
  """The first-order optimizer of a full optimizer's `optax.partition` fallback branch."""
  is_node = lambda x: isinstance(getattr(x, "inner_states", None), dict)
  for node in jax.tree.leaves(state, is_leaf=is_node):
    if is_node(node) and alias.FALLBACK in node.inner_states:
      branch = node.inner_states[alias.FALLBACK]
      is_state = lambda x: (hasattr(x, "_fields") and "inner_state" not in x._fields
                            and type(x).__name__ != "EmptyState")
      names = [_GRAFT_NAMES.get(type(x).__name__, type(x).__name__)
               for x in jax.tree.leaves(branch, is_leaf=is_state) if is_state(x)]
      return "+".join(dict.fromkeys(names)) or "optax transformation"
  return None


def describe(tx_or_curvature: Any, params: Any, *, curvature: Optional[Curvature] = None,
             print_fn: Optional[Callable[[str], None]] = print) -> Dict[str, str]:
  """Lists, for every parameter leaf, which rule preconditions it.

  Works on any optimizer that contains a method of this library, through `optax.chain`,
  `optax.inject_hyperparams`, `optax.MultiSteps`, `optax.apply_if_finite` and the like: it
  reads the method from the optimizer's (abstract) initial state.

  Args:
    tx_or_curvature: an optimizer holding a method of this library (`soo.kfac(...)`,
      `optax.chain(..., soo.scale_by_tnt(...))`, ...) or a `soo.Curvature`.
    params: the parameter tree.
    curvature: optionally the curvature the optimizer will get: layers it does not record
      are then reported instead of being claimed as preconditioned.
    print_fn: where the table goes (`None` to print nothing).

  Returns:
    dict from `"Dense_0/kernel"`-style leaf paths to the rule's description.

  Example:
    >>> import jax.numpy as jnp, optax, secondorder_optax as soo
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    ...           "scale": jnp.ones(2)}
    >>> tx = optax.MultiSteps(soo.kfac(), every_k_schedule=2)
    >>> rules = soo.describe(tx, params, print_fn=None)
    >>> rules["scale"]
    'fallback: adam (its own learning rate)'
  """
  if isinstance(tx_or_curvature, Curvature):
    rules = _curvature_rules(tx_or_curvature, params)
  else:
    init = getattr(tx_or_curvature, "init", None)
    abstract_state = None if init is None else _initial_state(init, params)
    specs = [] if init is None else _specs(abstract_state)
    if not specs:
      raise ValueError(
          "describe() needs an optimizer that contains a secondorder_optax method "
          "(soo.<method>(...), soo.scale_by_<method>(...), or a chain / wrapper of one) or a "
          f"soo.Curvature; got {type(tx_or_curvature).__name__}")
    captured = None if curvature is None else {tuple(p) for p in curvature.layer_meta}
    pure = layerwise.to_pure(params)
    rules = {}
    for spec, suffix in specs:
      rules.update({path: rule + (suffix if not rule.startswith("fallback") else "")
                    for path, rule in spec.leaf_rules(pure, captured).items()})
    # Leaves a method never saw went to a full optimizer's own first-order branch.
    seen = {key for spec, _ in specs for key, _ in spec.leaf_shapes}
    first_order = _first_order_name(abstract_state)
    for path in rules:
      if first_order is None:
        continue
      if path_to_str(path) not in seen:
        rules[path] = f"fallback: {first_order} (its own learning rate)"
      elif layerwise.NOT_CAPTURED in rules[path]:  # layers='captured'
        rules[path] = f"fallback: {first_order} (its own learning rate; {layerwise.NOT_CAPTURED})"
  table = {path_to_str(p): r for p, r in rules.items()}
  if print_fn is not None:
    width = max((len(k) for k in table), default=0)
    print_fn("\n".join(f"{k:<{width}}  {v}" for k, v in table.items()))
  return table
