"""What the linen and NNX captures share: layer descriptions, the two-cotangent pullback,
and the assembly of `LayerStats` from what a forward pass recorded.

Both captures run the model once, with every supported layer's input recorded and a zero
"perturbation" added to its output. One VJP of `(params, perturbations) -> outputs` is then
pulled back twice: with the cotangent of the mean loss at the given targets (loss, grads)
and with the cotangent of the summed loss at the Fisher targets (per-example output grads =
the perturbations' gradients; `fisher_grads`). With `fisher="empirical"` the two cotangents
are proportional and one pullback serves both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from secondorder_optax._src.base import (ConvConfig, Curvature, FisherPullback, LayerMeta,
                                         LayerPath, LayerStats, path_to_str)
from secondorder_optax._src.losses import LossFamily

Array = jax.Array


class UnsupportedLayerError(ValueError):
  """A layer the capture recognises but cannot produce exact statistics for."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of a captured layer, recorded while tracing the forward pass."""

  kind: str
  has_bias: bool
  conv: Optional[ConvConfig] = None

  @property
  def kernel_ndim(self) -> int:
    return 2 if self.kind == "dense" else len(self.conv.kernel_size) + 2


def unsupported(name: str, what: str, skip: bool) -> None:
  """`None` (leave the layer uncaptured) when `skip`, else a clear error naming the layer."""
  if skip:
    return None
  raise UnsupportedLayerError(
      f"layer {name} uses {what}, which the curvature capture does not support. Leave "
      "skip_unsupported at its default (True) to leave such layers uncaptured, and pass "
      "layers='captured' to the optimizer so that their parameters go to its fallback.")


def check_loss_family(loss_family: Any) -> None:
  if not isinstance(loss_family, LossFamily):
    raise TypeError(
        f"loss_family must be a soo.losses family (e.g. soo.losses.softmax_cross_entropy), "
        f"got {loss_family!r}")


def _broadcast(value: Any, n: int) -> Tuple[int, ...]:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(int(v) for v in value)


