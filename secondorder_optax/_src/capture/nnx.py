"""Curvature capture for `flax.nnx` models.

Mechanism. NNX has no method interceptors, so while a capture runs it temporarily replaces
`nnx.Linear.__call__` and `nnx.Conv.__call__` by a recording wrapper; the originals are put
back when the capture returns, also when the forward pass raises. The wrapper does nothing
unless a capture is active on the current thread *and* the layer belongs to that capture's
private copy of the model, so other models (and other threads) run unchanged.

The capture never runs the user's model object itself. It splits the model into
`(graphdef, params, other state)` and merges a private copy inside its pure functions. Every
supported layer of that copy is stamped with its module path (a static attribute, which
graphdefs carry into `nnx.jit`, `nnx.remat` and `nnx.scan` bodies), and at each call the
wrapper

  * appends the layer input to a `CapturedInputs` variable on the layer. The call's index is
    the number of inputs the active capture has already recorded on that layer (0, 1, ... for
    a shared layer called several times). It is read from the capture's own records, never
    from a global counter, so a second capture, of the same or another model, starts from 0
    and names its layers correctly;
  * adds the zero perturbation `OutputPerturbations[index]` to the layer output.

Both are ordinary NNX variables of the layer, so NNX's lifted transforms carry them in and
out like any other state: under `nnx.remat` / `nnx.jit` unchanged, under `nnx.scan` over a
stack of layers stacked along the scan axis (the layer's `LayerStats.stack_ndim` is then 1,
like its stacked kernel). A layer that ran but whose records did not come back out (a raw
`jax` transform around it, or `nnx.StateAxes` filters that leave the capture's variables
out) raises an error naming it.

The capture traces the model twice and runs it once: a shape-only pass (`jax.eval_shape`)
finds the layers that run and the shapes of their outputs; then one forward pass inside
`jax.vjp` with respect to `(params, perturbations)`, whose VJP is pulled back with the
true-target and the Fisher-target cotangents (`capture/common.py`): the perturbations'
gradients are the per-example output gradients.

State. The non-parameter state the forward pass updates (BatchNorm batch statistics, rng
stream counters used by `nnx.Dropout`, ...) is written back into `model` (and into graph-node
call arguments such as an `nnx.Rngs` passed as `rngs=`), exactly as calling the model would
do; parameters are never changed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from secondorder_optax._src.base import LayerPath, path_to_str
from secondorder_optax._src import validation
from secondorder_optax._src.capture import common
from secondorder_optax._src.losses import LossFamily

_PATH_ATTR = "_soo_capture_path"
_INPUTS_ATTR = "soo_captured_inputs"
_PERTURBATIONS_ATTR = "soo_output_perturbations"
_HOW_TO_FIX = (
    "Its recorded inputs did not come out of a transform around it: apply NNX's lifted "
    "transforms (nnx.scan, nnx.remat, nnx.vmap, nnx.jit) to the module rather than raw jax "
    "transforms to nnx.split/nnx.merge'd copies of it, and where nnx.StateAxes is given, give "
    "the layer's non-parameter variables the axis of its parameters (e.g. {...: 0}).")


class CaptureVariable(nnx.Variable):
  """Base type of the variables a capture puts on the layers of its private model copy."""


class CapturedInputs(CaptureVariable):
  """The inputs of every call of a layer, as a tuple (one entry per call)."""


class OutputPerturbations(CaptureVariable):
  """Zero perturbations added to the outputs of every call of a layer."""


# ---------------------------------------------------------------------------------------
# Layer descriptions.


def _layer_spec(module: nnx.Module, name: str,
                skip_unsupported: bool) -> Optional[common.LayerSpec]:
  """The static description of a supported layer; `None` for a skipped one."""
  if isinstance(module, nnx.Linear):
    if module.dot_general is not lax.dot_general:
      return common.unsupported(name, "a custom dot_general", skip_unsupported)
    return common.LayerSpec(kind="dense", has_bias=module.bias is not None)
  if module.feature_group_count != 1:
    return common.unsupported(name, f"grouped convolution (feature_group_count="
                        f"{module.feature_group_count})", skip_unsupported)
  if module.mask is not None:
    return common.unsupported(name, "a kernel mask", skip_unsupported)
  if module.conv_general_dilated is not lax.conv_general_dilated:
    return common.unsupported(name, "a custom conv_general_dilated", skip_unsupported)
  conv = common.conv_config(name, module.kernel_size, module.strides, module.padding,
                            module.input_dilation, module.kernel_dilation)
  return common.LayerSpec(kind="conv", has_bias=module.bias is not None, conv=conv)


# ---------------------------------------------------------------------------------------
# The active capture and the temporary __call__ wrappers.


class _Capture:
  """One capture pass: records the specs of the layers that ran; creates or applies
  the output perturbations."""

  def __init__(self, skip_unsupported: bool, create_perturbations: bool):
    self.skip_unsupported = skip_unsupported
    self.create_perturbations = create_perturbations
    self.specs: Dict[LayerPath, common.LayerSpec] = {}
    self.skipped: set = set()

  def spec(self, module: nnx.Module, path: LayerPath) -> Optional[common.LayerSpec]:
    if path in self.skipped:
      return None
    if path not in self.specs:
      spec = _layer_spec(module, path_to_str(path), self.skip_unsupported)
      if spec is None:
        self.skipped.add(path)
        return None
      self.specs[path] = spec
    return self.specs[path]

  def call(self, module: nnx.Module, path: LayerPath, original: Callable, args, kwargs):
    if self.spec(module, path) is None:
      return original(module, *args, **kwargs)
    inputs = args[0] if args else kwargs["inputs"]
    recorded = getattr(module, _INPUTS_ATTR, None)
    index = 0 if recorded is None else len(recorded.get_value())
    _append(module, _INPUTS_ATTR, CapturedInputs, inputs)
    outputs = original(module, *args, **kwargs)
    if self.create_perturbations:
      _append(module, _PERTURBATIONS_ATTR, OutputPerturbations, jnp.zeros_like(outputs))
      return outputs
    perturbations = getattr(module, _PERTURBATIONS_ATTR, None)
    perturbations = () if perturbations is None else perturbations.get_value()
    if index >= len(perturbations) or perturbations[index].shape != outputs.shape:
      raise ValueError(
          f"layer {path_to_str(path)}: call {index} differs between the capture's shape pass "
          "and its forward pass; the model's forward pass must be deterministic in its "
          "structure (same layers, calls and shapes each time it is traced)")
    return outputs + perturbations[index].astype(outputs.dtype)


def _append(module: nnx.Module, attr: str, kind: type, value: Any) -> None:
  variable = getattr(module, attr, None)
  if variable is None:
    setattr(module, attr, kind((value,)))
  else:
    variable.set_value(variable.get_value() + (value,))


_LOCAL = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]
_PATCHED_CLASSES = (nnx.Linear, nnx.Conv)
_ORIGINALS: Dict[type, Callable] = {}


def _active() -> Optional[_Capture]:
  stack = getattr(_LOCAL, "stack", None)
  return stack[-1] if stack else None


def _make_wrapper(original: Callable) -> Callable:
  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    capture = _active()
    path = vars(self).get(_PATH_ATTR)
    if capture is None or path is None:
      return original(self, *args, **kwargs)
    return capture.call(self, path, original, args, kwargs)
  wrapper.__soo_capture_wrapper__ = True
  return wrapper


@contextlib.contextmanager
def _capturing(capture: _Capture):
  """Installs the wrappers (once, however deeply nested) and makes `capture` active."""
  with _PATCH_LOCK:
    if _PATCH_DEPTH[0] == 0:
      for cls in _PATCHED_CLASSES:
        _ORIGINALS[cls] = cls.__dict__["__call__"]
        cls.__call__ = _make_wrapper(_ORIGINALS[cls])
    _PATCH_DEPTH[0] += 1
  stack = getattr(_LOCAL, "stack", None)
  if stack is None:
    stack = _LOCAL.stack = []
  stack.append(capture)
  try:
    yield capture
  finally:
    stack.pop()
    with _PATCH_LOCK:
      _PATCH_DEPTH[0] -= 1
      if _PATCH_DEPTH[0] == 0:
        for cls in _PATCHED_CLASSES:
          cls.__call__ = _ORIGINALS.pop(cls)


# ---------------------------------------------------------------------------------------
# The private model copy.


def _stamp_layers(model: nnx.Module) -> Dict[LayerPath, nnx.Module]:
  """Marks every Linear/Conv of a private copy with its path; returns them by path."""
  layers = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, _PATCHED_CLASSES):
      path = tuple(path)
      object.__setattr__(module, _PATH_ATTR, path)
      layers[path] = module
  return layers


def _records(layers: Dict[LayerPath, nnx.Module], attr: str,
             paths) -> Dict[LayerPath, Optional[Tuple[Any, ...]]]:
  out = {}
  for path in paths:
    variable = getattr(layers[path], attr, None)
    out[path] = None if variable is None else tuple(variable.get_value())
  return out


_MODEL_STATE = nnx.All(nnx.Not(nnx.Param), nnx.Not(CaptureVariable))


def _split_call_kwargs(call_kwargs: Dict[str, Any]):
  """Separates graph-node call arguments (e.g. an `nnx.Rngs`) so they can be merged back."""
  nodes = {k: v for k, v in call_kwargs.items() if isinstance(v, (nnx.Pytree, nnx.Variable))}
  plain = {k: v for k, v in call_kwargs.items() if k not in nodes}
  graphdef, state = nnx.split(nodes)
  return plain, nodes, graphdef, state


def nnx_curvature(loss_family: LossFamily, *, fisher: str = "sampled",
                  skip_unsupported: bool = True, defer: bool = True):
  """Builds a function returning loss, gradients and curvature of an NNX model.

  Every `nnx.Linear` and `nnx.Conv` that runs in the model's forward pass (1-D/2-D/3-D, any
  strides, padding, dilation; also inside `nnx.remat` and `nnx.scan`, and shared layers
  called several times) is captured; see the module docstring for the mechanism. Grouped,
  masked or custom-kernel-function layers are left uncaptured (as are layers of other
  kinds): pass `layers='captured'` to a layer-wise optimizer so that their leaves go to
  its fallback.

  Args:
    loss_family: one of `soo.losses.*`; the model's outputs parameterise it.
    fisher: 'sampled' (targets drawn from the model: true Fisher) or 'empirical'.
    skip_unsupported: `False` raises a clear error at grouped, masked or
      custom-kernel-function layers instead of leaving them uncaptured.
    defer: with `fisher="sampled"`, defer the backward pass at the sampled targets until
      the statistics are read (see `soo.Curvature` and `soo.linen_curvature`).

  Returns:
    `fn(model, inputs, targets, rng=None, **call_kwargs) -> (loss, grads, curvature)`.
    The forward pass is `model(inputs, **call_kwargs)`; `rng` samples the Fisher targets.
    `grads` is an `nnx.State` of the model's `nnx.Param`s, as `nnx.grad` gives it;
    `curvature.layers` is keyed by each layer's module path, the path of its `kernel`'s
    parent in `nnx.state(model, nnx.Param)`. Updated non-parameter state (BatchNorm
    statistics, dropout rng counters) is written back into `model`. Works eagerly and
    under `nnx.jit`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import secondorder_optax as soo
    >>> model = nnx.Sequential(nnx.Linear(5, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> curv_fn = soo.nnx_curvature(soo.losses.softmax_cross_entropy)
    >>> loss, grads, curvature = nnx.jit(curv_fn)(model, x, y, jax.random.key(1))
    >>> sorted(curvature.layers)
    [('layers', 0), ('layers', 2)]
    >>> curvature.layers[('layers', 0)].output_grads.shape
    (4, 8)
  """
  validation.check_fisher("nnx_curvature", fisher)
  common.check_loss_family(loss_family)

  def curvature_fn(model, inputs, targets, rng=None, **call_kwargs):
    if not isinstance(model, nnx.Module):
      raise TypeError(f"nnx_curvature: model must be a flax.nnx.Module, got "
                      f"{type(model).__name__} (use soo.linen_curvature for linen models)")
    common.check_batch(inputs, targets)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    plain_kwargs, kwarg_nodes, kw_graphdef, kw_state = _split_call_kwargs(call_kwargs)

    def run(capture, params, perturbations, paths):
      copy = nnx.merge(graphdef, params, model_state, copy=True)
      layers = _stamp_layers(copy)
      for path, values in zip(paths, perturbations):
        setattr(layers[path], _PERTURBATIONS_ATTR, OutputPerturbations(tuple(values)))
      kwargs = {**plain_kwargs, **nnx.merge(kw_graphdef, kw_state, copy=True)}
      with _capturing(capture):
        outputs = copy(inputs, **kwargs)
      ran = list(capture.specs)
      new_state = (nnx.state(copy, _MODEL_STATE),
                   nnx.state({k: kwargs[k] for k in kwarg_nodes}))
      return outputs, layers, ran, new_state

    # Pass 1 (tracing only): the layers that run and the shapes of their outputs.
    shape_capture = _Capture(skip_unsupported, create_perturbations=True)
    shape_paths: List[LayerPath] = []

    def shapes(params):
      _, layers, ran, _ = run(shape_capture, params, (), ())
      shape_paths.extend(ran)
      found = _records(layers, _PERTURBATIONS_ATTR, ran)
      for path in ran:
        if found[path] is None:
          raise ValueError(f"layer {path_to_str(path)} ran but produced no statistics. "
                           f"{_HOW_TO_FIX}")
      return [found[p] for p in ran]

    perturbation_shapes = jax.eval_shape(shapes, params)
    paths = tuple(shape_paths)
    perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), perturbation_shapes)

    # Pass 2: one forward pass, its VJP pulled back twice.
    capture = _Capture(skip_unsupported, create_perturbations=False)

    def forward(params, perturbations):
      outputs, layers, _, new_state = run(capture, params, perturbations, paths)
      return outputs, (_records(layers, _INPUTS_ATTR, paths), new_state)

    outputs, vjp_fn, (recorded, (new_model_state, new_kw_state)) = jax.vjp(
        forward, params, perturbations, has_aux=True)
    loss, grads, curvature = common.finish_capture(
        outputs, vjp_fn, loss_family, targets, rng, fisher,
        specs={p: shape_capture.specs[p] for p in paths},
        inputs=recorded,
        kernels={p: common.nested_get(params, p + ("kernel",)) for p in paths},
        extract=_output_grads, how_to_fix=_HOW_TO_FIX, defer=defer)
    nnx.update(model, new_model_state)
    if kwarg_nodes:
      nnx.update(kwarg_nodes, new_kw_state)
    return loss, grads, curvature

  return curvature_fn


def _output_grads(perturbation_cotangent, layout):
  """The perturbations' cotangent is already a list of per-call grads in layout order."""
  del layout
  return [list(g) if g else [] for g in perturbation_cotangent]
