"""The KFAC family: KFAC (KFC for convolutions), EKFAC, TKFAC and TEKFAC (DESIGN §4–§6).

All four precondition each captured layer in its matrix view `W̄ = [kernel; bias]`
(`(d_in [+1], d_out)`, flax kernel orientation) with a Kronecker-factored approximation of
the layer's Fisher block built from the layer's (homogeneous) inputs `ā` and per-example
output gradients `g` (`d l_n / d s_n`, not divided by the batch size N). With `T` output
locations per example (`T = 1` for a plain dense layer; im2col patches for a convolution):

* **KFAC / KFC** — `A = E_n Σ_t ā ā ᵀ`, `G = E_n (1/T) Σ_t g gᵀ`; factored Tikhonov
  damping with the π correction, `A_d = A + π√λ I`, `G_d = G + (√λ/π) I`,
  `π = sqrt((tr A / dim A) / (tr G / dim G))`; direction `A_d⁻¹ ∇W̄ G_d⁻¹`.
* **EKFAC** — eigenbases `Q_A`, `Q_G` of `A`, `G`; scalings `S = E_n[(Q_Aᵀ D_n Q_G)²]`
  from the per-example gradients `D_n = Σ_t ā_{n,t} g_{n,t}ᵀ`; direction
  `Q_A [(Q_Aᵀ ∇W̄ Q_G) / (S + λ)] Q_Gᵀ`.
* **TKFAC** — trace-restricted factors `δ = E_n Σ_t |ā|² |g|²`,
  `δΦ = E_n Σ_t |g|² ā ā ᵀ`, `δΨ = E_n Σ_t |ā|² g gᵀ` (so `tr Φ = tr Ψ = 1` and, for a dense
  layer, `tr(δ Φ ⊗ Ψ) = δ` is the trace of the exact Fisher block); damping folds the scale
  in, `Φ_d = √δ Φ + √λ I`, `Ψ_d = √δ Ψ + √λ I`; direction `Φ_d⁻¹ ∇W̄ Ψ_d⁻¹`. For convolutions
  (and shared / sequence dense layers) the sums run over output locations as in KFC, i.e. δ
  is the trace of the spatially-uncorrelated (KFC) block `E_n Σ_t (ā ā ᵀ) ⊗ (g gᵀ)`.
* **TEKFAC** — EKFAC's eigenvalue correction in TKFAC's eigenbasis (eigenvectors of `Φ`,
  `Ψ`), `S = E_n[(Q_Φᵀ D_n Q_Ψ)²]`, direction `Q_Φ [(Q_Φᵀ ∇W̄ Q_Ψ) / (S + λ)] Q_Ψᵀ`.

State and schedule: the factor statistics (`A`/`G`, or `δΦ`/`δΨ`) are running averages in
the optimizer state, updated where `count % stats_every == 0` (the first update takes the
batch statistic). Inverses (KFAC, TKFAC) or eigenbases (EKFAC, TEKFAC) are recomputed where
`count % inverse_every == 0`, under `lax.cond`, with all same-shape factors of the model in
one `vmap`ped Cholesky / `eigh` call; a non-finite result keeps the previous one and counts
a failure. The scalings `S` are re-estimated (and running-averaged) at every statistics step
and at every eigenbasis refresh, in the current eigenbasis. KFAC/TKFAC fold the damping into
the inverses, so a changed damping (a schedule or `inject_hyperparams`) takes effect at the
next inverse refresh; EKFAC/TEKFAC apply it at every step.

Relation to kfac-jax (checked numerically on a fixed MLP with the empirical Fisher):
kfac-jax's input factor equals our `A`, its output factor is `1/N` of our `G` (it uses
gradients of the batch-*mean* loss). Hence kfac-jax's KFAC direction at damping `λ` equals
`N ×` ours at damping `N·λ`; to reproduce a kfac-jax run with batch size N, use
`damping = N · λ_kfac_jax` and a learning rate `N ×` larger.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import alias, layerwise, linalg, patches
from secondorder_optax._src.base import (LayerPath, LayerStats, ScalarOrSchedule,
                                         hyperparameter_value, is_due, refresh,
                                         refresh_statistics, running_average, stats_dtype)

Array = jax.Array
# Smallest trace used when normalising factors: keeps an all-zero layer finite.
_TINY = float(jnp.finfo(jnp.float32).tiny)


class KroneckerLayerState(NamedTuple):
  """Per-layer state of KFAC and TKFAC.

  Attributes:
    input_factor: running average of `A` (KFAC) or `δΦ` (TKFAC), `(d_in [+1],) * 2`.
    output_factor: running average of `G` (KFAC) or `δΨ` (TKFAC), `(d_out, d_out)`.
    input_inverse: damped inverse of the input factor at the last refresh (zeros before
      the first successful one).
    output_inverse: damped inverse of the output factor at the last refresh.
  """

  input_factor: Array
  output_factor: Array
  input_inverse: Array
  output_inverse: Array


class EigenLayerState(NamedTuple):
  """Per-layer state of EKFAC and TEKFAC.

  Attributes:
    input_factor: running average of `A` (EKFAC) or `δΦ` (TEKFAC).
    output_factor: running average of `G` (EKFAC) or `δΨ` (TEKFAC).
    input_basis: eigenvectors of the input factor at the last refresh (columns; zeros
      before the first successful one).
    output_basis: eigenvectors of the output factor at the last refresh.
    scalings: running average of `S = E_n[(Q_inᵀ D_n Q_out)²]`, `(d_in [+1], d_out)`.
    input_basis_t: `input_basis` transposed, stored when the bases are in a dtype narrower
      than float32 (`preconditioner_dtype=jnp.bfloat16`), else an empty `(0,)` array:
      XLA:CPU multiplies bfloat16 at full speed only with row-major operands, so each
      step's four products read a stored basis in the orientation they need.
    output_basis_t: `output_basis` transposed, likewise.
  """

  input_factor: Array
  output_factor: Array
  input_basis: Array
  output_basis: Array
  scalings: Array
  input_basis_t: Array
  output_basis_t: Array


@dataclasses.dataclass(frozen=True)
class _Variant:
  """Which member of the family: factor kind and curvature representation."""

  name: str
  trace_restricted: bool  # TKFAC/TEKFAC factors (δΦ, δΨ) instead of KFAC's (A, G).
  eigen_corrected: bool  # EKFAC/TEKFAC: eigenbases + scalings instead of damped inverses.


_KFAC = _Variant("kfac", trace_restricted=False, eigen_corrected=False)
_EKFAC = _Variant("ekfac", trace_restricted=False, eigen_corrected=True)
_TKFAC = _Variant("tkfac", trace_restricted=True, eigen_corrected=False)
_TEKFAC = _Variant("tekfac", trace_restricted=True, eigen_corrected=True)


# ---------------------------------------------------------------------------------------
# Statistics of one layer, from its matrix view a: (B, T, d_a), g: (B, T, d_g).


def layer_view(stats: LayerStats, dtype: Any) -> Tuple[Array, Array]:
  """Homogeneous inputs / patches `(B, T, d_in [+1])` and output grads `(B, T, d_out)`."""
  return (patches.layer_inputs(stats).astype(dtype),
          patches.layer_output_grads(stats).astype(dtype))


def _gram(x: Array, scale: float) -> Array:
  """`scale · Σ_{n,t} x x ᵀ` for `x: (B, T, d)`."""
  return linalg.symmetric_gram(x.reshape((-1, x.shape[-1]))) * scale


def kronecker_factors(a: Array, g: Array) -> Tuple[Array, Array]:
  """KFC factors `A = E_n Σ_t ā ā ᵀ` and `G = E_n (1/T) Σ_t g gᵀ`."""
  batch, locations = a.shape[0], a.shape[1]
  return _gram(a, 1.0 / batch), _gram(g, 1.0 / (batch * locations))


def trace_restricted_factors(a: Array, g: Array) -> Tuple[Array, Array]:
  """TKFAC's `δΦ = E_n Σ_t |g|² ā ā ᵀ` and `δΨ = E_n Σ_t |ā|² g gᵀ` (traces both δ)."""
  batch = a.shape[0]
  a_norm = jnp.linalg.norm(a, axis=-1, keepdims=True)
  g_norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
  return _gram(a * g_norm, 1.0 / batch), _gram(g * a_norm, 1.0 / batch)


