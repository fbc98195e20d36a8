"""SENG: Sketchy Empirical Natural Gradient (Yang, Xu, Wen, Chen & Xu, 2022; DESIGN §5).

For every captured layer, `U ∈ R^{k×d}` stacks the rows `vec(D_n)/√k` of the first `k`
examples' per-example weight gradients (`k` = the batch size, or `subsample`). The direction
is the damped empirical natural gradient, solved in the k×k example space by
Sherman–Morrison–Woodbury:

    (λI + UᵀU)⁻¹ ∇ = (1/λ) (∇ − Uᵀ (λI_k + U Uᵀ)⁻¹ U ∇).

**Centred rows (the default, `centered=True`).** `UᵀU` is the second moment of the
per-example gradients, and it contains the outer product of their mean, the gradient itself:
`(λI + UᵀU)⁻¹` shrinks every step along `∇` (the empirical Fisher's known flaw; Kunstner,
Balles & Hennig 2019). By default SENG uses the rows' covariance instead, `U_c = P U` with
`P = I − 11ᵀ/k` (the covariance of the gradients, as in TONGA, Le Roux, Manzagol & Bengio
2008): `U_cᵀU_c = Σ_n (D_n − D̄)(D_n − D̄)ᵀ / k`. Nothing else changes: the Gram becomes
`P (U Uᵀ) P`, `U_c ∇ = P (U ∇)` and `U_cᵀ w = Uᵀ (P w)`, so every plan below centres for the
price of a k-vector mean. `centered=False` is the paper's empirical Fisher. Measured
(`docs/defaults.md`, eighth round; damping 0.3, refreshes every 10 steps, momentum
restarted at refreshes, below): on a 50-step MNIST autoencoder 153.3 where the empirical
Fisher ends at 205.0 (Adam 175.5); on a Fashion-MNIST CNN 0.436 against 0.478.

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
direction within 5% of the exact one, 8% with centred rows). The low-rank path
drops the output-gradient energy outside the top `svd_rank` singular values, so it
under-estimates the curvature of that layer by that energy.

**State size.** The held factors and the k×k inverse have one row per curvature example, and
`init` only sees `params`: give `batch_size=` (then every `curvature` must have exactly that
many examples) or `subsample=k` (then the first k examples of any batch of at least k are
used). A mismatch raises a `ValueError` naming both sizes. The plans (and so these sizes,
`centered`, `max_damping_drop`, `explicit_threshold`, `sketch_size`, `svd_rank`) are fixed
at `init` and carried in the state's static structure, so `optax.inject_hyperparams` may
inject them without effect after `init`; `damping` and `inverse_every` can change between
steps (`seed` is read at `init` too).

**Refreshes.** Factors, Gram and inverse are recomputed from the current `curvature` where
`count % inverse_every == 0` (step 0 included), under `lax.cond`, all same-size inverses in one
batched Cholesky; the gradient is fresh every step. A refresh can change the step's scale by
orders of magnitude (the relative damping follows the per-example gradients, which grew 25×
in the autoencoder's first ten steps), so `soo.seng` restarts its momentum at refreshes, as
the Kronecker methods do: without, the pre-refresh momentum kept pushing for twenty steps
after it had turned uphill. The damping read at a refresh (a number or
an optax schedule) is held with the inverse, so every direction is the exact solve of one
damped system. A non-finite refresh keeps the previous factors and inverse and counts a
failure. SENG is an empirical-Fisher method: capture with `fisher="empirical"` as the paper
does; a sampled-Fisher capture raises a `ValueError` (its Woodbury solve of the sampled
Fisher was seen to diverge where the empirical one trains).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import optax

from secondorder_optax._src import alias, engine, layerwise, linalg, patches, validation
from secondorder_optax._src import seng_factors as sf
from secondorder_optax._src.base import LayerPath, ScalarOrSchedule, path_to_str
from secondorder_optax._src.damping import per_factor
from secondorder_optax._src.seng_factors import SengLayerState, SengPlan

_METHOD = "seng"


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
  centered: Any = True
  max_damping_drop: Any = 2.0

  def plan(self, info: layerwise.LayerInfo) -> SengPlan:
    if info.path in self.sequence_paths and len(info.kernel_shape) != 2:
      raise ValueError(f"{_METHOD}: sequence_layers names {info.key}, which is not a dense "
                       f"layer (kernel shape {info.kernel_shape})")
    centered = sf.read_at_init("centered", self.centered)
    examples, is_subsample = sf.curvature_examples(self.batch_size, self.subsample, centered)
    sketch = None if self.sketch_size is None else sf.static_int("sketch_size",
                                                               self.sketch_size, 1)
    several = len(info.kernel_shape) > 2 or info.path in self.sequence_paths
    return sf.make_plan(info, examples, is_subsample, several,
                      sf.static_int("explicit_threshold", self.explicit_threshold, 0), sketch,
                      sf.static_int("svd_rank", self.svd_rank, 1), centered,
                      float(sf.read_at_init("max_damping_drop", self.max_damping_drop)))

  def init_preconditioner(self, info):
    return sf.initial_state(self.plan(info), sf.static_int("seed", self.seed, 0))

  def refresh(self, info, statistics, previous, damping, stats):
    plan = previous.plan
    if plan.kind == "hadamard" and patches.num_locations(stats) != 1:
      raise ValueError(
          f"{_METHOD}: dense layer {info.key} runs at {patches.num_locations(stats)} "
          f"locations per example; list it in sequence_layers=[...] so that it uses the "
          f"convolution paths")
    sf.check_examples(stats, plan, info.key)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(previous.seed),
                                                previous.refreshes), info.index)
    # Traced inside the refresh branch: steps without a refresh never slice the examples.
    factors, gram = sf.refresh_factors(sf.select_examples(stats, plan), plan, rng)
    # Relative to the mean of the nonzero spectrum of U_cᵀU_c (rank ≤ min(k [− 1], d)).
    scale = sf.damping_scale(gram, plan, previous)
    shift = (per_factor(damping, 1) * scale).astype(gram.dtype)
    assemble = lambda solved: SengLayerState(plan, factors, solved["gram"], shift, scale,
                                             previous.refreshes + 1, previous.seed)
    return {"gram": (gram, shift)}, assemble

  def solve(self, block):
    gram, damping = block
    return linalg.checked_damped_inverse(gram, damping.astype(gram.dtype))

  def apply(self, info, state, statistics, grad, damping):
    return sf.direction(state, grad)

  def describe(self, info):
    return sf.describe_plan(self.plan(info))


# ---------------------------------------------------------------------------------------
# Public transformations.


def scale_by_seng(
    *,
    damping: ScalarOrSchedule = 0.1,
    batch_size: Optional[int] = None,
    subsample: Optional[int] = None,
    centered: bool = True,
    max_damping_drop: float = 2.0,
    inverse_every: int = 20,
    explicit_threshold: int = 1_000_000,
    sketch_size: Optional[int] = 256,
    svd_rank: int = 16,
    sequence_layers: Sequence[LayerPath] = (),
    seed: int = 0,
    fallback: Optional[optax.GradientTransformation] = None,
    layers: Union[None, str, Sequence[LayerPath]] = None,
) -> optax.GradientTransformationExtraArgs:
  """SENG preconditioner: the damped empirical natural gradient of every captured layer.

  See the module docstring for the math, the per-layer plans and where sketching changes
  the curvature scale. `update` needs `curvature=` (capture it with `fisher="empirical"`).

  The arguments are those of `soo.seng` (all but `learning_rate`, `momentum`,
  `weight_decay` and `kl_clip`).

  Returns:
    An `optax.GradientTransformationExtraArgs` with a `soo.PreconditionerState` whose
    `preconditioner` holds a `SengLayerState` per layer.

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
  validation.check_at_least(_METHOD, "max_damping_drop", max_damping_drop, 1.0)
  # Read at init only (the plans and seed live in the state): traced values (inject_hyperparams
  # inside jit) are not kept, so the algorithm stays static.
  concrete = validation.concrete
  algorithm = SENG(batch_size=concrete(batch_size), subsample=concrete(subsample),
                   centered=(None if isinstance(centered, jax.core.Tracer)
                             else validation.check_flag(_METHOD, "centered", centered)),
                   max_damping_drop=concrete(max_damping_drop),
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
    explicit = layerwise.coverage_layers(_METHOD, layers)[0]
    found = {info.path for info in layerwise.find_layers(layerwise.to_pure(params),
                                                         explicit).values()}
    missing = set(algorithm.sequence_paths) - found
    if missing:
      raise ValueError(f"{_METHOD}: sequence_layers names paths that are not preconditioned "
                       f"layers: {sorted(path_to_str(p) for p in missing)}")
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def seng(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    *,
    damping: ScalarOrSchedule = 0.1,
    batch_size: Optional[int] = None,
    subsample: Optional[int] = None,
    centered: bool = True,
    max_damping_drop: float = 2.0,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    kl_clip: Optional[float] = 0.1,
    inverse_every: int = 20,
    explicit_threshold: int = 1_000_000,
    sketch_size: Optional[int] = 256,
    svd_rank: int = 16,
    sequence_layers: Sequence[LayerPath] = (),
    seed: int = 0,
    fallback: Optional[optax.GradientTransformation] = None,
    fallback_learning_rate: optax.ScalarOrSchedule = 1e-3,
    layers: Union[None, str, Sequence[LayerPath]] = None,
) -> optax.GradientTransformationExtraArgs:
  """SENG optimizer: `scale_by_seng`, decoupled weight decay, momentum, `-learning_rate`.

  Args:
    learning_rate: a number or an optax schedule.
    damping: relative damping λ (read at refreshes): `λ` times the mean nonzero eigenvalue of
      each layer's (centred) empirical Fisher, `tr F / min(N [− 1], d)` (`soo` DESIGN §6).
      0.1: × Adam's loss at equal steps 0.76 / 0.86 / 0.35 on the MNIST autoencoder, a
      Fashion-MNIST CNN and a digits MLP (0.3: 0.87 / 0.81 / 0.33; 1: 1.02 / 1.02 / 0.16),
      and ahead of Adam at every epoch of the full MNIST autoencoder (71.76 after ten
      epochs against 71.85; 0.3: 78.78; `docs/defaults.md`).
    batch_size: number of examples in every `curvature` (fixes the state size); needed
      unless `subsample` is given.
    subsample: use only the first `subsample` examples of each batch for the curvature.
    centered: use the covariance of the per-example gradients (their rows minus their mean)
      instead of their second moment, the paper's empirical Fisher (`False`); see the
      module docstring. Read at `init`.
    max_damping_drop: between refreshes the eigenvalue scale the damping is relative to
      falls by at most this factor (it rises at once): near an interpolating fit the
      empirical Fisher vanishes faster than the gradient and a damping relative to it
      would let the step grow like 1/residual (`damping_scale` in `seng_factors`). 1 keeps
      the largest scale seen; `float('inf')`, the plain relative damping. Read at `init`.
    momentum: `β` of the EMA of the preconditioned directions (`optax.ema(β, debias=True)`),
      restarted at every refresh (`soo.restarting_ema`); `None` or 0 for none.
    weight_decay: decoupled weight decay.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change exceeds κ
      (`soo.clip_by_kl`). The clip sets SENG's step (the learning rate rarely matters);
      0.1 (at damping 0.3, 0.03: the autoencoder 1.06× Adam; 0.3: the digits 0.50×).
    inverse_every: refresh the factors and the k×k inverse every this many steps (at
      damping 0.3, 20: the Fashion-MNIST CNN 0.422, 50: 0.466; at 200 with the paper's
      Fisher and damping 1: 0.522).
    explicit_threshold: convolutions (and `sequence_layers`) with at most this many
      parameters use explicit per-example gradients, larger ones the low-rank path.
    sketch_size: explicit layers with more than `sketch_size²` parameters sketch the Gram
      over `sketch_size²` coordinates; low-rank layers over `sketch_size` input / output
      rows. `None` disables sketching.
    svd_rank: singular directions kept per example on the low-rank path.
    sequence_layers: paths of dense layers that run at several locations per example (on
      sequences, or a module called several times); they use the convolution paths.
      Other dense layers must have one location per example.
    seed: seed of the sketches' coordinate sampling (read at `init`; fresh coordinates
      every refresh).
    fallback: transformation for parameter leaves outside captured layers (default
      `optax.adamw(fallback_learning_rate, weight_decay=weight_decay)`, as optax's Muon
      does for non-matrix leaves); `soo.describe(tx, params)` lists the rule of every leaf.
    fallback_learning_rate: the default fallback's learning rate (Adam's own scale).
    layers: as `soo.kfac`: `None` (every kernel/bias node), `'captured'` (the layers the
      step's curvature records; the others go to `fallback`) or an explicit list of paths.

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
  # The centred Fisher leaves out g gᵀ on purpose: the uncentred exact model would cut
  # every step (Fashion-MNIST CNN 0.67 with it, above Adam's 0.54; docs/defaults.md).
  return alias.optimizer(scale_by_seng, exact_model_cap=False, **locals())
