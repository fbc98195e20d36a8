"""Spreading a stack of same-shape refreshes over the devices of the ambient mesh (DESIGN §8).

The engine refreshes every bucket of same-shape blocks (inverses, eigendecompositions, roots)
in one batched call on a stack (axis 0). On one device that is the whole story. Under an
ambient mesh (`jax.set_mesh(mesh)` around the jitted step), `map_stack` runs the batched call
under `jax.shard_map` with the stack sharded along axis 0 over all the mesh's axes, so that
each device refreshes `ceil(n / devices)` blocks instead of `n`; the stack is padded to a
multiple of the device count by repeating its first block (a valid block: the padding
refreshes succeed and are dropped) and the result is sliced back to `n` and gathered, so the
caller sees the same replicated stack as without a mesh. kfac-jax distributes inverses
round-robin by layer; sharding the stack does it per block.

Without an ambient mesh, on a one-device mesh, for a stack of one block, or inside a
`shard_map` that already made every axis manual, `map_stack(fn, stack)` is just
`fn(stack)`. Under an ambient mesh the step's arrays must live on that mesh (as in data
parallel training: `jax.device_put` them with the mesh's `NamedSharding`s).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

Array = jax.Array


def spread_axes(mesh: Any) -> Tuple[str, ...]:
  """The mesh axes a stack is sharded over: the `Auto` axes, or if there are none the
  `Explicit` ones (`Manual` axes, inside a user's `shard_map`, are never used)."""
  if mesh is None or mesh.empty:
    return ()
  named = list(zip(mesh.axis_names, mesh.axis_types))
  auto = tuple(name for name, kind in named if kind == AxisType.Auto)
  return auto or tuple(name for name, kind in named if kind == AxisType.Explicit)


def _devices(mesh: Any, axes: Tuple[str, ...]) -> int:
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  count = 1
  for axis in axes:
    count *= sizes[axis]
  return count


def map_stack(fn: Callable[[Any], Any], stack: Any) -> Any:
  """`fn(stack)` for a batched `fn` over axis 0 of every leaf of `stack`, with the stack
  split over the devices of the ambient mesh (if any; see the module docstring).

  Args:
    fn: a function of a stack (pytree of arrays sharing the leading axis) that treats each
      entry of the leading axis independently, e.g. `jax.vmap(solve)`.
    stack: the stacked blocks.

  Returns:
    `fn(stack)`, replicated (the same as without a mesh).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from secondorder_optax._src import spread
    >>> stack = jnp.stack([jnp.eye(3) * (i + 1) for i in range(5)])
    >>> spread.map_stack(jax.vmap(jnp.linalg.inv), stack)[:, 0, 0]  # no mesh: plain call
    Array([1.        , 0.5       , 0.33333334, 0.25      , 0.2       ], dtype=float32)
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = spread_axes(mesh)
  devices = _devices(mesh, axes) if axes else 1
  size = jax.tree.leaves(stack)[0].shape[0]
  if devices == 1 or size == 1:
    return fn(stack)
  padded = -(-size // devices) * devices

  def pad(x):
    if padded == size:
      return x
    return jnp.concatenate([x, jnp.broadcast_to(x[:1], (padded - size,) + x.shape[1:])])

  explicit = mesh.axis_types[mesh.axis_names.index(axes[0])] == AxisType.Explicit
  spec = PartitionSpec(axes)
  stack = jax.tree.map(pad, stack)
  if explicit:
    stack = jax.tree.map(lambda x: jax.reshard(x, spec), stack)
  out = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, axis_names=set(axes))(stack)
  if explicit:
    out = jax.tree.map(lambda x: jax.reshard(x, PartitionSpec()), out)
  else:  # Gathered here, so that the refreshed state keeps the replicated sharding.
    out = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec()), out)
  return jax.tree.map(lambda x: x[:size], out)