def eigen_scalings(a: Array, g: Array, input_basis: Array, output_basis: Array) -> Array:
  """Batch scalings `S = E_n[(Q_inᵀ D_n Q_out)²]` with `D_n = Σ_t ā_{n,t} g_{n,t}ᵀ`.

  With one location per example `Q_inᵀ D_n Q_out` is the outer product of the projected
  input and output gradient, so `S` is one matmul of their squares; otherwise the projected
  per-example gradients are summed over locations first.
  """
  batch, locations = a.shape[0], a.shape[1]
  projected_a = linalg.matmul(a, input_basis)
  projected_g = linalg.matmul(g, output_basis)
  if locations == 1:
    return jnp.matmul(jnp.square(projected_a[:, 0]).T, jnp.square(projected_g[:, 0])) / batch
  projected_grads = jnp.einsum("btd,bte->bde", projected_a, projected_g)
  return jnp.mean(jnp.square(projected_grads), axis=0)


# ---------------------------------------------------------------------------------------
# Damping and directions.


def _mean_eigenvalue(factor: Array) -> Array:
  return jnp.maximum(jnp.trace(factor) / factor.shape[-1], _TINY)


def factored_damping(input_factor: Array, output_factor: Array, damping: Array,
                     pi_correction: bool) -> Tuple[Array, Array]:
  """KFAC's `(π√λ, √λ/π)`, `π = sqrt((tr A / dim A) / (tr G / dim G))` (1 when off)."""
  root = jnp.sqrt(damping)
  if not pi_correction:
    return root, root
  pi = jnp.sqrt(_mean_eigenvalue(input_factor) / _mean_eigenvalue(output_factor))
  return pi * root, root / pi


