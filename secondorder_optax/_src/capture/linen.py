"""Curvature capture for `flax.linen` models.

Mechanism: a method interceptor (`nn.intercept_methods`) wraps `__call__` of every
`nn.Dense` and `nn.Conv` while the capture runs; the user's model is not changed. The
interceptor sows the layer's input into the `soo_inputs` collection and passes its output
through `Module.perturb` in the `soo_perturbations` collection. A shared module called
several times is indexed by the number of inputs it has already sown, so each call gets its
own perturbation. Layers inside `nn.scan` / `nn.vmap` need both collections in the
transform's `variable_axes` (e.g. `variable_axes={"params": 0, "soo_inputs": 0,
"soo_perturbations": 0}`); a layer that ran but whose statistics were dropped raises an
error naming it.

The forward pass runs once; its VJP is pulled back with the cotangent of the given targets'
loss and with that of the Fisher targets (see `capture/common.py`).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import flax.linen as nn
import jax

from secondorder_optax._src import validation
from secondorder_optax._src.capture import common
from secondorder_optax._src.losses import LossFamily

INPUTS = "soo_inputs"
PERTURBATIONS = "soo_perturbations"
_HOW_TO_FIX = (
    "Its statistics were dropped by a lifted transform: add 'soo_inputs' and "
    "'soo_perturbations' to the variable_axes of nn.scan / nn.vmap (e.g. "
    "variable_axes={'params': 0, 'soo_inputs': 0, 'soo_perturbations': 0}).")


def _layer_spec(module: nn.Module, skip_unsupported: bool) -> Optional[common.LayerSpec]:
  """The static description of a supported layer, `None` for other modules."""
  name = "/".join(module.path) or type(module).__name__
  if isinstance(module, nn.Dense):
    if getattr(module, "dot_general_cls", None) is not None or module.dot_general is not None:
      return common.unsupported(name, "a custom dot_general", skip_unsupported)
    return common.LayerSpec(kind="dense", has_bias=module.use_bias)
  if isinstance(module, nn.Conv):
    if module.feature_group_count != 1:
      return common.unsupported(name, f"grouped convolution (feature_group_count="
                          f"{module.feature_group_count})", skip_unsupported)
    if module.mask is not None:
      return common.unsupported(name, "a kernel mask", skip_unsupported)
    if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
      return common.unsupported(name, "a custom conv_general_dilated", skip_unsupported)
    conv = common.conv_config(name, module.kernel_size, module.strides, module.padding,
                              module.input_dilation, module.kernel_dilation)
    return common.LayerSpec(kind="conv", has_bias=module.use_bias, conv=conv)
  return None


class _Interceptor:
  """Sows inputs and perturbs outputs of supported layers; records their specs."""

  def __init__(self, skip_unsupported: bool):
    self.skip_unsupported = skip_unsupported
    self.specs: Dict[tuple, common.LayerSpec] = {}

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    spec = _layer_spec(module, self.skip_unsupported)
    if spec is None:
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs.get("inputs")
    path = tuple(module.path)
    self.specs[path] = spec
    sown = module.get_variable(INPUTS, "inputs") if module.has_variable(INPUTS, "inputs") else ()
    call_index = len(sown)
    module.sow(INPUTS, "inputs", x)
    y = next_fun(*args, **kwargs)
    return module.perturb(f"out_{call_index}", y, collection=PERTURBATIONS)


def linen_curvature(model: nn.Module, loss_family: LossFamily, *, fisher: str = "sampled",
                    mutable: Sequence[str] = (), skip_unsupported: bool = True,
                    defer: bool = True):
  """Builds a function returning loss, gradients and curvature of a linen model.

  Every `nn.Dense` and `nn.Conv` of the model (1-D/2-D/3-D, any strides, padding,
  dilation) is captured. Other layers (DenseGeneral, Einsum, ConvTranspose) and grouped,
  masked or custom-kernel-function Dense/Conv layers are left uncaptured: pass
  `layers='captured'` to a layer-wise optimizer so that their leaves go to its fallback.

  Args:
    model: a `flax.linen.Module` whose outputs parameterise `loss_family`.
    loss_family: one of `soo.losses.*`.
    fisher: 'sampled' (targets drawn from the model: true Fisher) or 'empirical'.
    mutable: collections the forward pass updates (e.g. `("batch_stats",)`); when given,
      the function also returns the updated collections.
    skip_unsupported: `False` raises a clear error at grouped, masked or
      custom-kernel-function Dense/Conv layers instead of leaving them uncaptured.
    defer: with `fisher="sampled"`, defer the backward pass at the sampled targets until
      the curvature's statistics are read (see `soo.Curvature`): an optimizer that reads
      them only at statistics refreshes then pays for it only there. `False` computes
      everything now (use it to pass the curvature across a `jax.jit` boundary).

  Returns:
    `fn(params, inputs, targets, rng=None, *, model_state=None, rngs=None,
    **apply_kwargs)` returning `(loss, grads, curvature)`, or
    `(loss, grads, curvature, new_model_state)` when `mutable` is non-empty. `model_state`
    holds the non-parameter collections (e.g. `{"batch_stats": ...}`), `rngs` the model's
    own rngs (e.g. `{"dropout": key}`), `rng` samples the Fisher targets. Pure and jit-able.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import secondorder_optax as soo
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)
    >>> loss, grads, curvature = jax.jit(curv_fn)(params, x, y, jax.random.key(1))
    >>> sorted(curvature.layers)
    [('layers_0',), ('layers_2',)]
  """
  validation.check_fisher("linen_curvature", fisher)
  common.check_loss_family(loss_family)
  mutable = tuple(mutable)

  def apply(params, perturbations, inputs, model_state, rngs, apply_kwargs,
            interceptor, extra_mutable):
    variables = {"params": params, **(model_state or {})}
    if perturbations is not None:
      variables[PERTURBATIONS] = perturbations
    with nn.intercept_methods(interceptor):
      return model.apply(variables, inputs, rngs=rngs,
                         mutable=[INPUTS, *extra_mutable, *mutable], **apply_kwargs)

  def curvature_fn(params, inputs, targets, rng=None, *, model_state=None, rngs=None,
                   **apply_kwargs):
    common.check_batch(inputs, targets)
    interceptor = _Interceptor(skip_unsupported)
    # Shapes of the perturbations, and the spec of every layer that runs (tracing only).
    _, shape_vars = jax.eval_shape(
        lambda p: apply(p, None, inputs, model_state, rngs, apply_kwargs, interceptor,
                        [PERTURBATIONS]), params)
    perturbations = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype),
                                 shape_vars.get(PERTURBATIONS, {}))

    def forward(p, perturb):
      outputs, new_vars = apply(p, perturb, inputs, model_state, rngs, apply_kwargs,
                                _Interceptor(skip_unsupported), [])
      return outputs, new_vars

    outputs, vjp_fn, new_vars = jax.vjp(forward, params, perturbations, has_aux=True)
    specs = interceptor.specs
    sown = new_vars.get(INPUTS, {})
    loss, grads, curvature = common.finish_capture(
        outputs, vjp_fn, loss_family, targets, rng, fisher,
        specs=specs,
        inputs={p: common.nested_get(sown, p + ("inputs",)) for p in specs},
        kernels={p: common.nested_get(params, p + ("kernel",)) for p in specs},
        extract=_output_grads, how_to_fix=_HOW_TO_FIX, defer=defer)
    if mutable:
      new_state = {k: v for k, v in new_vars.items() if k in mutable}
      return loss, grads, curvature, new_state
    return loss, grads, curvature

  return curvature_fn


def _output_grads(perturbation_cotangent, layout):
  """Per layer (layout order), `{"out_0": g0, "out_1": g1, ...}` -> `[g0, g1, ...]`."""
  grads = []
  for path in layout.paths:
    per_call = common.nested_get(perturbation_cotangent, path) or {}
    grads.append([per_call[f"out_{i}"] for i in range(len(per_call))])
  return grads
