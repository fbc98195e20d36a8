"""SENG: Sketchy Empirical Natural Gradient (Yang, Xu, Wen, Chen & Xu, 2022; DESIGN §5).

For every captured layer, `U ∈ R^{k×d}` stacks the rows `vec(D_n)/√k` of the first `k`
examples' per-example weight gradients (`k` = the batch size, or `subsample`). The direction
is the damped empirical natural gradient, solved in the k×k example space by
Sherman–Morrison–Woodbury:

    (λI + UᵀU)⁻¹ ∇ = (1/λ) (∇ − Uᵀ (λI_k + U Uᵀ)⁻¹ U ∇).

How `U` is held depends on the layer (its *plan*, fixed at `init` and shown by
`soo.describe`):

* **hadamard** (dense layers, one location per example): `U` is never formed. With `Ā`
  (k×(d_in+1)) and `Γ` (k×d_out) stacking `ā_n` and `g_n/√k`, the Gram is
  `U Uᵀ = (Ā Āᵀ) ∘ (Γ Γᵀ)`, `(U∇)_n = ā_nᵀ ∇ g_n` and `Uᵀw = Āᵀ diag(w) Γ`. Exact.
* **explicit** (convolutions, and dense layers listed in `sequence_layers`, with
  `d ≤ explicit_threshold`): `U` itself from `patches.per_example_grads`. When
  `d > sketch_size²` the Gram is formed from `sketch_size²` coordinates sampled without
  replacement (the paper's column sketch).
* **low_rank** (the same layers above `explicit_threshold`): each example's output-gradient
  matrix over its T locations, `Γ_n` (T×d_out), is replaced by its top-`svd_rank` part
  `P_p Σ_p Q_pᵀ`, so `D_n ≈ Σ_j x_{n,j} γ_{n,j}ᵀ` with `x_{n,j} = Ā_nᵀ P_{:,j}` and
  `γ_{n,j} = σ_j Q_{:,j}` (exact when `min(T, d_out) ≤ svd_rank`). The Gram is
  `Σ_{j,l} (x_{n,j}·x_{m,l}) (γ_{n,j}·γ_{m,l})`, formed without per-example gradients; when
  `d_in+1` or `d_out` exceeds `sketch_size`, those dot products use `sketch_size` sampled rows
  (the paper's row sketch).

**Where sketching changes the curvature scale.** Only the k×k Gram `U Uᵀ` is sketched; `U∇`
and `Uᵀw` are always exact (for the low-rank `U`). Sampled coordinates are scaled by
`√(d/s)`, so the sketched Gram is an unbiased estimate of `U Uᵀ` and, on average, the damping
means the same with and without sketching. The paper's code instead multiplies sampled
coordinates by `d/s` on both sides of the Gram and of `U∇`, which makes a sketched layer
behave as if its curvature were `d/s` times larger (its damping `d/s` times smaller); to
reproduce the paper's setting on such a layer, divide `damping` by `d/s`. Because the exact
`U∇` and `Uᵀw` no longer cancel exactly against the sketched Gram, the Gram's relative error
reaches the direction amplified by about `‖UUᵀ‖/λ`: sketch only where λ is not small against
the Gram's eigenvalues (tests/test_seng.py: 64 of 72 coordinates, λ near the mean eigenvalue,
direction within 5% of the exact one). The low-rank path
drops the output-gradient energy outside the top `svd_rank` singular values, so it
under-estimates the curvature of that layer by that energy.

**State size.** The held factors and the k×k inverse have one row per curvature example, and
`init` only sees `params`: give `batch_size=` (then every `curvature` must have exactly that
many examples) or `subsample=k` (then the first k examples of any batch of at least k are
used). A mismatch raises a `ValueError` naming both sizes. The plans (and so these sizes,
`explicit_threshold`, `sketch_size`, `svd_rank`) are fixed at `init` and carried in the state's
static structure, so `optax.inject_hyperparams` may inject them without effect after `init`;
`damping` and `inverse_every` can change between steps (`seed` is read at `init` too).

**Refreshes.** Factors, Gram and inverse are recomputed from the current `curvature` where
`count % inverse_every == 0` (step 0 included), under `lax.cond`, all same-size inverses in one
batched Cholesky; the gradient is fresh every step. The damping read at a refresh (a number or
an optax schedule) is held with the inverse, so every direction is the exact solve of one
damped system. A non-finite refresh keeps the previous factors and inverse and counts a
failure. SENG is an empirical-Fisher method: capture with `fisher="empirical"` as the paper
does (a sampled-Fisher capture gives the same method on the sampled Fisher).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import flax.serialization
import jax
import jax.numpy as jnp
import optax
from jax import lax

from secondorder_optax._src import alias, engine, layerwise, linalg, patches, validation
from secondorder_optax._src.base import LayerPath, LayerStats, ScalarOrSchedule, path_to_str

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST
_METHOD = "seng"


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
  """

  kind: str
  examples: int
  subsample: bool
  matrix_shape: Tuple[int, int]
  rank: int
  sketch: Tuple[int, ...]

  @property
  def size(self) -> int:
    return self.matrix_shape[0] * self.matrix_shape[1]


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
    refreshes: successful refreshes so far (draws the sketches' fresh coordinates).
    seed: the sketches' seed (from `init`).
  """

  plan: SengPlan
  factors: Union[ExplicitFactors, OuterProductFactors]
  gram_inverse: Array
  damping: Array
  refreshes: Array
  seed: Array


# ---------------------------------------------------------------------------------------
# Plans and initial state.


def _static_int(name: str, value: Any, minimum: int) -> int:
  """A hyperparameter that fixes state shapes, concrete at init (clear error otherwise)."""
  number = validation.check_structural_int(_METHOD, name, value, minimum)
  if number is None:
    raise ValueError(
        f"{_METHOD}: {name} fixes the shapes of the optimizer state and must be a concrete "
        f"integer at init (call init outside jit); after init it is read from the state")
  return number


def _curvature_examples(batch_size: Any, subsample: Any) -> Tuple[int, bool]:
  """`(k, is_subsample)` from the `batch_size` / `subsample` keywords."""
  if subsample is not None:
    k = _static_int("subsample", subsample, 1)
    if batch_size is not None and k > _static_int("batch_size", batch_size, 1):
      raise ValueError(f"{_METHOD}: subsample={k} is larger than batch_size={batch_size}")
    return k, True
  if batch_size is None:
    raise ValueError(
        f"{_METHOD} holds one row per curvature example in its state, so their number must "
        f"be known at init: pass batch_size=<the training batch size>, or subsample=k to "
        f"use the first k examples of every batch")
  return _static_int("batch_size", batch_size, 1), False


def _make_plan(info: layerwise.LayerInfo, examples: int, subsample: bool,
               several_locations: bool, explicit_threshold: int, sketch_size: Optional[int],
               svd_rank: int) -> SengPlan:
  d_in, d_out = info.matrix_shape
  common = dict(examples=examples, subsample=subsample, matrix_shape=(d_in, d_out))
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


def _initial_state(plan: SengPlan, seed: int) -> SengLayerState:
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
                        refreshes=jnp.zeros((), jnp.int32),
                        seed=jnp.asarray(seed, jnp.int32))


def _describe_plan(plan: SengPlan) -> str:
  k = f"{plan.examples} {'subsampled ' if plan.subsample else ''}examples"
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


def _check_examples(stats: LayerStats, plan: SengPlan, key: str) -> None:
  """Clear errors for a batch that does not fit the plan (shapes only)."""
  n, k = stats.batch_size, plan.examples
  if plan.subsample and n < k:
    raise ValueError(f"{_METHOD}: subsample={k} but curvature for layer {key} has only "
                     f"{n} examples")
  if not plan.subsample and n != k:
    raise ValueError(
        f"{_METHOD} was initialised for batch_size={k} curvature examples but curvature for "
        f"layer {key} has {n}; pass the batch size the optimizer will see (or "
        f"subsample=k to use the first k examples of any batch of at least k)")


def _select_examples(stats: LayerStats, plan: SengPlan) -> LayerStats:
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


def _refresh_factors(stats: LayerStats, plan: SengPlan, rng: Array):
  if plan.kind == "explicit":
    factors = _explicit_factors(stats, plan, rng)
    return factors, _explicit_gram(factors, plan)
  factors = _outer_product_factors(stats, plan, rng)
  return factors, _outer_product_gram(factors, plan)


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


def _direction(state: SengLayerState, grad: Array) -> Array:
  """`(1/λ)(∇ − Uᵀ (λI + UUᵀ)⁻¹ U ∇)` with the held factors, inverse and λ."""
  weights = jnp.matmul(state.gram_inverse, _apply_u(state.factors, grad), precision=_HIGHEST)
  correction = _apply_u_transpose(state.factors, weights, grad.shape)
  return (grad - correction) / state.damping


@dataclasses.dataclass(frozen=True)
class SENG(engine.Algorithm):
  """SENG: the damped empirical natural gradient by Sherman–Morrison–Woodbury.

  No running statistics: each refresh builds `U` (or its factors) from the current batch and
  inverts the k×k system; the plan of each layer is fixed at `init` and held in the state, so
  the settings below are read at `init` only.
  """

  name = "seng"
  positive_damping = True
  refresh_reads_data = True
  batch_size: Any = None
  subsample: Any = None
  explicit_threshold: Any = 1_000_000
  sketch_size: Any = 256
  svd_rank: Any = 16
  sequence_paths: Tuple[LayerPath, ...] = ()
  seed: int = 0

  def plan(self, info: layerwise.LayerInfo) -> SengPlan:
    if info.path in self.sequence_paths and len(info.kernel_shape) != 2:
      raise ValueError(f"{_METHOD}: sequence_layers names {info.key}, which is not a dense "
                       f"layer (kernel shape {info.kernel_shape})")
    examples, is_subsample = _curvature_examples(self.batch_size, self.subsample)
    sketch = None if self.sketch_size is None else _static_int("sketch_size",
                                                               self.sketch_size, 1)
    several = len(info.kernel_shape) > 2 or info.path in self.sequence_paths
    return _make_plan(info, examples, is_subsample, several,
                      _static_int("explicit_threshold", self.explicit_threshold, 0), sketch,
                      _static_int("svd_rank", self.svd_rank, 1))

  def init_preconditioner(self, info):
    return _initial_state(self.plan(info), _static_int("seed", self.seed, 0))

  def refresh(self, info, statistics, previous, damping, stats):
    plan = previous.plan
    if plan.kind == "hadamard" and patches.num_locations(stats) != 1:
      raise ValueError(
          f"{_METHOD}: dense layer {info.key} runs at {patches.num_locations(stats)} "
          f"locations per example; list it in sequence_layers=[...] so that it uses the "
          f"convolution paths")
    _check_examples(stats, plan, info.key)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(previous.seed),
                                                previous.refreshes), info.index)
    # Traced inside the refresh branch: steps without a refresh never slice the examples.
    factors, gram = _refresh_factors(_select_examples(stats, plan), plan, rng)
    assemble = lambda solved: SengLayerState(plan, factors, solved["gram"], damping,
                                             previous.refreshes + 1, previous.seed)
    return {"gram": (gram, damping)}, assemble

  def solve(self, block):
    gram, damping = block
    return linalg.checked_damped_inverse(gram, damping.astype(gram.dtype))

  def apply(self, info, state, statistics, grad, damping):
    return _direction(state, grad)

  def describe(self, info):
    return _describe_plan(self.plan(info))


# ---------------------------------------------------------------------------------------
# Public transformations.


def scale_by_seng(
    *,
    damping: ScalarOrSchedule,
    batch_size: Optional[int] = None,
    subsample: Optional[int] = None,
    inverse_every: int = 200,
    explicit_threshold: int = 1_000_000,
    sketch_size: Optional[int] = 256,
    svd_rank: int = 16,
    sequence_layers: Sequence[LayerPath] = (),
    seed: int = 0,
    fallback: Optional[optax.GradientTransformation] = None,
    layers: Optional[Sequence[LayerPath]] = None,
) -> optax.GradientTransformationExtraArgs:
  """SENG preconditioner: the damped empirical natural gradient of every captured layer.

  See the module docstring for the math, the per-layer plans and where sketching changes
  the curvature scale. `update` needs `curvature=` (capture it with `fisher="empirical"`).

  Args:
    damping: λ, a number or an optax schedule of the step (read at refreshes).
    batch_size: number of examples in every `curvature` (fixes the state size); needed
      unless `subsample` is given.
    subsample: use only the first `subsample` examples of each batch for the curvature.
    inverse_every: refresh the factors and the k×k inverse every this many steps.
    explicit_threshold: convolutions (and `sequence_layers`) with at most this many
      parameters use explicit per-example gradients, larger ones the low-rank path.
    sketch_size: explicit layers with more than `sketch_size²` parameters sketch the Gram
      over `sketch_size²` coordinates; low-rank layers over `sketch_size` input / output
      rows. `None` disables sketching.
    svd_rank: singular directions kept per example on the low-rank path.
    sequence_layers: paths of dense layers that run at several locations per example (on
      sequences, or a module called several times); they use the convolution paths.
      Other dense layers must have one location per example.
    seed: seed of the sketches' coordinate sampling (fresh coordinates every refresh).
    fallback: transformation for leaves outside captured layers (default identity).
    layers: optional explicit list of layer paths to precondition.

  Returns:
    An `optax.GradientTransformationExtraArgs` with a `soo.LayerwiseState` whose layers are
    `SengLayerState`s.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, secondorder_optax as soo
    >>> model = nn.Dense(2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros(8, jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy,
    ...                               fisher="empirical")
    >>> loss, grads, curvature = curv_fn(params, x, y, jax.random.key(1))
    >>> tx = soo.scale_by_seng(damping=1e-2, batch_size=8)
    >>> state = tx.init(params)
    >>> direction, state = tx.update(grads, state, params, curvature=curvature)
    >>> direction["kernel"].shape
    (3, 2)
  """
  validation.check_period(_METHOD, "inverse_every", inverse_every)
  # Read at init only (the plans and seed live in the state): traced values (inject_hyperparams
  # inside jit) are not kept, so the algorithm stays static.
  concrete = validation.concrete
  algorithm = SENG(batch_size=concrete(batch_size), subsample=concrete(subsample),
                   explicit_threshold=concrete(explicit_threshold),
                   sketch_size=concrete(sketch_size), svd_rank=concrete(svd_rank),
                   sequence_paths=tuple(tuple(p) for p in sequence_layers),
                   seed=concrete(seed))
  inner = layerwise.layer_transformation(
      algorithm, damping=damping, stats_decay=0.0, stats_every=inverse_every,
      inverse_every=inverse_every, fallback=fallback, layers=layers, fisher="empirical",
      needs="per-example layer inputs and output gradients, captured with "
            "fisher='empirical'")

  def init_fn(params):
    found = {info.path for info in layerwise.find_layers(layerwise.to_pure(params),
                                                         layers).values()}
    missing = set(algorithm.sequence_paths) - found
    if missing:
      raise ValueError(f"{_METHOD}: sequence_layers names paths that are not preconditioned "
                       f"layers: {sorted(path_to_str(p) for p in missing)}")
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def seng(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: ScalarOrSchedule,
    batch_size: Optional[int] = None,
    subsample: Optional[int] = None,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    kl_clip: Optional[float] = None,
    inverse_every: int = 200,
    explicit_threshold: int = 1_000_000,
    sketch_size: Optional[int] = 256,
    svd_rank: int = 16,
    sequence_layers: Sequence[LayerPath] = (),
    seed: int = 0,
    fallback: Optional[optax.GradientTransformation] = None,
    layers: Optional[Sequence[LayerPath]] = None,
) -> optax.GradientTransformationExtraArgs:
  """SENG optimizer: `scale_by_seng`, decoupled weight decay, momentum, `-learning_rate`.

  Args:
    learning_rate: a number or an optax schedule.
    damping: λ, a number or an optax schedule (read at refreshes).
    batch_size: examples in every `curvature` (fixes the state size), unless `subsample`.
    subsample: use only the first `subsample` examples of each batch for the curvature.
    momentum: heavy-ball momentum on the preconditioned direction.
    weight_decay: decoupled weight decay.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change exceeds κ
      (`soo.clip_by_kl`).
    inverse_every: refresh period of the factors and the k×k inverse.
    explicit_threshold: see `scale_by_seng`.
    sketch_size: see `scale_by_seng` (`None`: no sketching).
    svd_rank: see `scale_by_seng`.
    sequence_layers: see `scale_by_seng`.
    seed: seed of the sketches' coordinate sampling.
    fallback: transformation for leaves outside captured layers.
    layers: optional explicit list of layer paths to precondition.

  Returns:
    An `optax.GradientTransformationExtraArgs` taking `curvature=` in `update`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, secondorder_optax as soo
    >>> model = nn.Dense(2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros(8, jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy,
    ...                               fisher="empirical")
    >>> tx = soo.seng(0.1, damping=1e-2, batch_size=8)
    >>> state = tx.init(params)
    >>> loss, grads, curvature = curv_fn(params, x, y, jax.random.key(1))
    >>> updates, state = tx.update(grads, state, params, curvature=curvature)
    >>> params = optax.apply_updates(params, updates)
  """
  return alias.optimizer(scale_by_seng, **locals())