def trace_normalized(input_factor: Array, output_factor: Array) -> Tuple[Array, Array]:
  """`(√δ Φ, √δ Ψ) = (δΦ, δΨ) / √δ` with `δ = tr δΦ` (kept above a tiny positive value)."""
  root_trace = jnp.sqrt(jnp.maximum(jnp.trace(input_factor), _TINY))
  return input_factor / root_trace, output_factor / root_trace


def kronecker_direction(grad: Array, input_inverse: Array, output_inverse: Array) -> Array:
  """`A_d⁻¹ ∇W̄ G_d⁻¹` (in the inverses' dtype, accumulated in float32 at least)."""
  return linalg.matmul(linalg.matmul(input_inverse, grad), output_inverse)


def eigen_direction(grad: Array, bases: Tuple[Array, Array, Array, Array], scalings: Array,
                    damping: Array) -> Array:
  """`Q_in [(Q_inᵀ ∇W̄ Q_out) / (S + λ)] Q_outᵀ` (products in the bases' dtype).

  `bases` is `(Q_in, Q_out, Q_inᵀ, Q_outᵀ)` as `transposed_bases` stores them; empty
  transposes (float32 bases) mean "use `.T`".
  """
  input_basis, output_basis, input_t, output_t = bases
  if not input_t.size:
    input_t, output_t = input_basis.T, output_basis.T
  projected = linalg.matmul(linalg.matmul(input_t, grad), output_basis)
  scaled = projected / (scalings + damping)
  return linalg.matmul(linalg.matmul(input_basis, scaled), output_t)


def transposed_bases(input_basis: Array, output_basis: Array) -> Tuple[Array, Array]:
  """`(Q_inᵀ, Q_outᵀ)` as row-major copies for bases narrower than float32, else `(0,)`
  placeholders."""
  if jnp.finfo(input_basis.dtype).bits >= 32:
    return jnp.zeros((0,), input_basis.dtype), jnp.zeros((0,), output_basis.dtype)
  return jnp.transpose(input_basis), jnp.transpose(output_basis)


# ---------------------------------------------------------------------------------------
# The method: per-layer init and the batched update of all layers.


def _init_layer(variant: _Variant, info: layerwise.LayerInfo, preconditioner_dtype):
  d_in, d_out = info.matrix_shape
  dtype = stats_dtype(info.dtype)
  refreshed_dtype = linalg.refreshed_dtype(dtype, preconditioner_dtype)
  # A fresh array per field: a jitted step that donates the state must never receive
  # one buffer twice.
  square_in = lambda dt=dtype: jnp.zeros((d_in, d_in), dt)
  square_out = lambda dt=dtype: jnp.zeros((d_out, d_out), dt)
  if variant.eigen_corrected:
    input_basis, output_basis = square_in(refreshed_dtype), square_out(refreshed_dtype)
    input_t, output_t = transposed_bases(input_basis, output_basis)
    return EigenLayerState(input_factor=square_in(), output_factor=square_out(),
                           input_basis=input_basis, output_basis=output_basis,
                           scalings=jnp.zeros((d_in, d_out), dtype),
                           input_basis_t=input_t, output_basis_t=output_t)
  return KroneckerLayerState(input_factor=square_in(), output_factor=square_out(),
                             input_inverse=square_in(refreshed_dtype),
                             output_inverse=square_out(refreshed_dtype))