def conv_config(name: str, kernel_size: Any, strides: Any, padding: Any,
                input_dilation: Any, kernel_dilation: Any) -> ConvConfig:
  """Resolves a flax-style conv configuration (linen or NNX) to a static `ConvConfig`.

  Replicates flax's handling of 'CIRCULAR', 'REFLECT' and 'CAUSAL' paddings (the input is
  padded before a 'VALID' convolution), so patches match what the layer computed.
  """
  kernel_size = _broadcast(kernel_size, 1) if isinstance(kernel_size, int) else tuple(kernel_size)
  n = len(kernel_size)
  strides = _broadcast(strides, n)
  input_dilation = _broadcast(input_dilation, n)
  kernel_dilation = _broadcast(kernel_dilation, n)
  pre_pad = None
  if isinstance(padding, str):
    mode = padding.upper()
    if mode in ("CIRCULAR", "REFLECT"):
      dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
      pre_pad = ({"CIRCULAR": "wrap", "REFLECT": "reflect"}[mode],
                 tuple(((k - 1) // 2, k // 2) for k in dilated))
      padding = "VALID"
    elif mode == "CAUSAL":
      if n != 1:
        raise UnsupportedLayerError(f"layer {name}: CAUSAL padding is only defined for 1-D convs")
      pre_pad = ("constant", ((kernel_dilation[0] * (kernel_size[0] - 1), 0),))
      padding = "VALID"
    elif mode in ("SAME", "VALID", "SAME_LOWER"):
      padding = mode
    else:
      raise UnsupportedLayerError(f"layer {name}: unknown padding {padding!r}")
  elif isinstance(padding, int):
    padding = ((padding, padding),) * n
  else:
    pads = []
    for p in padding:
      pads.append((int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1])))
    if len(pads) == 1 and n > 1:
      pads = pads * n
    padding = tuple(pads)
  return ConvConfig(kernel_size=kernel_size, strides=strides, padding=padding,
                    input_dilation=input_dilation, kernel_dilation=kernel_dilation,
                    pre_pad=pre_pad)


@dataclasses.dataclass(frozen=True)
class CaptureLayout:
  """Static description of what a capture recorded (hashable: pytree aux data).

  Attributes:
    paths: the captured layers' paths, in the order the per-layer lists are kept.
    specs: the `LayerSpec` of each path.
    kernel_shapes: each layer's kernel shape as in `params` (stacking axes included).
  """

  paths: Tuple[LayerPath, ...]
  specs: Tuple[LayerSpec, ...]
  kernel_shapes: Tuple[Tuple[int, ...], ...]

  def stack_ndim(self, i: int) -> int:
    return len(self.kernel_shapes[i]) - self.specs[i].kernel_ndim


def layout_and_meta(specs: Dict[LayerPath, LayerSpec], inputs: Dict[LayerPath, Any],
                    kernels: Dict[LayerPath, Any], how_to_fix: str):
  """Validates what a forward pass recorded; returns the static layout and layer meta."""
  if not specs:
    raise ValueError(
        "the model has no capturable layer (nn.Dense / nn.Conv, nnx.Linear / nnx.Conv); "
        "second-order methods need at least one, shape-only methods (soo.tnt, soo.shampoo) "
        "work from gradients alone")
  paths = tuple(specs)
  layout = CaptureLayout(paths=paths, specs=tuple(specs[p] for p in paths),
                         kernel_shapes=tuple(tuple(kernels[p].shape) for p in paths))
  meta = {}
  for i, path in enumerate(paths):
    xs = inputs.get(path)
    if not xs:
      raise ValueError(f"layer {path_to_str(path)} ran but produced no statistics. {how_to_fix}")
    stack_ndim = layout.stack_ndim(i)
    meta[path] = LayerMeta(kind=layout.specs[i].kind,
                           kernel_shape=layout.kernel_shapes[i][stack_ndim:],
                           has_bias=layout.specs[i].has_bias, stack_ndim=stack_ndim,
                           calls=len(xs))
  return layout, meta


def _stack_calls(values: Sequence[Array], stack_ndim: int, name: str, what: str) -> Array:
  if len(values) == 1:
    return values[0]
  shapes = {tuple(v.shape) for v in values}
  if len(shapes) != 1:
    raise UnsupportedLayerError(
        f"layer {name} was called {len(values)} times with {what} of different shapes "
        f"{sorted(shapes)}; a shared layer must see the same shape at every call")
  return jnp.stack(values, axis=stack_ndim + 1)


def assemble(layout: CaptureLayout, inputs: Sequence[Sequence[Array]],
             output_grads: Sequence[Sequence[Array]]) -> Dict[LayerPath, LayerStats]:
  """`LayerStats` per layer from per-call inputs and output grads (lists in layout order)."""
  layers = {}
  for i, path in enumerate(layout.paths):
    name = path_to_str(path)
    xs, gs = list(inputs[i]), list(output_grads[i] or [])
    if len(xs) != len(gs):
      raise ValueError(f"layer {name}: {len(xs)} recorded inputs but {len(gs)} output grads")
    stack_ndim = layout.stack_ndim(i)
    spec = layout.specs[i]
    layers[path] = LayerStats(
        inputs=_stack_calls(xs, stack_ndim, name, "inputs"),
        output_grads=_stack_calls(gs, stack_ndim, name, "outputs"),
        kind=spec.kind,
        kernel_shape=layout.kernel_shapes[i][stack_ndim:],
        has_bias=spec.has_bias,
        conv=spec.conv,
        calls=len(xs),
        stack_ndim=stack_ndim,
    )
  return layers


def finish_capture(outputs: Array, vjp_fn: Callable, loss_family: LossFamily, targets: Array,
                   rng: Optional[jax.Array], fisher: str, *, specs, inputs, kernels,
                   extract: Callable, how_to_fix: str, defer: bool):
  """Loss, grads and curvature from one forward pass's VJP.

  The VJP is pulled back with the cotangent of the mean loss at the given targets (loss,
  grads) and with that of the summed loss at the Fisher targets (per-example output grads =
  the perturbations' cotangents; `fisher_grads`). With `fisher="empirical"` both are the
  same pullback. With `fisher="sampled"` and `defer=True` the second pullback is deferred
  into the returned `Curvature` (see its docstring).

  Args:
    extract: module-level function `(perturbation cotangent, layout) -> list (layout order)
      of per-call output grads`.
  """
  loss_family.check_targets(outputs, targets)
  layout, meta = layout_and_meta(specs, inputs, kernels, how_to_fix)
  recorded = [list(inputs[p]) for p in layout.paths]
  batch = outputs.shape[0]

  def mean_loss(out, tgt):
    return loss_family.per_example_loss(out, tgt).mean()

  loss, ct_true = jax.value_and_grad(mean_loss)(outputs, targets)
  one_categorical = loss_family.one_categorical(outputs)
  if fisher == "empirical":
    param_ct, perturb_ct = vjp_fn((ct_true * batch).astype(outputs.dtype))
    grads = jax.tree.map(lambda g: g / batch, param_ct)
    layers = assemble(layout, recorded, extract(perturb_ct, layout))
    return loss, grads, Curvature(layers, grads, fisher, layer_meta=meta,
                                  one_categorical=one_categorical)
  if rng is None:
    raise ValueError("fisher='sampled' needs an rng to sample targets from the model; pass "
                     "rng=jax.random.key(...) or use fisher='empirical'")
  grads, perturb_ct = vjp_fn(ct_true.astype(outputs.dtype))
  # The gradient's own pullback also gives each layer's output grads at the given targets.
  empirical = assemble(layout, recorded,
                       extract(jax.tree.map(lambda c: c * batch, perturb_ct), layout))
  deferred = FisherPullback(vjp_fn, rng, outputs, recorded, loss_family, extract, assemble,
                            layout)
  curvature = Curvature(fisher=fisher, deferred=deferred, layer_meta=meta,
                        empirical_layers=empirical, one_categorical=one_categorical)
  return loss, grads, (curvature if defer else curvature.materialized())


def nested_get(tree: Any, path: LayerPath, default: Any = None) -> Any:
  node = tree
  for key in path:
    try:
      node = node[key]
    except (KeyError, IndexError, TypeError):
      return default
  return node


def check_batch(inputs: Any, targets: Any) -> None:
  leaves = jax.tree.leaves(inputs)
  if leaves and hasattr(targets, "shape") and targets.shape and leaves[0].shape[:1] != targets.shape[:1]:
    raise ValueError(
        f"inputs have batch size {leaves[0].shape[0]} but targets have {targets.shape[0]}; "
        "the leading axis of both is the example axis")
