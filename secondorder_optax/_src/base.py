"""Containers for captured curvature and the conventions every method shares.

`Curvature` is what a capture function (`soo.linen_curvature`, `soo.nnx_curvature`)
returns next to the loss and the gradients; every second-order transformation takes it
through the `curvature=` extra argument of `update`.

This file also holds small shared conventions: how running averages start
(`running_average`: the first update takes the batch statistic itself) and how
hyperparameters that may be schedules are read (`hyperparameter_value`); the refresh
schedule itself lives in `engine`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple, Union

import chex
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
LayerPath = Tuple[Any, ...]
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


@flax.struct.dataclass(frozen=True)
class ConvConfig:
  """Static configuration of a captured convolution (flax `nn.Conv` / `nnx.Conv`).

  Attributes:
    kernel_size: spatial kernel size, one entry per spatial dimension.
    strides: window strides.
    padding: padding given to `lax.conv_general_dilated` *after* `pre_pad` has been
      applied: 'SAME', 'VALID' or a tuple of (low, high) pairs.
    input_dilation: lhs dilation.
    kernel_dilation: rhs dilation.
    pre_pad: padding applied to the raw input before the convolution, as
      `(numpy pad mode, ((low, high), ...) per spatial dim)`, for flax's 'CIRCULAR',
      'REFLECT' and 'CAUSAL' paddings; `None` otherwise.
  """

  kernel_size: Tuple[int, ...]
  strides: Tuple[int, ...]
  padding: Any
  input_dilation: Tuple[int, ...]
  kernel_dilation: Tuple[int, ...]
  pre_pad: Optional[Tuple[str, Tuple[Tuple[int, int], ...]]] = None


@flax.struct.dataclass
class LayerStats:
  """Per-example statistics of one captured layer.

  Attributes:
    inputs: the layer's inputs, per example, as the layer saw them. Shape
      `(*stack, B, [calls,] *locations, d_in)` for dense layers and
      `(*stack, B, [calls,] *spatial, c_in)` for convolutions.
    output_grads: `d loss_n / d output_n` per example at the Fisher targets (not divided
      by the batch size). Shape `(*stack, B, [calls,] *locations, d_out)`.
    kind: 'dense' or 'conv'.
    kernel_shape: shape of the layer's kernel without stacking axes.
    has_bias: whether the layer has a bias (the homogeneous coordinate).
    conv: the static convolution configuration, `None` for dense layers.
    calls: how many times the layer ran in the forward pass; when more than one the
      inputs and output gradients carry a `calls` axis right after the batch axis
      (a shared module: its per-example gradient sums over the calls).
    stack_ndim: number of leading stacking axes (a layer inside `nn.scan` / `nn.vmap`
      has its parameters and its statistics stacked along them).
  """

  inputs: Array
  output_grads: Array
  kind: str = flax.struct.field(pytree_node=False, default="dense")
  kernel_shape: Tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  has_bias: bool = flax.struct.field(pytree_node=False, default=True)
  conv: Optional[ConvConfig] = flax.struct.field(pytree_node=False, default=None)
  calls: int = flax.struct.field(pytree_node=False, default=1)
  stack_ndim: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def batch_size(self) -> int:
    return self.inputs.shape[self.stack_ndim]


@dataclasses.dataclass(frozen=True)
class LayerMeta:
  """Static facts about a captured layer, known without computing its statistics."""

  kind: str
  kernel_shape: Tuple[int, ...]
  has_bias: bool
  stack_ndim: int
  calls: int


@jax.tree_util.register_pytree_node_class
class FisherPullback:
  """A deferred pullback at sampled Fisher targets (see `Curvature`).

  Holds the forward pass's VJP, the model outputs, the sampling key and the recorded layer
  inputs; calling `materialize()` samples the targets, pulls their cotangent back (the
  extra backward pass) and assembles the per-layer statistics, so that none of it runs on
  steps that never read the curvature. `extract` (a module-level function, static) maps
  the perturbations' cotangent to `{path: [output grads per call]}`; `assemble` builds
  the `LayerStats`.
  """

  def __init__(self, vjp_fn, rng, outputs, inputs, loss_family, extract, assemble, static):
    self.vjp_fn = vjp_fn
    self.rng = rng
    self.outputs = outputs
    self.inputs = inputs
    self.loss_family = loss_family
    self.extract = extract
    self.assemble = assemble
    self.static = static

  def cotangent(self) -> Array:
    """d(summed loss at targets sampled from the model)/d(outputs)."""
    outputs = jax.lax.stop_gradient(self.outputs)
    targets = self.loss_family.sample(self.rng, outputs)
    per_example_loss = self.loss_family.per_example_loss
    cotangent = jax.grad(lambda o: per_example_loss(o, targets).sum())(outputs)
    return cotangent.astype(outputs.dtype)

  def materialize(self):
    param_ct, perturb_ct = self.vjp_fn(self.cotangent())
    batch_size = self.outputs.shape[0]
    fisher_grads = jax.tree.map(lambda g: g / batch_size, param_ct)
    layers = self.assemble(self.static, self.inputs, self.extract(perturb_ct, self.static))
    return layers, fisher_grads

  def tree_flatten(self):
    return ((self.vjp_fn, self.rng, self.outputs, self.inputs),
            (self.loss_family, self.extract, self.assemble, self.static))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)


@jax.tree_util.register_pytree_node_class
class Curvature:
  """Curvature information captured from one forward/backward pass.

  Attributes:
    layers: dict from the module path of each captured layer (the same path as its
      parameters in `params`, e.g. `("Dense_0",)`) to its `LayerStats`.
    fisher_grads: parameter gradients of the mean loss at the Fisher targets (sampled
      from the model, or the given targets for `fisher="empirical"`).
    fisher: 'sampled' or 'empirical'.
    layer_meta: static facts (kind, kernel shape, bias, stacking, calls) per layer,
      available without computing anything.
    empirical_layers: the per-layer statistics at the given targets, from the backward pass
      that computed the gradient (free: `layers` itself for `fisher="empirical"`); `None`
      for a curvature built without them. `soo.clip_by_kl` reads them for its exact
      model cap.
    one_categorical: whether each example's loss is the negative log-likelihood of one
      categorical distribution (softmax cross-entropy on `(batch, classes)` logits, or a
      sigmoid cross-entropy with one output per example): where the exact empirical
      Fisher is a model of the loss that `soo.clip_by_kl` can cap the step with.

  With `fisher="sampled"` a capture returns a *deferred* curvature: the extra backward
  pass at the sampled targets runs where `materialize()` is called (reading `layers` or
  `fisher_grads` calls it). The optimizers call it once, inside their statistics refresh
  (under `lax.cond`), and so pay for that backward pass only at statistics steps. Compute the curvature inside the same
  jitted step as the update (the usual pattern): a deferred curvature passed *into* a jitted
  function as an argument carries a fresh VJP each time and causes a recompile.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import secondorder_optax as soo
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> _, _, curvature = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)(
    ...     params, x, y, jax.random.key(1))
    >>> curvature.is_deferred, curvature.layer_meta[()].kernel_shape
    (True, (5, 3))
    >>> curvature.layers[()].output_grads.shape
    (4, 3)
  """

  def __init__(self, layers=None, fisher_grads=None, fisher: str = "sampled", *,
               deferred: Optional[FisherPullback] = None,
               layer_meta: Optional[Dict[LayerPath, LayerMeta]] = None,
               empirical_layers: Optional[Dict[LayerPath, LayerStats]] = None,
               one_categorical: bool = False):
    if deferred is None and layers is None:
      raise ValueError("Curvature needs layers= (or a deferred pullback)")
    self._layers = layers
    self._fisher_grads = fisher_grads
    self._deferred = deferred
    self.fisher = fisher
    if empirical_layers is None and fisher == "empirical":
      empirical_layers = layers
    self.empirical_layers = empirical_layers
    self.one_categorical = bool(one_categorical)
    if layer_meta is None:
      layer_meta = {path: LayerMeta(s.kind, tuple(s.kernel_shape), s.has_bias, s.stack_ndim,
                                    s.calls) for path, s in layers.items()}
    self.layer_meta = layer_meta

  @property
  def is_deferred(self) -> bool:
    return self._deferred is not None

  def materialize(self) -> Tuple[Dict[LayerPath, LayerStats], Any]:
    """`(layers, fisher_grads)`, running a deferred backward pass now (each call runs it
    again: the optimizers call this once per statistics step, inside its refresh branch)."""
    if self._deferred is None:
      return self._layers, self._fisher_grads
    return self._deferred.materialize()

  @property
  def batch_size(self) -> Optional[int]:
    """The number of examples the curvature was captured on (static; `None` when no layer
    was captured from an eager curvature)."""
    if self._deferred is not None:
      return self._deferred.outputs.shape[0]
    return next((s.batch_size for s in self._layers.values()), None)

  @property
  def layers(self) -> Dict[LayerPath, LayerStats]:
    """The per-layer statistics (`materialize()[0]`)."""
    return self.materialize()[0]

  @property
  def fisher_grads(self) -> Any:
    """Gradients of the mean loss at the Fisher targets (`materialize()[1]`)."""
    return self.materialize()[1]

  def materialized(self) -> "Curvature":
    """The same curvature with its statistics computed now."""
    if self._deferred is None:
      return self
    layers, fisher_grads = self._deferred.materialize()
    return Curvature(layers, fisher_grads, self.fisher, layer_meta=self.layer_meta,
                     empirical_layers=self.empirical_layers,
                     one_categorical=self.one_categorical)

  def finite_check_leaves(self) -> Any:
    """Arrays that can be inspected (e.g. for tracers or non-finite values) without running
    a deferred backward pass."""
    if self._deferred is None:
      return (self._layers, self._fisher_grads)
    return (self._deferred.outputs, self._deferred.inputs)

  def tree_flatten(self):
    return ((self._layers, self._fisher_grads, self._deferred, self.empirical_layers),
            (self.fisher, tuple(self.layer_meta.items()), self.one_categorical))

  @classmethod
  def tree_unflatten(cls, aux, children):
    layers, fisher_grads, deferred, empirical_layers = children
    obj = cls.__new__(cls)
    obj._layers, obj._fisher_grads, obj._deferred = layers, fisher_grads, deferred
    obj.empirical_layers = empirical_layers
    obj.fisher, obj.layer_meta, obj.one_categorical = aux[0], dict(aux[1]), aux[2]
    return obj

  def __repr__(self) -> str:
    state = "deferred" if self.is_deferred else "computed"
    return f"Curvature({self.fisher}, {state}, layers={list(self.layer_meta)})"


def path_keys(key_path: Any) -> LayerPath:
  """A `jax.tree_util` key path as plain names: dict keys, attribute names, sequence
  indices (`("Dense_0", "kernel")`, `("inner", "statistics", 0)`)."""
  out = []
  for entry in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        out.append(getattr(entry, attr))
        break
    else:
      out.append(str(entry))
  return tuple(out)


def path_to_str(path: LayerPath) -> str:
  """Human/state key for a layer path: `("Encoder_0", "Dense_1") -> "Encoder_0/Dense_1"`."""
  return "/".join(str(p) for p in path)


def hyperparameter_value(value: ScalarOrSchedule, count: Array, dtype: Any = jnp.float32
                         ) -> Array:
  """Reads a hyperparameter that is a number, an array or an optax schedule of `count`."""
  if callable(value):
    return jnp.asarray(value(count), dtype)
  return jnp.asarray(value, dtype)


def running_average(old: Any, new: Any, decay: ScalarOrSchedule, first: Array) -> Any:
  """EMA `decay * old + (1 - decay) * new`; the first update returns `new` itself."""
  weight = jnp.where(first, 0.0, jnp.asarray(decay, jnp.float32))
  return jax.tree.map(
      lambda o, n: (weight * o + (1.0 - weight) * n).astype(o.dtype), old, new)


def all_finite(tree: Any) -> Array:
  """True when every floating leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.stack(leaves).all()


def select_tree(pred: Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise `jnp.where(pred, on_true, on_false)` over two trees of equal structure."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def stats_dtype(dtype: Any) -> Any:
  """Statistics accumulate in float32 at least, whatever the parameter dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def check_stats(stats: LayerStats, name: str) -> None:
  """Validates the static shape relations of a `LayerStats` (clear errors, not traces)."""
  chex.assert_equal(stats.inputs.shape[:stats.stack_ndim + 1],
                    stats.output_grads.shape[:stats.stack_ndim + 1],
                    custom_message=f"layer {name}: inputs and output_grads batch axes differ")