def _update_factors(variant, views, factors, decay, first):
  """Running averages of the factor statistics `{key: (input, output)}` of every layer."""
  factor_fn = trace_restricted_factors if variant.trace_restricted else kronecker_factors
  new_factors = {}
  for key, old in factors.items():
    a, g = views[key](old[0].dtype)
    new_factors[key] = running_average(old, factor_fn(a, g), decay, first)
  return new_factors


def _map_factor_pairs(fn, items, previous):
  """`fn` on both sides of every layer's `{key: (input, output)}` pair, one batched call per
  shape (`linalg.bucketed_keep_finite`); a non-finite result keeps its `previous` value."""
  flat = lambda pairs: {(key, side): x for key, pair in pairs.items()
                        for side, x in enumerate(pair)}
  results, failures = linalg.bucketed_keep_finite(fn, flat(items), flat(previous))
  return {key: (results[(key, 0)], results[(key, 1)]) for key in items}, failures


def _refresh_inverses(variant, factors, previous, damping, pi_correction):
  """Damped inverses `{key: (input, output)}` of every factor, one batched Cholesky per
  factor shape; a non-finite inverse keeps its `previous` value and counts a failure."""
  items = {}
  for key, (input_factor, output_factor) in factors.items():
    if variant.trace_restricted:
      input_factor, output_factor = trace_normalized(input_factor, output_factor)
      input_damping = output_damping = jnp.sqrt(damping)
    else:
      input_damping, output_damping = factored_damping(input_factor, output_factor, damping,
                                                       pi_correction)
    items[key] = ((input_factor, input_damping.astype(input_factor.dtype)),
                  (output_factor, output_damping.astype(output_factor.dtype)))
  return _map_factor_pairs(lambda item: linalg.damped_inverse(*item), items, previous)


def _refresh_bases(factors, previous):
  """Eigenvectors `{key: (input, output, input_t, output_t)}` of every factor, one batched
  `eigh` per shape, with the transposes `transposed_bases` stores."""
  pairs = {key: quad[:2] for key, quad in previous.items()}
  bases, failures = _map_factor_pairs(lambda factor: linalg.eigh(factor)[1], factors, pairs)
  return {key: (*pair, *transposed_bases(*pair)) for key, pair in bases.items()}, failures


def _update_scalings(views, bases, scalings, decay, first):
  """Running averages of the eigenvalue corrections `S`, in the current eigenbases."""
  new_scalings = {}
  for key, old in scalings.items():
    a, g = views[key](old.dtype)
    batch_scalings = eigen_scalings(a, g, *bases[key][:2])
    new_scalings[key] = running_average(old, batch_scalings, decay, first)
  return new_scalings


def _fields(layer_states, *names: str):
  """`{key: (state.<name>, ...)}` over the layers, one tuple entry per name."""
  return {key: tuple(getattr(s, name) for name in names) for key, s in layer_states.items()}


