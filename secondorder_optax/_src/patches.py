"""The matrix view of a captured layer (DESIGN §4).

Every captured layer, dense or convolutional, is seen as `s = ā W̄` at a number of
locations t per example: `ā_{n,t}` are the (homogeneous) inputs / im2col patches, shape
`(B, T, d_in [+1])`, `g_{n,t}` the output gradients, shape `(B, T, d_out)`, and
`W̄ = [kernel reshaped to (d_in, d_out); bias]`. The per-example weight gradient is
`D_n = Σ_t ā_{n,t} g_{n,t}ᵀ`.

Functions here turn `LayerStats` into that view and move gradients between the parameter
layout (`{"kernel": ..., "bias": ...}`) and the matrix layout.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
from jax import lax

from secondorder_optax._src.base import LayerStats

Array = jax.Array


def _conv_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  """Channels-last dimension numbers, as flax uses them."""
  spatial = tuple(range(1, ndim - 1))
  lhs = (0, ndim - 1) + spatial
  rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
  return lax.ConvDimensionNumbers(lhs_spec=lhs, rhs_spec=rhs, out_spec=lhs)


def _conv_inputs(inputs: Array, conv: Any) -> Array:
  """A conv layer's recorded inputs as `(M, *spatial, c_in)` (batch and calls merged), with
  its `pre_pad` applied."""
  x = inputs.reshape((-1,) + inputs.shape[-(len(conv.kernel_size) + 1):])
  if conv.pre_pad is not None:
    mode, pads = conv.pre_pad
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),), mode=mode)
  return x


def _conv_patches(inputs: Array, stats: LayerStats) -> Array:
  """im2col patches `(M, *out_spatial, prod(kernel_size) * c_in)` in kernel order."""
  conv = stats.conv
  c_in = inputs.shape[-1]
  x = _conv_inputs(inputs, conv)
  patches = lax.conv_general_dilated_patches(
      x,
      filter_shape=conv.kernel_size,
      window_strides=conv.strides,
      padding=conv.padding,
      lhs_dilation=conv.input_dilation,
      rhs_dilation=conv.kernel_dilation,
      dimension_numbers=_conv_dimension_numbers(x.ndim),
      precision=lax.Precision.HIGHEST,
  )
  # lax orders the patch features as (c_in, *kernel_size); flax kernels are
  # (*kernel_size, c_in, c_out), so move c_in last.
  k = math.prod(conv.kernel_size)
  out_shape = patches.shape[:-1]
  patches = patches.reshape(out_shape + (c_in, k))
  patches = jnp.swapaxes(patches, -1, -2)
  return patches.reshape(out_shape + (k * c_in,))


def layer_inputs(stats: LayerStats, homogeneous: bool = True) -> Array:
  """Inputs / patches of an unstacked layer as `(B, T, d_in [+1])`."""
  _check_unstacked(stats)
  batch = stats.inputs.shape[0]
  if stats.kind == "conv":
    x = _conv_patches(stats.inputs, stats)
  else:
    x = stats.inputs
  x = x.reshape((batch, -1, x.shape[-1]))
  if homogeneous and stats.has_bias:
    x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
  return x


def layer_output_grads(stats: LayerStats) -> Array:
  """Output gradients of an unstacked layer as `(B, T, d_out)`."""
  _check_unstacked(stats)
  g = stats.output_grads
  return g.reshape((g.shape[0], -1, g.shape[-1]))


def example_grads(a: Array, g: Array) -> Array:
  """`D_n = Σ_t ā_{n,t} g_{n,t}ᵀ` from the matrix view's inputs `(B, T, d_in [+1])` and
  output grads `(B, T, d_out)`: `(B, d_in [+1], d_out)`."""
  return jnp.einsum("btd,bte->bde", a, g.astype(a.dtype),
                    precision=lax.Precision.HIGHEST)


def per_example_grads(stats: LayerStats) -> Array:
  """`D_n = Σ_t ā_{n,t} g_{n,t}ᵀ` for every example: `(B, d_in [+1], d_out)`."""
  return example_grads(layer_inputs(stats), layer_output_grads(stats))


def directional_derivatives(stats: LayerStats, direction: Dict[str, Array]) -> Array:
  """`⟨D_n, U⟩ = Σ_t ⟨ā_{n,t} U, g_{n,t}⟩` for every example of an unstacked layer: `(B,)`.

  `direction` is `{"kernel": ..., "bias": ...}` shaped like the layer's parameters (`U`
  in the matrix view). The layer's own product with the direction's kernel (a matrix
  product, or the convolution on the raw inputs) stands in for `ā U`, so no patches or
  per-example gradients are formed; the result is in float32 at least.
  """
  _check_unstacked(stats)
  dtype = jnp.promote_types(stats.inputs.dtype, jnp.float32)
  kernel = direction["kernel"].astype(dtype)
  x = stats.inputs.astype(dtype)
  batch = x.shape[0]
  if stats.kind == "conv":
    conv = stats.conv
    x = _conv_inputs(x, conv)
    outputs = lax.conv_general_dilated(
        x, kernel, window_strides=conv.strides, padding=conv.padding,
        lhs_dilation=conv.input_dilation, rhs_dilation=conv.kernel_dilation,
        dimension_numbers=_conv_dimension_numbers(x.ndim), precision=lax.Precision.HIGHEST)
  else:
    outputs = jnp.matmul(x, kernel.reshape((-1, kernel.shape[-1])),
                         precision=lax.Precision.HIGHEST)
  if stats.has_bias:
    outputs = outputs + direction["bias"].astype(dtype).reshape(-1)
  g = stats.output_grads.astype(dtype)
  return jnp.sum(outputs.reshape(batch, -1) * g.reshape(batch, -1), axis=-1)


def num_locations(stats: LayerStats) -> int:
  """T: output locations per example (times the number of calls)."""
  g = stats.output_grads
  return math.prod(g.shape[stats.stack_ndim + 1:-1])


def matrix_shape(stats: LayerStats) -> tuple:
  """Shape `(d_in [+1], d_out)` of the layer's matrix view."""
  d_in = math.prod(stats.kernel_shape[:-1]) + int(stats.has_bias)
  return (d_in, stats.kernel_shape[-1])


