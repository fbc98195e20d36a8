"""`soo.describe`: which rule preconditions every parameter leaf."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from secondorder_optax._src import layerwise
from secondorder_optax._src.base import Curvature, path_to_str


def _curvature_rules(curvature: Curvature, params: Any) -> Dict[tuple, str]:
  captured = {tuple(p): s for p, s in curvature.layers.items()}
  rules = {}
  for path in layerwise.leaf_paths(params):
    stats = captured.get(path[:-1])
    if stats is None:
      rules[path] = "not captured (fallback)"
    else:
      extra = f", {stats.calls} calls" if stats.calls > 1 else ""
      rules[path] = f"captured {stats.kind} layer, kernel {tuple(stats.kernel_shape)}{extra}"
  return rules


def describe(tx_or_curvature: Any, params: Any, *,
             print_fn: Optional[Callable[[str], None]] = print) -> Dict[str, str]:
  """Lists, for every parameter leaf, which rule preconditions it.

  Args:
    tx_or_curvature: a transformation built by this library (`soo.kfac(...)`,
      `soo.scale_by_tnt(...)`, ...) or a `soo.Curvature`.
    params: the parameter tree.
    print_fn: where the table goes (`None` to print nothing).

  Returns:
    dict from `"Dense_0/kernel"`-style leaf paths to the rule's description.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    ...           "scale": jnp.ones(2)}
    >>> rules = soo.describe(soo.kfac(1e-3, damping=1e-3), params, print_fn=None)
    >>> rules["scale"]
    'fallback (identity)'
  """
  if isinstance(tx_or_curvature, Curvature):
    rules = _curvature_rules(tx_or_curvature, params)
  else:
    describe_fn = layerwise.description_of(tx_or_curvature)
    if describe_fn is None:
      raise ValueError(
          "describe() knows the transformations built by secondorder_optax (soo.<method>(...) "
          "and soo.scale_by_<method>(...)) and soo.Curvature; got "
          f"{type(tx_or_curvature).__name__}. For a custom optax.chain, describe the soo "
          "transformation inside it.")
    rules = describe_fn(params)
  table = {path_to_str(p): r for p, r in rules.items()}
  if print_fn is not None:
    width = max((len(k) for k in table), default=0)
    print_fn("\n".join(f"{k:<{width}}  {v}" for k, v in table.items()))
  return table