def _make_update_layers(variant: _Variant, *, damping, stats_decay, stats_every,
                        inverse_every, pi_correction):
  """`update_layers` for `layerwise_transformation`: statistics, refreshes, directions."""

  def update_layers(infos, grad_mats, stats, layer_states, count, active):
    del infos
    damping_value = hyperparameter_value(damping, count)
    decay = hyperparameter_value(stats_decay, count)
    first = count == 0
    stats_due = is_due(count, stats_every) & active
    inverse_due = is_due(count, inverse_every) & active
    # Built lazily inside the refresh branches, so steps without a refresh skip im2col.
    # Read lazily: a deferred (sampled-Fisher) curvature then runs its extra backward pass
    # only inside the statistics refresh.
    views = {key: (lambda dtype, key=key: layer_view(stats[key], dtype)) for key in stats}
    no_failures = jnp.zeros((), jnp.int32)
    # Each refresh passes only what it changes through its `lax.cond` (a pass-through
    # output is a copy at every step without a refresh).
    old_factors = _fields(layer_states, "input_factor", "output_factor")
    factors = refresh_statistics(
        stats_due, lambda: _update_factors(variant, views, old_factors, decay, first),
        old_factors)
    if variant.eigen_corrected:
      old_bases = _fields(layer_states, "input_basis", "output_basis", "input_basis_t",
                          "output_basis_t")
      bases, failures = refresh(inverse_due, lambda: _refresh_bases(factors, old_bases),
                                (old_bases, no_failures))
      old_scalings = {key: s.scalings for key, s in layer_states.items()}
      scalings = refresh_statistics(
          stats_due | inverse_due,
          lambda: _update_scalings(views, bases, old_scalings, decay, first), old_scalings)
      states = {}
      for key in layer_states:
        input_basis, output_basis, input_t, output_t = bases[key]
        states[key] = EigenLayerState(
            *factors[key], input_basis=input_basis, output_basis=output_basis,
            scalings=scalings[key], input_basis_t=input_t, output_basis_t=output_t)
      directions = {
          key: eigen_direction(grad_mats[key], bases[key], scalings[key],
                               damping_value.astype(scalings[key].dtype))
          for key in layer_states}
    else:
      old_inverses = _fields(layer_states, "input_inverse", "output_inverse")
      inverses, failures = refresh(
          inverse_due,
          lambda: _refresh_inverses(variant, factors, old_inverses, damping_value,
                                    pi_correction),
          (old_inverses, no_failures))
      states = {key: KroneckerLayerState(*factors[key], *inverses[key])
                for key in layer_states}
      directions = {key: kronecker_direction(grad_mats[key], *inverses[key])
                    for key in layer_states}
    return directions, states, failures

  return update_layers


def _check_hyperparameters(method: str, damping, stats_decay, stats_every, inverse_every):
  """Clear errors for bad hyperparameters given as Python values (arrays pass through)."""
  for name, value in (("stats_every", stats_every), ("inverse_every", inverse_every)):
    try:
      period = operator.index(value)
    except TypeError:
      raise ValueError(
          f"{method}: {name} must be a Python int (a static refresh period), got "
          f"{type(value).__name__}; with optax.inject_hyperparams pass "
          f"static_args=('stats_every', 'inverse_every')") from None
    if period < 1:
      raise ValueError(f"{method}: {name} must be >= 1, got {period}")
  if isinstance(damping, (int, float)) and not damping >= 0:
    raise ValueError(f"{method}: damping must be >= 0, got {damping}")
  if isinstance(stats_decay, (int, float)) and not 0 <= stats_decay < 1:
    raise ValueError(f"{method}: stats_decay must be in [0, 1), got {stats_decay}")


def _describe_layer(variant: _Variant, inverse_every: int):
  factors = ("trace-restricted δΦ ⊗ Ψ" if variant.trace_restricted else "Kronecker A ⊗ G")
  refreshed = ("eigenbases + per-entry scalings" if variant.eigen_corrected
               else "damped inverses")

  def describe_layer(info: layerwise.LayerInfo) -> str:
    d_in, d_out = info.matrix_shape
    return (f"{factors} ({d_in}x{d_in} ⊗ {d_out}x{d_out}) on layer {info.key}, "
            f"{refreshed} every {inverse_every} steps")

  return describe_layer


def _scale_by_family(variant: _Variant, *, damping: ScalarOrSchedule,
                     stats_decay: ScalarOrSchedule, stats_every: int, inverse_every: int,
                     pi_correction: bool = True, preconditioner_dtype: Any = None,
                     fallback: Optional[optax.GradientTransformation] = None,
                     layers: Optional[Sequence[LayerPath]] = None,
                     ) -> optax.GradientTransformationExtraArgs:
  _check_hyperparameters(variant.name, damping, stats_decay, stats_every, inverse_every)
  preconditioner_dtype = linalg.check_preconditioner_dtype(variant.name, preconditioner_dtype)
  stats_every, inverse_every = operator.index(stats_every), operator.index(inverse_every)
  try:
    pi_correction = bool(pi_correction)
  except TypeError:
    raise ValueError(f"{variant.name}: pi_correction must be a Python bool; with "
                     f"optax.inject_hyperparams pass static_args=('pi_correction',)") from None
  return layerwise.layerwise_transformation(
      variant.name,
      init_layer=lambda info: _init_layer(variant, info, preconditioner_dtype),
      update_layers=_make_update_layers(
          variant, damping=damping, stats_decay=stats_decay, stats_every=stats_every,
          inverse_every=inverse_every, pi_correction=pi_correction),
      fallback=fallback,
      layers=layers,
      describe_layer=_describe_layer(variant, inverse_every),
      needs="per-layer inputs and output gradients",
  )


# ---------------------------------------------------------------------------------------
# Public transformations.

