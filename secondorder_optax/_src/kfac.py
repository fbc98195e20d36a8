"""The KFAC family: KFAC (KFC for convolutions), TKFAC, EKFAC and TEKFAC (DESIGN §5).

Each preconditions a captured layer in its matrix view `W̄ = [kernel; bias]` (`(d_in [+1],
d_out)`) from the (homogeneous) inputs `ā` and per-example output gradients `g` (`d l_n / d
s_n`, not divided by the batch size N), at `T` locations per example (im2col patches for a
convolution). Each variant is a small `engine.Algorithm` overriding what its paper changes:

* `KFAC`: `A = E_n Σ_t ā āᵀ`, `G = E_n (1/T) Σ_t g gᵀ`; `A_d = A + π√λ I`,
  `G_d = G + (√λ/π) I`, `π = sqrt((tr A / dim A) / (tr G / dim G))`; direction
  `A_d⁻¹ ∇W̄ G_d⁻¹`.
* `TKFAC` (factors, damping): `Φ ∝ E_n Σ_t |g|² ā āᵀ`, `Ψ ∝ E_n Σ_t |ā|² g gᵀ` with unit
  traces and `δ = E_n ‖D_n‖²`, the trace of the exact block (a convolution's cross-location
  terms included); `Φ_d = √δ Φ + √λ I`, `Ψ_d = √δ Ψ + √λ I`.
* `EKFAC` (refresh, apply): eigenbases `Q_A`, `Q_G`; scalings `S = E_n[(Q_Aᵀ D_n Q_G)²]`
  tracked at every statistics step in the current basis; direction
  `Q_A [(Q_Aᵀ ∇W̄ Q_G) / (S + λ)] Q_Gᵀ`.
* `TEKFAC` (factors): EKFAC's eigenvalue correction in TKFAC's eigenbasis.

KFAC/TKFAC fold the damping into the inverses (a changed damping takes effect at the next
refresh); EKFAC/TEKFAC apply it at every step. kfac-jax's output factor is `1/N` of ours, so
kfac-jax's KFAC at damping `λ` equals `N ×` ours at damping `N·λ`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import alias, engine, layerwise, linalg, validation
from secondorder_optax._src.damping import relative as relative_damping
from secondorder_optax._src.base import LayerPath, running_average, stats_dtype
from secondorder_optax._src.kronecker import (TINY, EigenBases, KroneckerFactors,
                                              KroneckerInverses, eigen_direction,
                                              eigen_scalings, kronecker_factors, layer_view,
                                              trace_restricted_factors,
                                              transposed_bases)
from secondorder_optax._src.periods import INVERSE_EVERY, STATS_EVERY, Period

Array = jax.Array


# ---------------------------------------------------------------------------------------
# The algorithms.


@dataclasses.dataclass(frozen=True)
class KFAC(engine.Algorithm):
  """KFAC / KFC (Martens & Grosse 2015; Grosse & Martens 2016)."""

  name = "kfac"
  factor_text = "Kronecker A ⊗ G"
  refreshed_text = "damped inverses"
  preconditioner_dtype: Any = None

  def _dtypes(self, info: layerwise.LayerInfo) -> Tuple[Any, Any]:
    dtype = stats_dtype(info.dtype)
    return dtype, linalg.refreshed_dtype(dtype, self.preconditioner_dtype)

  def init_statistics(self, info):
    (d_in, d_out), (dtype, _) = info.matrix_shape, self._dtypes(info)
    return KroneckerFactors(jnp.zeros((d_in, d_in), dtype), jnp.zeros((d_out, d_out), dtype))

  def init_preconditioner(self, info):
    (d_in, d_out), (_, dtype) = info.matrix_shape, self._dtypes(info)
    return KroneckerInverses(jnp.eye(d_in, dtype=dtype), jnp.eye(d_out, dtype=dtype))

  def factors(self, a: Array, g: Array) -> KroneckerFactors:
    return kronecker_factors(a, g)

  def statistics(self, info, stats):
    return self.factors(*layer_view(stats, self._dtypes(info)[0]))

  def damped_factors(self, factors: KroneckerFactors, damping: Array):
    """`((A, γ m(A)), (G, γ m(G)))` with `(1 + γ)² = 1 + λ` (`damping.relative`): the
    π-corrected factored damping, relative to the factors' mean eigenvalues."""
    return tuple((factor, relative_damping(damping, factor, order=2)) for factor in factors)

  def refresh(self, info, factors, previous, damping, data):
    damped_input, damped_output = self.damped_factors(factors, damping)
    blocks = {"input": damped_input, "output": damped_output}
    return blocks, lambda solved: KroneckerInverses(solved["input"], solved["output"])

  def solve(self, block):
    factor, damping = block
    return linalg.checked_damped_inverse(factor, damping.astype(factor.dtype))

  def apply(self, info, inverses, factors, grad, damping):
    return linalg.matmul(linalg.matmul(inverses.input_inverse, grad), inverses.output_inverse)

  def describe(self, info):
    (d_in, d_out) = info.matrix_shape
    return f"{self.factor_text} ({d_in}x{d_in} ⊗ {d_out}x{d_out}), {self.refreshed_text}"


