"""Shardings of an optimizer state from the user's rules (DESIGN §8).

Data parallel training replicates the optimizer state by default. Its large leaves
(Kronecker factors, their inverses or eigenbases, Shampoo's roots) can instead be sharded
over the mesh: `state_shardings(state, mesh, rules)` gives the `NamedSharding` of every leaf
from rules `(regex on the leaf's path, PartitionSpec)`, for `jax.jit`'s `in_shardings` /
`out_shardings` and for `jax.device_put` (and orbax restores: `docs/scale_out.md`).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from secondorder_optax._src.base import path_keys, path_to_str

Rules = Union[Mapping[str, PartitionSpec], Iterable[Tuple[str, PartitionSpec]]]


def state_sharding_path(path: Tuple[Any, ...]) -> str:
  """A key path (from `jax.tree_util.tree_flatten_with_path`) as the `/`-joined names that
  `state_shardings`' rules match, e.g. `".../preconditioner/Dense_0/input_inverse"`."""
  return path_to_str(path_keys(path))


def _compiled_rules(rules: Rules):
  if isinstance(rules, Mapping):
    rules = list(rules.items())
  try:
    rules = list(rules)
  except TypeError:
    raise ValueError(f"state_shardings: rules must be a sequence of (regex, PartitionSpec) "
                     f"pairs, got {type(rules).__name__}") from None
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"state_shardings: rules[{i}] must be a (regex, PartitionSpec) pair, "
                       f"got {rule!r}")
    pattern, spec = rule
    if not isinstance(spec, PartitionSpec):
      raise ValueError(f"state_shardings: rules[{i}] has {spec!r} where a PartitionSpec "
                       f"belongs")
    try:
      compiled.append((re.compile(pattern), spec))
    except (re.error, TypeError) as error:
      raise ValueError(f"state_shardings: rules[{i}] has an invalid regex {pattern!r}: "
                       f"{error}") from None
  return compiled


def _axis_size(mesh: Mesh, entry: Any, path: str) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  size = 1
  for name in names:
    if name not in sizes:
      raise ValueError(f"state_shardings: the rule for {path} names mesh axis {name!r}, "
                       f"which the mesh lacks (its axes: {tuple(mesh.axis_names)})")
    size *= sizes[name]
  return size


def state_shardings(state: Any, mesh: Mesh, rules: Rules, *,
                    replicate_unfit: bool = False) -> Any:
  """The `NamedSharding` of every leaf of an optimizer state, from path rules.

  Each leaf's path is its keys joined by `/`, e.g.
  `".../inner/preconditioner/Dense_0/input_inverse"` for KFAC's inverse input factor of
  layer `Dense_0` in `soo.kfac`'s state (`soo.state_sharding_path` of the key paths of
  `jax.tree_util.tree_flatten_with_path(state)` shows them). The first rule whose regex
  `re.search`es the path gives the leaf's `PartitionSpec` (one entry per leading
  dimension); leaves that match no rule, and scalars, are replicated.

  Args:
    state: the optimizer state (arrays, or `jax.ShapeDtypeStruct`s from
      `jax.eval_shape(tx.init, params)`).
    mesh: the `jax.sharding.Mesh` the state lives on.
    rules: `(regex, PartitionSpec)` pairs (or a dict of them), first match wins.
    replicate_unfit: a spec entry whose mesh axes do not divide its dimension (or that
      names a dimension the leaf lacks) raises a `ValueError` naming the leaf's path; with
      `True` that dimension is replicated instead.

  Returns:
    A pytree of `NamedSharding`s with the state's structure.

  Raises:
    ValueError: malformed rules, a mesh axis the mesh lacks, or (unless
      `replicate_unfit`) a spec that does not fit a leaf's shape.

  Example:
    >>> import jax, jax.numpy as jnp, secondorder_optax as soo
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> tx = soo.kfac(learning_rate=0.1)
    >>> state = tx.init({"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}})
    >>> shardings = soo.state_shardings(state, mesh, [(r"/(statistics|preconditioner)/", P("data"))])
    >>> for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    ...   if sharding.spec:
    ...     print(soo.state_sharding_path(path), sharding.spec)
    inner_states/preconditioned/inner_state/0/inner/statistics/Dense_0/input_factor P('data',)
    inner_states/preconditioned/inner_state/0/inner/statistics/Dense_0/output_factor P('data',)
    inner_states/preconditioned/inner_state/0/inner/preconditioner/Dense_0/input_inverse P('data',)
    inner_states/preconditioned/inner_state/0/inner/preconditioner/Dense_0/output_inverse P('data',)
    >>> state = jax.device_put(state, shardings)  # or jax.jit(..., out_shardings=...)
  """
  if not isinstance(mesh, Mesh):
    raise ValueError(f"state_shardings: mesh must be a jax.sharding.Mesh, got "
                     f"{type(mesh).__name__}")
  compiled = _compiled_rules(rules)

  def sharding(path, leaf):
    name = state_sharding_path(path)
    shape = tuple(np.shape(leaf))
    spec = next((spec for pattern, spec in compiled if pattern.search(name)), PartitionSpec())
    if not shape:
      return NamedSharding(mesh, PartitionSpec())
    entries = list(spec)
    if len(entries) > len(shape):
      if not replicate_unfit:
        raise ValueError(f"state_shardings: {name} has shape {shape} but its rule's "
                         f"{spec} names {len(entries)} dimensions (pass replicate_unfit=True "
                         f"to replicate what does not fit)")
      entries = entries[:len(shape)]
    fitted = []
    for dim, entry in enumerate(entries):
      if entry is None:
        fitted.append(None)
        continue
      size = _axis_size(mesh, entry, name)
      if shape[dim] % size:
        if not replicate_unfit:
          raise ValueError(f"state_shardings: {name} has shape {shape}; mesh axes {entry!r} "
                           f"({size} devices) do not divide its dimension {dim} "
                           f"({shape[dim]}) (pass replicate_unfit=True to replicate it)")
        fitted.append(None)
      else:
        fitted.append(entry)
    while fitted and fitted[-1] is None:  # P('data', None) is P('data'); P(None) is P()
      fitted.pop()
    return NamedSharding(mesh, PartitionSpec(*fitted))

  return jax.tree_util.tree_map_with_path(sharding, state)