_ARGS_DOC = """    damping: Tikhonov damping λ: a number, an array (e.g. from
      `optax.inject_hyperparams`) or an optax schedule of the step count.
    stats_decay: weight of the old value in the running averages of the statistics
      (number or schedule); the first update takes the batch statistic itself.
    stats_every: statistics are updated at steps where `count % stats_every == 0`.
    inverse_every: the {refreshed} are recomputed at steps where
      `count % inverse_every == 0` (step 0 always), under `lax.cond`, all same-shape
      factors of the model in one batched call.
    preconditioner_dtype: dtype in which the {refreshed} are stored and applied
      (default: the statistics' dtype, float32 at least). `jnp.bfloat16` halves their
      memory and, where the hardware multiplies bfloat16 faster (accelerators, CPUs with
      AVX512-BF16), the cost of applying them; the products still accumulate in float32
      and the direction stays float32 (about 3 significant digits).
    fallback: transformation for parameter leaves outside captured layers (default
      `optax.identity()`); `soo.describe(tx, params)` lists the rule of every leaf.
    layers: optional explicit list of layer paths to precondition (default: every node
      with a `kernel` and optional `bias`); the other leaves go to `fallback`."""


def scale_by_kfac(*, damping: ScalarOrSchedule, stats_decay: ScalarOrSchedule = 0.95,
                  stats_every: int = 1, inverse_every: int = 20, pi_correction: bool = True,
                  preconditioner_dtype: Any = None,
                  fallback: Optional[optax.GradientTransformation] = None,
                  layers: Optional[Sequence[LayerPath]] = None,
                  ) -> optax.GradientTransformationExtraArgs:
  """KFAC / KFC preconditioner: `A_d⁻¹ ∇W̄ G_d⁻¹` per captured layer (DESIGN §5).

  `A = E_n Σ_t ā ā ᵀ`, `G = E_n (1/T) Σ_t g gᵀ` with per-example output gradients `g` (not
  divided by the batch size), `A_d = A + π√λ I`, `G_d = G + (√λ/π) I`. kfac-jax's output
  factor is `1/N` of ours, so kfac-jax at damping `λ` equals `N ×` this at damping `N·λ`.

  Args:
{args}
    pi_correction: use the π-corrected factored damping; `False` adds `√λ I` to both.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
    `curvature=` (from `soo.linen_curvature` / `soo.nnx_curvature`); it returns the
    preconditioned gradient with the gradient's sign. Its state is a
    `soo.LayerwiseState` holding a `KroneckerLayerState` per layer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import secondorder_optax as soo
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)
    >>> loss, grads, curvature = curv_fn(params, x, y, jax.random.key(1))
    >>> tx = soo.scale_by_kfac(damping=1e-3)
    >>> state = tx.init(params)
    >>> direction, state = tx.update(grads, state, params, curvature=curvature)
    >>> direction["kernel"].shape
    (4, 3)
  """
  return _scale_by_family(_KFAC, damping=damping, stats_decay=stats_decay,
                          stats_every=stats_every, inverse_every=inverse_every,
                          pi_correction=pi_correction, preconditioner_dtype=preconditioner_dtype,
                          fallback=fallback, layers=layers)


def scale_by_ekfac(*, damping: ScalarOrSchedule, stats_decay: ScalarOrSchedule = 0.95,
                   stats_every: int = 1, inverse_every: int = 20,
                   preconditioner_dtype: Any = None,
                   fallback: Optional[optax.GradientTransformation] = None,
                   layers: Optional[Sequence[LayerPath]] = None,
                   ) -> optax.GradientTransformationExtraArgs:
  """EKFAC preconditioner: KFAC's eigenbasis with re-estimated eigenvalues (DESIGN §5).

  Direction `Q_A [(Q_Aᵀ ∇W̄ Q_G) / (S + λ)] Q_Gᵀ` with `Q_A`, `Q_G` the eigenvectors of
  KFAC's `A`, `G` and `S = E_n[(Q_Aᵀ D_n Q_G)²]` (per-example gradients `D_n`), running-
  averaged. Without damping, on one layer, this is the exact Fisher block made diagonal in
  the Kronecker-factored eigenbasis.

  Args:
{args}

  Returns:
    An `optax.GradientTransformationExtraArgs` taking `curvature=`; its state is a
    `soo.LayerwiseState` holding an `EigenLayerState` per layer.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_ekfac(damping=1e-3, stats_every=10, inverse_every=100)
    >>> sorted(soo.describe(tx, {{"kernel": jnp.ones((4, 3))}}, print_fn=None))
    ['kernel']
  """
  return _scale_by_family(_EKFAC, damping=damping, stats_decay=stats_decay,
                          stats_every=stats_every, inverse_every=inverse_every,
                          preconditioner_dtype=preconditioner_dtype,
                          fallback=fallback, layers=layers)