@dataclasses.dataclass(frozen=True)
class TKFAC(KFAC):
  """TKFAC (Gao et al., AAAI 2021): trace-restricted factors, the scale folded into both."""

  name = "tkfac"
  factor_text = "trace-restricted δΦ ⊗ Ψ"

  def factors(self, a, g):
    return trace_restricted_factors(a, g)

  def damped_factors(self, factors, damping):
    """KFAC's relative damping of `√δ Φ` and `√δ Ψ` (from `δΦ`, `δΨ` with `δ = tr δΦ`)."""
    root_trace = jnp.sqrt(jnp.maximum(jnp.trace(factors.input_factor), TINY))
    return super().damped_factors(
        KroneckerFactors(*(factor / root_trace for factor in factors)), damping)


@dataclasses.dataclass(frozen=True)
class EKFAC(KFAC):
  """EKFAC (George et al., NeurIPS 2018): KFAC's eigenbasis, re-estimated eigenvalues."""

  name = "ekfac"
  refreshed_text = "eigenbases + per-entry scalings"

  def init_preconditioner(self, info):
    (d_in, d_out), (dtype, basis_dtype) = info.matrix_shape, self._dtypes(info)
    input_basis = jnp.eye(d_in, dtype=basis_dtype)
    output_basis = jnp.eye(d_out, dtype=basis_dtype)
    return EigenBases(input_basis, output_basis, jnp.ones((d_in, d_out), dtype),
                      *transposed_bases(input_basis, output_basis))

  def refresh(self, info, factors, previous, damping, data):
    def assemble(solved):
      bases = (solved["input"].astype(previous.input_basis.dtype),
               solved["output"].astype(previous.output_basis.dtype))
      return EigenBases(*bases, previous.scalings, *transposed_bases(*bases))
    return {"input": factors.input_factor, "output": factors.output_factor}, assemble

  def solve(self, factor):
    return linalg.eigh(factor)[1]

  def track(self, info, bases, stats, decay, first):
    a, g = layer_view(stats, bases.scalings.dtype)
    batch_scalings = eigen_scalings(a, g, bases.input_basis, bases.output_basis)
    return bases._replace(scalings=running_average(bases.scalings, batch_scalings, decay, first))

  def apply(self, info, bases, factors, grad, damping):
    return eigen_direction(grad, bases, relative_damping(damping, bases.scalings.reshape(-1)))


@dataclasses.dataclass(frozen=True)
class TEKFAC(EKFAC, TKFAC):
  """TEKFAC (Gao et al., arXiv 2011.13609): EKFAC's correction (refresh, track, apply) in
  TKFAC's eigenbasis (factors)."""

  name = "tekfac"


# ---------------------------------------------------------------------------------------
# Public transformations. The arguments are described once, on `soo.kfac`.


def _scale_by(algorithm_type, *, damping, stats_decay, stats_every, inverse_every,
              preconditioner_dtype, fallback, layers,
              **settings) -> optax.GradientTransformationExtraArgs:
  """The body of every `scale_by_` here (called with its own arguments): the variant built
  from its checked settings, on the engine."""
  name = algorithm_type.name
  algorithm = algorithm_type(
      preconditioner_dtype=validation.check_preconditioner_dtype(name, preconditioner_dtype),
      **{key: validation.check_flag(name, key, value) for key, value in settings.items()})
  return layerwise.layer_transformation(
      algorithm, damping=damping, stats_decay=stats_decay, stats_every=stats_every,
      inverse_every=inverse_every, fallback=fallback, layers=layers)


