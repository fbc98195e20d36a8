"""Block-diagonal partition of a leaf's mode tensor (DESIGN §5, after Distributed Shampoo).

A mode whose full factor would be larger than `block_size` is cut into `⌈d / block_size⌉`
nearly equal segments; the leaf's tensor is cut along every such mode, and each block is
preconditioned on its own, with its own per-mode factors (Anil et al., 2020, "Scalable
second order optimization for deep learning", §3; Shi et al., 2023, "A distributed
data-parallel PyTorch implementation of the distributed Shampoo optimizer", §3.1). A
`(784, 1000)` kernel with `block_size=256` becomes 4 × 4 blocks of `(196, 250)`: applying
the factors costs `2·784·1000·(196 + 250)` multiply-adds instead of
`2·784·1000·(784 + 1000)`, and the refresh decomposes 250-sized factors instead of
1000-sized ones.

Example:
  >>> import jax.numpy as jnp
  >>> from secondorder_optax._src import blocking
  >>> part = blocking.partition((5, 3), (False, False), block_size=2)
  >>> part.grid, [part.block_modes(i) for i in part.indices()][:3]
  ((3, 2), [(2, 2), (2, 1), (2, 2)])
  >>> x = jnp.arange(15.0).reshape(5, 3)
  >>> bool(jnp.all(part.join(part.split(x)) == x))
  True
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Segments = Tuple[Tuple[int, int], ...]  # (start, length) per segment of one mode


def segments(size: int, block_size: Optional[int]) -> Segments:
  """`size` cut into `⌈size / block_size⌉` nearly equal `(start, length)` segments (the
  longer ones first); one segment when `block_size` is `None` or not exceeded."""
  if block_size is None or size <= block_size:
    return ((0, size),)
  count = -(-size // block_size)
  base, extra = divmod(size, count)
  lengths = [base + 1] * extra + [base] * (count - extra)
  starts = np.cumsum([0] + lengths[:-1]).tolist()
  return tuple(zip(starts, lengths))


@dataclasses.dataclass(frozen=True)
class Partition:
  """The blocks of one leaf's mode tensor: per mode, its segments.

  Attributes:
    segments: per mode, the `(start, length)` segments it is cut into.
  """

  segments: Tuple[Segments, ...]

  @property
  def grid(self) -> Tuple[int, ...]:
    """The number of segments per mode."""
    return tuple(len(s) for s in self.segments)

  @property
  def count(self) -> int:
    """The number of blocks."""
    return int(np.prod(self.grid))

  def indices(self) -> List[Tuple[int, ...]]:
    """The blocks' grid indices, in row-major order."""
    return list(np.ndindex(*self.grid))

  def block_modes(self, index: Tuple[int, ...]) -> Tuple[int, ...]:
    """The mode sizes of the block at `index`."""
    return tuple(self.segments[mode][i][1] for mode, i in enumerate(index))

  def split(self, tensor: Array) -> List[Array]:
    """The blocks of `tensor` (shaped like the leaf's modes), in `indices()` order."""
    blocks = []
    for index in self.indices():
      starts = [self.segments[mode][i][0] for mode, i in enumerate(index)]
      blocks.append(jax.lax.slice(tensor, starts,
                                  [s + d for s, d in zip(starts, self.block_modes(index))]))
    return blocks

  def join(self, blocks: Sequence[Array]) -> Array:
    """The tensor whose blocks are `blocks` (in `indices()` order): `split`'s inverse."""
    nested = np.empty(self.grid, dtype=object)
    for index, block in zip(self.indices(), blocks):
      nested[index] = block
    return jnp.block(nested.tolist()) if len(self.grid) > 1 else jnp.concatenate(
        list(nested))


def partition(modes: Tuple[int, ...], diagonal: Tuple[bool, ...],
              block_size: Optional[int]) -> Partition:
  """The partition of a leaf with these modes: full modes longer than `block_size` are
  cut, diagonal ones (whose factor is a vector) are not."""
  return Partition(tuple(((0, d),) if diag else segments(d, block_size)
                         for d, diag in zip(modes, diagonal)))


def block_key(leaf_key: str, index: Tuple[int, ...]) -> str:
  """The unit key of a block, e.g. `"Dense_0/kernel[2,1]"`."""
  return f"{leaf_key}[{','.join(str(i) for i in index)}]"