def scale_by_tkfac(*, damping: ScalarOrSchedule, stats_decay: ScalarOrSchedule = 0.95,
                   stats_every: int = 1, inverse_every: int = 20,
                   preconditioner_dtype: Any = None,
                   fallback: Optional[optax.GradientTransformation] = None,
                   layers: Optional[Sequence[LayerPath]] = None,
                   ) -> optax.GradientTransformationExtraArgs:
  """TKFAC preconditioner: trace-restricted Kronecker factors (DESIGN §5).

  `δ = E_n Σ_t |ā|²|g|²`, `Φ = E_n Σ_t |g|² ā ā ᵀ / δ`, `Ψ = E_n Σ_t |ā|² g gᵀ / δ`, so
  `δ Φ ⊗ Ψ` keeps the trace of the (dense-layer) Fisher block; direction
  `(√δ Φ + √λ I)⁻¹ ∇W̄ (√δ Ψ + √λ I)⁻¹`.

  Args:
{args}

  Returns:
    An `optax.GradientTransformationExtraArgs` taking `curvature=`; its state is a
    `soo.LayerwiseState` holding a `KroneckerLayerState` (`δΦ`, `δΨ`) per layer.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_tkfac(damping=1e-3)
    >>> state = tx.init({{"Dense_0": {{"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}}})
    >>> state.layers["Dense_0"].input_factor.shape
    (5, 5)
  """
  return _scale_by_family(_TKFAC, damping=damping, stats_decay=stats_decay,
                          stats_every=stats_every, inverse_every=inverse_every,
                          preconditioner_dtype=preconditioner_dtype,
                          fallback=fallback, layers=layers)


def scale_by_tekfac(*, damping: ScalarOrSchedule, stats_decay: ScalarOrSchedule = 0.95,
                    stats_every: int = 1, inverse_every: int = 20,
                    preconditioner_dtype: Any = None,
                    fallback: Optional[optax.GradientTransformation] = None,
                    layers: Optional[Sequence[LayerPath]] = None,
                    ) -> optax.GradientTransformationExtraArgs:
  """TEKFAC preconditioner: EKFAC's eigenvalue correction in TKFAC's eigenbasis (DESIGN §5).

  Direction `Q_Φ [(Q_Φᵀ ∇W̄ Q_Ψ) / (S + λ)] Q_Ψᵀ` with `Q_Φ`, `Q_Ψ` the eigenvectors of
  TKFAC's trace-restricted factors and `S = E_n[(Q_Φᵀ D_n Q_Ψ)²]`, running-averaged.

  Args:
{args}

  Returns:
    An `optax.GradientTransformationExtraArgs` taking `curvature=`; its state is a
    `soo.LayerwiseState` holding an `EigenLayerState` per layer.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_tekfac(damping=1e-3)
    >>> state = tx.init({{"Dense_0": {{"kernel": jnp.ones((4, 3))}}}})
    >>> state.layers["Dense_0"].scalings.shape
    (4, 3)
  """
  return _scale_by_family(_TEKFAC, damping=damping, stats_decay=stats_decay,
                          stats_every=stats_every, inverse_every=inverse_every,
                          preconditioner_dtype=preconditioner_dtype,
                          fallback=fallback, layers=layers)


def _full_optimizer_doc(method: str) -> str:
  return f"""Full {method.upper()} optimizer: `soo.scale_by_{method}` + weight decay + momentum.

  `scale_by_{method}(...)` -> `+ weight_decay · params` (decoupled) -> heavy-ball momentum
  -> `-learning_rate`, as `soo.build_optimizer` chains them.

  Args:
    learning_rate: a number or an optax schedule.
    momentum: heavy-ball momentum (`optax.trace`); 0 or `None` for none.
    weight_decay: decoupled weight decay coefficient.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change `η² ⟨Δ, g⟩` exceeds
      κ, to exactly κ (`soo.clip_by_kl`; Ba et al. 2017).
    damping, stats_decay, stats_every, inverse_every, ...: as in `soo.scale_by_{method}`
      (`damping` is required).

  Returns:
    An `optax.GradientTransformationExtraArgs` taking `curvature=` in `update`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> import secondorder_optax as soo
    >>> model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
    >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)
    >>> tx = soo.{method}(1e-2, damping=1e-3)
    >>> state = tx.init(params)
    >>> loss, grads, curvature = curv_fn(params, x, y, jax.random.key(1))
    >>> updates, state = tx.update(grads, state, params, curvature=curvature)
    >>> params = optax.apply_updates(params, updates)
  """