def scale_by_kfac(*, damping: Any = 1.0, stats_decay: Any = 0.95,
                  stats_every: Period = STATS_EVERY, inverse_every: Period = INVERSE_EVERY,
                  preconditioner_dtype: Any = None,
                  fallback: Optional[optax.GradientTransformation] = None,
                  layers: Union[None, str, Sequence[LayerPath]] = None,
                  ) -> optax.GradientTransformationExtraArgs:
  """KFAC / KFC direction `A_d⁻¹ ∇W̄ G_d⁻¹` of every captured layer. See `soo.kfac`.

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
  return _scale_by(KFAC, **locals())


def scale_by_tkfac(*, damping: Any = 1.0, stats_decay: Any = 0.95,
                   stats_every: Period = STATS_EVERY, inverse_every: Period = INVERSE_EVERY,
                   preconditioner_dtype: Any = None,
                   fallback: Optional[optax.GradientTransformation] = None,
                   layers: Union[None, str, Sequence[LayerPath]] = None,
                   ) -> optax.GradientTransformationExtraArgs:
  """TKFAC direction `(√δ Φ + √λ I)⁻¹ ∇W̄ (√δ Ψ + √λ I)⁻¹`. See `soo.kfac` for the
  arguments.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_tkfac(damping=1e-3)
    >>> state = tx.init({"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}})
    >>> state.statistics["Dense_0"].input_factor.shape
    (5, 5)
  """
  return _scale_by(TKFAC, **locals())


def scale_by_ekfac(*, damping: Any = 1.0, stats_decay: Any = 0.95,
                   stats_every: Period = STATS_EVERY, inverse_every: Period = INVERSE_EVERY,
                   preconditioner_dtype: Any = None,
                   fallback: Optional[optax.GradientTransformation] = None,
                   layers: Union[None, str, Sequence[LayerPath]] = None,
                   ) -> optax.GradientTransformationExtraArgs:
  """EKFAC direction `Q_A [(Q_Aᵀ ∇W̄ Q_G) / (S + λ)] Q_Gᵀ`. See `soo.kfac` for the
  arguments (`inverse_every` refreshes the eigenbases).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_ekfac(damping=1e-3, stats_every=10, inverse_every=100)
    >>> sorted(soo.describe(tx, {"kernel": jnp.ones((4, 3))}, print_fn=None))
    ['kernel']
  """
  return _scale_by(EKFAC, **locals())


def scale_by_tekfac(*, damping: Any = 1.0, stats_decay: Any = 0.95,
                    stats_every: Period = STATS_EVERY, inverse_every: Period = INVERSE_EVERY,
                    preconditioner_dtype: Any = None,
                    fallback: Optional[optax.GradientTransformation] = None,
                    layers: Union[None, str, Sequence[LayerPath]] = None,
                    ) -> optax.GradientTransformationExtraArgs:
  """TEKFAC direction `Q_Φ [(Q_Φᵀ ∇W̄ Q_Ψ) / (S + λ)] Q_Ψᵀ`. See `soo.kfac` for the
  arguments (`inverse_every` refreshes the eigenbases).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_tekfac(damping=1e-3)
    >>> state = tx.init({"Dense_0": {"kernel": jnp.ones((4, 3))}})
    >>> state.preconditioner["Dense_0"].scalings.shape
    (4, 3)
  """
  return _scale_by(TEKFAC, **locals())


def kfac(learning_rate: optax.ScalarOrSchedule = 0.1, *, damping: Any = 0.3,
         momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
         kl_clip: Optional[float] = 0.02, stats_decay: Any = 0.95,
         stats_every: Period = STATS_EVERY, inverse_every: Period = INVERSE_EVERY,
         preconditioner_dtype: Any = None,
         fallback: Optional[optax.GradientTransformation] = None,
         fallback_learning_rate: optax.ScalarOrSchedule = 1e-3,
         layers: Union[None, str, Sequence[LayerPath]] = None
         ) -> optax.GradientTransformationExtraArgs:
  """KFAC: `soo.scale_by_kfac`, decoupled weight decay, momentum and `-learning_rate`.

  The arguments below are shared by `soo.tkfac`, `soo.ekfac` and `soo.tekfac` (and their
  `scale_by_` forms, which take all but the first four).

  Args:
    learning_rate: a number or an optax schedule.
    damping: relative damping λ (number, array or optax schedule of the step): every damped
      curvature block's mean eigenvalue is `1 + λ` times its own (`soo` DESIGN §6), so one
      value means the same for every method and every data scale. Default 0.3 for KFAC
      (two epochs of the full MNIST autoencoder: 68.7 against 73.4 at 1 and 70.3 at 0.1),
      0.1 for EKFAC and TEKFAC, whose damping only enters the scalings (ten epochs: EKFAC
      56.91, TEKFAC 56.82 against 58.38, 58.56 at 0.3, both ahead of KFAC's 58.23 at every
      epoch), 0.3 for TKFAC too (since its convolutions' `δ` counts the cross-location
      terms; at 1 the full MNIST autoencoder reaches Adam's loss after 2.25 epochs instead
      of 1.5; `docs/defaults.md`).
    momentum: `β` of the debiased EMA of the preconditioned directions, restarted at the
      refreshes of the preconditioner while `inverse_every` grows (`soo.restarting_ema`;
      with the default, up to step 96), so that it does not average the directions of the
      fast-changing first preconditioners, then one average (later restarts cost 0.09–0.13
      after ten epochs of the full MNIST autoencoder; an integer `inverse_every` restarts it
      at every refresh); `None` or 0 for none. After 50 steps of the MNIST
      autoencoder KFAC ends at 88.1 with it, 165.8 with a plain EMA and 93.6 without
      momentum (Adam 175.5); on a 78-step conv net with batch 128 at 0.488, 0.446 and 0.767
      (Adam 0.536; `docs/defaults.md`).
    weight_decay: decoupled weight decay coefficient.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change `η² ⟨Δ, g⟩` exceeds
      κ (`soo.clip_by_kl`; Ba et al. 2017). Default 0.02 for KFAC (at 0.03 a second seed
      of the Fashion-MNIST CNN ended above Adam, 0.550 against 0.537; at 0.02 0.482, and
      the full MNIST autoencoder reaches Adam's loss after 1.75 epochs instead of 1.5),
      0.03 for EKFAC and TEKFAC, 0.01 for TKFAC (at 0.02 the 78-step Fashion-MNIST CNN
      ends at 0.375 instead of 0.206 and the digits MLP at 0.312 instead of 0.130;
      `docs/defaults.md`). Those numbers predate the exact model cap that `soo.clip_by_kl`
      also applies to a classifier's steps; with it, KFAC's CNN ends at 0.229 / 0.209 /
      0.220 on three seeds (thirteenth round).
    stats_decay: weight of the old value in the running averages of the statistics; the
      first finite statistic initialises them.
    stats_every: statistics are updated at steps where `count % stats_every == 0`: an
      integer, or a schedule `count -> period`. Default `soo.growing_period(5)`: every
      step at first, the period doubling after every two updates up to 5.
    inverse_every: inverses (KFAC, TKFAC) or eigenbases (EKFAC, TEKFAC) are refreshed at
      steps where `count % inverse_every == 0`, under `lax.cond`, all same-shape factors
      of the model in one batched call; a failed refresh keeps the previous one. Default
      `soo.growing_period(50)`: steps 0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, then
      every 50 (fresh inverses while the curvature changes fast, cheap steps later;
      `docs/defaults.md`).
    preconditioner_dtype: dtype in which the refreshed preconditioners are stored and
      applied (default: the statistics' dtype, float32 at least); `jnp.bfloat16` halves
      their memory, with float32 sums and a float32 direction.
    fallback: transformation for parameter leaves outside captured layers (default
      `optax.adamw(fallback_learning_rate, weight_decay=weight_decay)`, as optax's Muon
      does for non-matrix leaves); `soo.describe(tx, params)` lists the rule of every leaf.
    fallback_learning_rate: the default fallback's learning rate (Adam's own scale).
    layers: which layers to precondition: `None` (default) every node with a `kernel` and
      optional `bias`; `'captured'` only those the step's curvature records, so layers the
      capture leaves out (DenseGeneral, Einsum, ConvTranspose, masked or grouped kernels)
      are trained by `fallback` (its state then covers every leaf); `'dense'` only the
      nodes with a 2-D kernel (convolutions go to `fallback`); or an explicit list of
      layer paths. The other leaves go to `fallback`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` takes `curvature=` (from
    `soo.linen_curvature` / `soo.nnx_curvature`). Its state's `preconditioner` holds a
    `KroneckerInverses` (KFAC, TKFAC) or `EigenBases` (EKFAC, TEKFAC) per layer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> import secondorder_optax as soo
    >>> model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
    >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)
    >>> tx = soo.kfac(1e-2, damping=1e-3)
    >>> state = tx.init(params)
    >>> loss, grads, curvature = curv_fn(params, x, y, jax.random.key(1))
    >>> updates, state = tx.update(grads, state, params, curvature=curvature)
    >>> params = optax.apply_updates(params, updates)
  """
  return alias.optimizer(scale_by_kfac, **locals())


def tkfac(learning_rate: optax.ScalarOrSchedule = 0.1, *, damping: Any = 0.3,
          momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
          kl_clip: Optional[float] = 0.01, stats_decay: Any = 0.95,
          stats_every: Period = STATS_EVERY, inverse_every: Period = INVERSE_EVERY,
          preconditioner_dtype: Any = None,
          fallback: Optional[optax.GradientTransformation] = None,
          fallback_learning_rate: optax.ScalarOrSchedule = 1e-3,
          layers: Union[None, str, Sequence[LayerPath]] = None
          ) -> optax.GradientTransformationExtraArgs:
  """TKFAC: `soo.scale_by_tkfac`, weight decay, momentum, `-learning_rate`.

  Arguments as `soo.kfac`.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.tkfac(0.1, damping=1e-3, inverse_every=10)
    >>> state = tx.init({"kernel": jnp.ones((4, 3))})
  """
  return alias.optimizer(scale_by_tkfac, **locals())


def ekfac(learning_rate: optax.ScalarOrSchedule = 0.1, *, damping: Any = 0.1,
          momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
          kl_clip: Optional[float] = 0.03, stats_decay: Any = 0.95,
          stats_every: Period = STATS_EVERY, inverse_every: Period = INVERSE_EVERY,
          preconditioner_dtype: Any = None,
          fallback: Optional[optax.GradientTransformation] = None,
          fallback_learning_rate: optax.ScalarOrSchedule = 1e-3,
          layers: Union[None, str, Sequence[LayerPath]] = None
          ) -> optax.GradientTransformationExtraArgs:
  """EKFAC: `soo.scale_by_ekfac`, weight decay, momentum, `-learning_rate`.

  Arguments as `soo.kfac`; `inverse_every` refreshes the eigenbases, the scalings are
  re-estimated at every statistics step, and the damping is added to the scalings.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.ekfac(0.1, damping=1e-3, stats_every=10, inverse_every=100)
    >>> state = tx.init({"kernel": jnp.ones((4, 3))})
  """
  return alias.optimizer(scale_by_ekfac, **locals())


def tekfac(learning_rate: optax.ScalarOrSchedule = 0.1, *, damping: Any = 0.1,
           momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
           kl_clip: Optional[float] = 0.03, stats_decay: Any = 0.95,
           stats_every: Period = STATS_EVERY, inverse_every: Period = INVERSE_EVERY,
           preconditioner_dtype: Any = None,
           fallback: Optional[optax.GradientTransformation] = None,
           fallback_learning_rate: optax.ScalarOrSchedule = 1e-3,
           layers: Union[None, str, Sequence[LayerPath]] = None
           ) -> optax.GradientTransformationExtraArgs:
  """TEKFAC: `soo.scale_by_tekfac`, weight decay, momentum, `-learning_rate`.

  Arguments as `soo.kfac` (`inverse_every` refreshes the eigenbases).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.tekfac(0.1, damping=1e-3)
    >>> state = tx.init({"kernel": jnp.ones((4, 3))})
  """
  return alias.optimizer(scale_by_tekfac, **locals())