def params_to_matrix(layer_params: Dict[str, Array], has_bias: bool) -> Array:
  """`{"kernel", "bias"}` -> `W̄` of shape `(d_in [+1], d_out)`."""
  kernel = layer_params["kernel"]
  w = kernel.reshape((-1, kernel.shape[-1]))
  if has_bias:
    w = jnp.concatenate([w, layer_params["bias"].reshape((1, -1)).astype(w.dtype)], axis=0)
  return w


def matrix_to_params(matrix: Array, like: Dict[str, Array], has_bias: bool) -> Dict[str, Array]:
  """Inverse of `params_to_matrix`: splits `W̄` into leaves shaped (and typed) like `like`."""
  kernel = like["kernel"]
  out = dict(like)
  if has_bias:
    out["kernel"] = matrix[:-1].reshape(kernel.shape).astype(kernel.dtype)
    out["bias"] = matrix[-1].reshape(like["bias"].shape).astype(like["bias"].dtype)
  else:
    out["kernel"] = matrix.reshape(kernel.shape).astype(kernel.dtype)
  return out


def unstack(stats: LayerStats) -> List[LayerStats]:
  """Splits a stacked layer (inside `nn.scan` / `nn.vmap`) into its unstacked members."""
  if stats.stack_ndim == 0:
    return [stats]
  members = []
  for i in range(stats.inputs.shape[0]):
    member = stats.replace(inputs=stats.inputs[i], output_grads=stats.output_grads[i],
                           stack_ndim=stats.stack_ndim - 1)
    members.extend(unstack(member))
  return members


def _check_unstacked(stats: LayerStats) -> None:
  if stats.stack_ndim:
    raise ValueError("layer statistics are stacked (nn.scan / nn.vmap); call unstack() first")


def tree_get(tree: Any, path: tuple) -> Any:
  """`tree[p0][p1]...` for a nested dict / nnx.State."""
  node = tree
  for key in path:
    node = node[key]
  return node
