"""How SENG holds each layer's `U` (DESIGN §5; the method is in `seng.py`).

A layer's static `SengPlan` says whether `U` is never formed (dense layers: a Hadamard Gram),
formed explicitly (small convolutions), or replaced by per-example low-rank outer products
(large convolutions), where the k×k Gram is sketched, and whether `U`'s rows are centred
(`U_c = P U`, `P = I − 11ᵀ/k`: the covariance of the per-example gradients instead of their
second moment). Here: the plans, the held factors, their (sketched) Grams, and the SMW
direction `(1/λ)(∇ − U_cᵀ (λI + U_c U_cᵀ)⁻¹ U_c ∇)`. Centring never forms `U_c`: its Gram is
`P (U Uᵀ) P` and `U_c ∇ = P (U ∇)`, `U_cᵀ w = Uᵀ (P w)` (subtracting a k-vector's mean).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Tuple, Union

import flax.serialization
import jax
import jax.numpy as jnp
from jax import lax

from secondorder_optax._src import damping as damping_lib
from secondorder_optax._src import layerwise, linalg, patches, validation
from secondorder_optax._src.base import LayerStats

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SengPlan:
  """How SENG holds one layer's `U` (static: part of the state's tree structure).

  Attributes:
    kind: 'hadamard', 'explicit' or 'low_rank' (see the module docstring).
    examples: k, the number of curvature examples (rows of `U`).
    subsample: whether the k examples are the first k of a possibly larger batch.
    matrix_shape: `(d_in [+1], d_out)` of the layer's matrix view.
    rank: outer products per example held (1 for 'hadamard', `svd_rank` for 'low_rank',
      0 for 'explicit').
    sketch: sampled sizes, 0 meaning no sketch: `(columns,)` for 'explicit',
      `(input rows, output rows)` for 'low_rank', `()` for 'hadamard'.
    centered: whether the rows of `U` have their mean (the gradient) removed.
    max_damping_drop: the factor by which the damping's eigenvalue scale may fall per
      refresh (`damping_scale`).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_seng(damping=0.1, batch_size=8)
    >>> state = tx.init({"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}})
    >>> plan = state.preconditioner["Dense_0"].plan
    >>> plan.kind, plan.examples, plan.matrix_shape
    ('hadamard', 8, (4, 2))
  """

  kind: str
  examples: int
  subsample: bool
  matrix_shape: Tuple[int, int]
  rank: int
  sketch: Tuple[int, ...]
  centered: bool = False
  max_damping_drop: float = math.inf

  @property
  def size(self) -> int:
    return self.matrix_shape[0] * self.matrix_shape[1]

  @property
  def gram_rank(self) -> int:
    """Largest rank of the (centred) Gram: `min(k, d)`, or `min(k − 1, d)` centred."""
    return max(min(self.examples - int(self.centered), self.size), 1)


# A plan is static structure: checkpoints (flax.serialization) store nothing for it and
# restoring keeps the plan of the target state built by `init`.
flax.serialization.register_serialization_state(
    SengPlan, ty_to_state_dict=lambda plan: {}, ty_from_state_dict=lambda plan, _: plan)


class ExplicitFactors(NamedTuple):
  """`U` itself (explicit plan).

  Attributes:
    rows: `(k, d)`, row n is `vec(D_n)/√k` in the matrix view.
    kept_columns: `(s,)` coordinates the Gram's column sketch used at the last refresh
      (a `(1,)` placeholder when the plan does not sketch).
  """

  rows: Array
  kept_columns: Array


class OuterProductFactors(NamedTuple):
  """`U` as sums of outer products (hadamard and low_rank plans).

  Row n of `U` is `vec(Σ_j inputs[n, j] output_grads[n, j]ᵀ)`.

  Attributes:
    inputs: `(k, p, d_in [+1])`.
    output_grads: `(k, p, d_out)`, including the `1/√k`.
    kept_inputs: `(s_in,)` input coordinates the Gram's row sketch used (a `(1,)`
      placeholder when the plan does not sketch them).
    kept_outputs: `(s_out,)` output coordinates the Gram's row sketch used (likewise).
  """

  inputs: Array
  output_grads: Array
  kept_inputs: Array
  kept_outputs: Array


class SengLayerState(NamedTuple):
  """SENG's preconditioner of one layer.

  Attributes:
    plan: the layer's static `SengPlan`.
    factors: the stale `U` (`ExplicitFactors` or `OuterProductFactors`).
    gram_inverse: `(λI_k + U Uᵀ)⁻¹` (with the sketched Gram where the plan sketches).
    damping: the λ of `gram_inverse` (read at the last refresh).
    scale: the eigenvalue scale `λ` is relative to (see `damping_scale`).
    refreshes: successful refreshes so far (draws the sketches' fresh coordinates).
    seed: the sketches' seed (from `init`).
  """

  plan: SengPlan
  factors: Union[ExplicitFactors, OuterProductFactors]
  gram_inverse: Array
  damping: Array
  scale: Array
  refreshes: Array
  seed: Array


# ---------------------------------------------------------------------------------------
# Plans and initial state.


def static_int(name: str, value: Any, minimum: int) -> int:
  """A hyperparameter that fixes state shapes, concrete at init (clear error otherwise)."""
  number = validation.check_structural_int("seng", name, value, minimum)
  if number is None:
    raise ValueError(
        f"seng: {name} fixes the shapes of the optimizer state and must be a concrete "
        f"integer at init (call init outside jit); after init it is read from the state")
  return number


def read_at_init(name: str, value: Any) -> Any:
  """A setting held in the plans (`scale_by_seng` validated it and keeps `None` for a traced
  one): concrete at init, a clear error otherwise."""
  if value is None:
    raise ValueError(
        f"seng: {name} fixes the plans of the optimizer state and must be concrete at init "
        f"(call init outside jit); after init it is read from the state")
  return value


def curvature_examples(batch_size: Any, subsample: Any, centered: bool) -> Tuple[int, bool]:
  """`(k, is_subsample)` from the `batch_size` / `subsample` keywords."""
  k, is_subsample = _examples(batch_size, subsample)
  if centered and k < 2:
    raise ValueError(f"seng: centered=True needs at least 2 curvature examples (one example "
                     f"has no spread around its own gradient), got "
                     f"{'subsample' if is_subsample else 'batch_size'}={k}; pass "
                     f"centered=False for the empirical Fisher of a single example")
  return k, is_subsample


def _examples(batch_size: Any, subsample: Any) -> Tuple[int, bool]:
  if subsample is not None:
    k = static_int("subsample", subsample, 1)
    if batch_size is not None and k > static_int("batch_size", batch_size, 1):
      raise ValueError(f"seng: subsample={k} is larger than batch_size={batch_size}")
    return k, True
  if batch_size is None:
    raise ValueError(
        "seng holds one row per curvature example in its state, so their number must "
        "be known at init: pass batch_size=<the training batch size>, or subsample=k to "
        "use the first k examples of every batch")
  return static_int("batch_size", batch_size, 1), False


def make_plan(info: layerwise.LayerInfo, examples: int, subsample: bool,
               several_locations: bool, explicit_threshold: int, sketch_size: Optional[int],
               svd_rank: int, centered: bool, max_damping_drop: float) -> SengPlan:
  d_in, d_out = info.matrix_shape
  common = dict(examples=examples, subsample=subsample, matrix_shape=(d_in, d_out),
                centered=centered, max_damping_drop=max_damping_drop)
  if not several_locations:
    return SengPlan(kind="hadamard", rank=1, sketch=(), **common)
  size = d_in * d_out
  if size <= explicit_threshold:
    columns = sketch_size * sketch_size if sketch_size is not None else size
    return SengPlan(kind="explicit", rank=0, sketch=(columns if columns < size else 0,),
                     **common)
  rows = tuple(sketch_size if sketch_size is not None and sketch_size < dim else 0
               for dim in (d_in, d_out))
  return SengPlan(kind="low_rank", rank=svd_rank, sketch=rows, **common)


def initial_state(plan: SengPlan, seed: int) -> SengLayerState:
  k = plan.examples
  d_in, d_out = plan.matrix_shape
  index = lambda size: jnp.zeros((max(size, 1),), jnp.int32)
  if plan.kind == "explicit":
    factors = ExplicitFactors(rows=jnp.zeros((k, plan.size), jnp.float32),
                              kept_columns=index(plan.sketch[0]))
  else:
    sketch = plan.sketch or (0, 0)
    factors = OuterProductFactors(
        inputs=jnp.zeros((k, plan.rank, d_in), jnp.float32),
        output_grads=jnp.zeros((k, plan.rank, d_out), jnp.float32),
        kept_inputs=index(sketch[0]), kept_outputs=index(sketch[1]))
  # Zero factors with damping 1: the direction is the gradient until the first refresh.
  return SengLayerState(plan=plan, factors=factors,
                        gram_inverse=jnp.zeros((k, k), jnp.float32),
                        damping=jnp.ones((), jnp.float32),
                        scale=jnp.ones((), jnp.float32),
                        refreshes=jnp.zeros((), jnp.int32),
                        seed=jnp.asarray(seed, jnp.int32))


def describe_plan(plan: SengPlan) -> str:
  k = f"{plan.examples} {'subsampled ' if plan.subsample else ''}examples"
  k += ", centred" if plan.centered else ""
  if plan.kind == "hadamard":
    return f"exact SMW, Hadamard Gram (dense), {k}"
  if plan.kind == "explicit":
    sketch = f", column sketch {plan.sketch[0]} of {plan.size}" if plan.sketch[0] else ""
    return f"explicit per-example gradients (d={plan.size}){sketch}, {k}"
  sketch = ""
  if any(plan.sketch):
    sketch = f", row sketch {plan.sketch[0] or 'all'}x{plan.sketch[1] or 'all'}"
  return f"low-rank (svd_rank={plan.rank}, d={plan.size}){sketch}, {k}"


# ---------------------------------------------------------------------------------------
# Refresh: factors, (sketched) Gram, inverse.


def check_examples(stats: LayerStats, plan: SengPlan, key: str) -> None:
  """Clear errors for a batch that does not fit the plan (shapes only)."""
  n, k = stats.batch_size, plan.examples
  if plan.subsample and n < k:
    raise ValueError(f"seng: subsample={k} but curvature for layer {key} has only "
                     f"{n} examples")
  if not plan.subsample and n != k:
    raise ValueError(
        f"seng was initialised for batch_size={k} curvature examples but curvature for "
        f"layer {key} has {n}; pass the batch size the optimizer will see (or "
        f"subsample=k to use the first k examples of any batch of at least k)")


def select_examples(stats: LayerStats, plan: SengPlan) -> LayerStats:
  """The first k examples (a checked batch)."""
  k = plan.examples
  if stats.batch_size == k:
    return stats
  return stats.replace(inputs=stats.inputs[:k], output_grads=stats.output_grads[:k])


def _sample(key: Array, dim: int, size: int) -> Array:
  """`size` distinct coordinates of `range(dim)`, sorted; a `(1,)` placeholder when `size`
  is 0 (no sketch)."""
  if size == 0:
    return jnp.zeros((1,), jnp.int32)
  return jnp.sort(jax.random.choice(key, dim, (size,), replace=False)).astype(jnp.int32)


def _sketched(matrix: Array, kept: Array, size: int) -> Array:
  """Columns `kept` of `matrix` scaled by `√(dim/s)` (unbiased Gram); all when `size` is 0."""
  if size == 0:
    return matrix
  return matrix[:, kept] * math.sqrt(matrix.shape[1] / kept.shape[0])


def _explicit_factors(stats: LayerStats, plan: SengPlan, rng: Array) -> ExplicitFactors:
  k = plan.examples
  rows = patches.per_example_grads(stats).astype(jnp.float32).reshape(k, -1) / math.sqrt(k)
  return ExplicitFactors(rows=rows, kept_columns=_sample(rng, plan.size, plan.sketch[0]))


def _explicit_gram(factors: ExplicitFactors, plan: SengPlan) -> Array:
  return linalg.symmetric_gram(_sketched(factors.rows, factors.kept_columns, plan.sketch[0]),
                               axis=0)


def _top_singular_parts(inputs: Array, output_grads: Array, rank: int) -> Tuple[Array, Array]:
  """Per example, `(x, γ)` of shapes `(k, rank, d_in)`, `(k, rank, d_out)` with
  `Σ_j x_j γ_jᵀ = Ā_nᵀ Γ_n,p` for the top-`rank` part `Γ_n,p` of `Γ_n` (zero-padded)."""
  locations = inputs.shape[1]
  if locations <= rank:
    x, g = inputs, output_grads
  else:
    left, singular, right_t = jnp.linalg.svd(output_grads, full_matrices=False)
    kept = min(rank, singular.shape[-1])
    g = singular[:, :kept, None] * right_t[:, :kept, :]
    x = jnp.einsum("ntj,ntd->njd", left[:, :, :kept], inputs, precision=_HIGHEST)
  pad = ((0, 0), (0, rank - x.shape[1]), (0, 0))
  return jnp.pad(x, pad), jnp.pad(g, pad)


def _outer_product_factors(stats: LayerStats, plan: SengPlan,
                           rng: Array) -> OuterProductFactors:
  k = plan.examples
  inputs = patches.layer_inputs(stats).astype(jnp.float32)                     # (k, T, d_in)
  grads = patches.layer_output_grads(stats).astype(jnp.float32) / math.sqrt(k)  # (k, T, d_out)
  if plan.kind == "low_rank":
    inputs, grads = _top_singular_parts(inputs, grads, plan.rank)
  sketch = plan.sketch or (0, 0)
  in_rng, out_rng = jax.random.split(rng)
  return OuterProductFactors(
      inputs=inputs, output_grads=grads,
      kept_inputs=_sample(in_rng, plan.matrix_shape[0], sketch[0]),
      kept_outputs=_sample(out_rng, plan.matrix_shape[1], sketch[1]))


def _outer_product_gram(factors: OuterProductFactors, plan: SengPlan) -> Array:
  """`Σ_{j,l} (x_{n,j}·x_{m,l}) (γ_{n,j}·γ_{m,l})`: blocks of a Hadamard product of Grams."""
  k, p, _ = factors.inputs.shape
  sketch = plan.sketch or (0, 0)
  x = _sketched(factors.inputs.reshape(k * p, -1), factors.kept_inputs, sketch[0])
  g = _sketched(factors.output_grads.reshape(k * p, -1), factors.kept_outputs, sketch[1])
  products = linalg.symmetric_gram(x, axis=0) * linalg.symmetric_gram(g, axis=0)
  return products.reshape(k, p, k, p).sum(axis=(1, 3))


def damping_scale(gram: Array, plan: SengPlan, previous: SengLayerState) -> Array:
  """The eigenvalue scale of the relative damping: the Gram's mean nonzero eigenvalue
  `tr / min(k [− 1], d)`, but at most `plan.max_damping_drop` times below the previous
  refresh's scale.

  Near an interpolating fit the per-example gradients, and with them the empirical Fisher
  and a damping relative to it, vanish like the residuals squared while the gradient
  vanishes like the residuals: the damped direction then grows like 1/residual (a 4-8-3
  MLP jumped from loss 8e-4 to 26 at such a refresh). The scale follows a growing Fisher
  at once and a vanishing one by `max_damping_drop` per refresh.
  """
  mean = damping_lib.mean_eigenvalue(gram, plan.gram_rank)
  floor = previous.scale / jnp.asarray(plan.max_damping_drop, mean.dtype)
  return jnp.where(previous.refreshes > 0, jnp.maximum(mean, floor), mean)


def _centered_gram(gram: Array) -> Array:
  """`P G P` with `P = I − 11ᵀ/k`: the Gram of the centred rows."""
  gram = gram - gram.mean(axis=0, keepdims=True)
  return gram - gram.mean(axis=1, keepdims=True)


def refresh_factors(stats: LayerStats, plan: SengPlan, rng: Array):
  """`(factors, Gram)`: the held `U` and its (sketched, centred if planned) k×k Gram."""
  if plan.kind == "explicit":
    factors = _explicit_factors(stats, plan, rng)
    gram = _explicit_gram(factors, plan)
  else:
    factors = _outer_product_factors(stats, plan, rng)
    gram = _outer_product_gram(factors, plan)
  return factors, _centered_gram(gram) if plan.centered else gram


# ---------------------------------------------------------------------------------------
# The direction (every step).


def _apply_u(factors, grad: Array) -> Array:
  """`U vec(∇)`: `(k,)`."""
  if isinstance(factors, ExplicitFactors):
    return jnp.matmul(factors.rows, grad.reshape(-1), precision=_HIGHEST)
  k, p, d_in = factors.inputs.shape
  projected = jnp.matmul(factors.inputs.reshape(k * p, d_in), grad, precision=_HIGHEST)
  return (projected * factors.output_grads.reshape(k * p, -1)).reshape(k, -1).sum(axis=1)


def _apply_u_transpose(factors, weights: Array, shape: Tuple[int, int]) -> Array:
  """`Uᵀ w` in the matrix view."""
  if isinstance(factors, ExplicitFactors):
    return jnp.matmul(weights, factors.rows, precision=_HIGHEST).reshape(shape)
  k, p, d_in = factors.inputs.shape
  weighted = (factors.inputs * weights[:, None, None]).reshape(k * p, d_in)
  return jnp.matmul(weighted.T, factors.output_grads.reshape(k * p, -1), precision=_HIGHEST)


def _center(vector: Array, plan: SengPlan) -> Array:
  return vector - vector.mean() if plan.centered else vector


def direction(state: SengLayerState, grad: Array) -> Array:
  """`(1/λ)(∇ − U_cᵀ (λI + U_c U_cᵀ)⁻¹ U_c ∇)` with the held factors, inverse and λ
  (`U_c = P U` centred, or `U`)."""
  plan = state.plan
  projected = _center(_apply_u(state.factors, grad), plan)
  weights = _center(jnp.matmul(state.gram_inverse, projected, precision=_HIGHEST), plan)
  correction = _apply_u_transpose(state.factors, weights, grad.shape)
  return (grad - correction) / state.damping