def kfac(learning_rate: optax.ScalarOrSchedule, *, damping: ScalarOrSchedule,
         momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
         kl_clip: Optional[float] = None,
         stats_decay: ScalarOrSchedule = 0.95, stats_every: int = 1, inverse_every: int = 20,
         pi_correction: bool = True, preconditioner_dtype: Any = None,
         fallback: Optional[optax.GradientTransformation] = None,
         layers: Optional[Sequence[LayerPath]] = None) -> optax.GradientTransformationExtraArgs:
  return alias.build_optimizer(
      scale_by_kfac(damping=damping, stats_decay=stats_decay, stats_every=stats_every,
                    inverse_every=inverse_every, pi_correction=pi_correction,
                    preconditioner_dtype=preconditioner_dtype,
                    fallback=fallback, layers=layers),
      learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
      kl_clip=kl_clip)


def ekfac(learning_rate: optax.ScalarOrSchedule, *, damping: ScalarOrSchedule,
          momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
          kl_clip: Optional[float] = None,
          stats_decay: ScalarOrSchedule = 0.95, stats_every: int = 1, inverse_every: int = 20,
          preconditioner_dtype: Any = None,
          fallback: Optional[optax.GradientTransformation] = None,
          layers: Optional[Sequence[LayerPath]] = None) -> optax.GradientTransformationExtraArgs:
  return alias.build_optimizer(
      scale_by_ekfac(damping=damping, stats_decay=stats_decay, stats_every=stats_every,
                     inverse_every=inverse_every, preconditioner_dtype=preconditioner_dtype,
                     fallback=fallback, layers=layers),
      learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
      kl_clip=kl_clip)


def tkfac(learning_rate: optax.ScalarOrSchedule, *, damping: ScalarOrSchedule,
          momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
          kl_clip: Optional[float] = None,
          stats_decay: ScalarOrSchedule = 0.95, stats_every: int = 1, inverse_every: int = 20,
          preconditioner_dtype: Any = None,
          fallback: Optional[optax.GradientTransformation] = None,
          layers: Optional[Sequence[LayerPath]] = None) -> optax.GradientTransformationExtraArgs:
  return alias.build_optimizer(
      scale_by_tkfac(damping=damping, stats_decay=stats_decay, stats_every=stats_every,
                     inverse_every=inverse_every, preconditioner_dtype=preconditioner_dtype,
                     fallback=fallback, layers=layers),
      learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
      kl_clip=kl_clip)


def tekfac(learning_rate: optax.ScalarOrSchedule, *, damping: ScalarOrSchedule,
           momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
           kl_clip: Optional[float] = None,
           stats_decay: ScalarOrSchedule = 0.95, stats_every: int = 1, inverse_every: int = 20,
           preconditioner_dtype: Any = None,
           fallback: Optional[optax.GradientTransformation] = None,
           layers: Optional[Sequence[LayerPath]] = None) -> optax.GradientTransformationExtraArgs:
  return alias.build_optimizer(
      scale_by_tekfac(damping=damping, stats_decay=stats_decay, stats_every=stats_every,
                      inverse_every=inverse_every, preconditioner_dtype=preconditioner_dtype,
                      fallback=fallback, layers=layers),
      learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
      kl_clip=kl_clip)


for _transform, _refreshed in ((scale_by_kfac, "damped inverses"),
                               (scale_by_ekfac, "eigenbases"),
                               (scale_by_tkfac, "damped inverses"),
                               (scale_by_tekfac, "eigenbases")):
  if _transform.__doc__:  # None under python -OO.
    _transform.__doc__ = _transform.__doc__.format(
        args=_ARGS_DOC.format(refreshed=_refreshed))
for _optimizer in (kfac, ekfac, tkfac, tekfac):
  _optimizer.__doc__ = _full_optimizer_doc(_optimizer.__name__)
del _transform, _refreshed, _optimizer
