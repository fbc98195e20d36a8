"""K-BFGS(L): Kronecker-factored quasi-Newton (Goldfarb, Ren & Bahamou, NeurIPS 2020), DESIGN §5.

Each captured layer, in its matrix view `W̄ = [kernel; bias]` (`(d_in [+1], d_out)`, DESIGN
§4), is preconditioned by a Kronecker product of two inverses, `Δ = H_a ∇W̄ H_g`:

* the input factor `A = E_n Σ_t ā āᵀ` (running average, as KFAC's) has its damped inverse
  `H_a ≈ (A + γ m(A) I)⁻¹` maintained by BFGS: at every step, with the mean input `ā̄` of
  the minibatch, `s_a = H_a ā̄`, `y_a = (A + γ m(A) I) s_a` and the BFGS update of `H_a` by
  `(s_a, y_a)` (the paper's Hessian-action BFGS); every `inverse_every` steps `H_a` is
  reset to the exact damped inverse (one batched refresh of all same-shape factors);
* the output factor, a curvature of the loss in the pre-activations `h = ā W̄`, is never
  formed: its damped inverse `H_g` is L-BFGS's, from the last `memory` secant pairs of mean
  pre-activations and their mean gradients on one minibatch at two parameter values,
  `s = E_n h_n(θ) − E_n h_n(θ')`, `y = E_n g_n(θ) − E_n g_n(θ')` (`g_n = d l_n / d h_n`),
  double damped: Powell's damping on `H_g` (`μ₁ = 0.2`), then Levenberg–Marquardt damping
  on `B_g = H_g⁻¹` (`ỹ = y + μ₂ s̃`). L-BFGS starts from the usual `H₀ = (s̃ᵀỹ / ỹᵀỹ) I`
  of the newest pair (`I / ((1 + γ) m_G)` before the first pair).

Damping is relative (`soo` DESIGN §6), as KFAC's: `(1 + γ)² = 1 + damping`, `m(A)` the
mean eigenvalue of `A`, and `m_G` that of KFAC's output factor `E_n (1/T) Σ_t g gᵀ`
(a running average of `E_n (1/T) Σ_t |g|² / d_out`), so that `μ₂ = γ m_G`.

The secant pairs need the pre-activations and output gradients at a second parameter value
on the same minibatch: `update` takes `curvature_fn=`, a function of the parameters that
captures on this step's minibatch, and evaluates it at the previous step's parameters (kept
in the state). The paper pairs `θ_k` with `θ_{k+1}` on minibatch `k`; here step `k` pairs
`θ_{k−1}` with `θ_k` on minibatch `k`: the same pairs one step later, with no need to know
the parameters after this update. The curvature must be the empirical Fisher's
(`fisher="empirical"`): its output gradients are the gradients at the given targets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import (alias, engine, kronecker, layerwise, linalg, patches,
                                    validation)
from secondorder_optax._src import quasi_newton as qn
from secondorder_optax._src.base import (Curvature, LayerPath, LayerStats, ScalarOrSchedule,
                                         all_finite, select_tree, stats_dtype)
from secondorder_optax._src.damping import per_factor
from secondorder_optax._src.damping import relative as relative_damping

Array = jax.Array
_NEEDS = "per-layer inputs and output gradients at the given targets (fisher='empirical')"


class KbfgsStatistics(NamedTuple):
  """Running averages of one layer's statistics.

  Attributes:
    input_factor: `A = E_n Σ_t ā āᵀ` (`(d_in [+1], d_in [+1])`).
    output_scale: `E_n (1/T) Σ_t |g|² / d_out`, the mean eigenvalue of KFAC's output factor:
      the scale the output factor's damping is relative to.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> state = soo.scale_by_kbfgs().init({"Dense_0": {"kernel": jnp.ones((4, 3))}})
    >>> state.inner.statistics["Dense_0"].input_factor.shape
    (4, 4)
  """

  input_factor: Array
  output_scale: Array


class SecantPair(NamedTuple):
  """Secant pairs of the output factor, double damped: `s̃` (change of the mean
  pre-activations) and `ỹ` (change of their mean gradients, plus `μ₂ s̃`); a ring of
  `memory` pairs in `KbfgsPreconditioner.pairs` (`(memory, d_out)` each)."""

  s: Array
  y: Array


class KbfgsPreconditioner(NamedTuple):
  """K-BFGS(L)'s preconditioner of one layer.

  Attributes:
    input_inverse: `H_a`, the BFGS-maintained inverse of the damped input factor (the
      identity before the first refresh).
    pairs: the ring of the last `memory` accepted secant pairs.
    filled: `(memory,)` which slots of the ring hold a pair.
    next_slot: the slot the next pair goes to (the oldest one once the ring is full).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> state = soo.scale_by_kbfgs(memory=5).init({"kernel": jnp.ones((4, 3))})
    >>> state.inner.preconditioner[""].pairs.s.shape
    (5, 3)
  """

  input_inverse: Array
  pairs: SecantPair
  filled: Array
  next_slot: Array


class KbfgsState(NamedTuple):
  """State of `soo.scale_by_kbfgs` / `soo.kbfgs`.

  Attributes:
    count: steps taken with finite gradients.
    previous_params: the parameters of the last such step, where `curvature_fn` is
      evaluated (the initial parameters before the first step).
    inner: the state of the wrapped transformation (for `scale_by_kbfgs` the engine's
      `soo.PreconditionerState`, whose `preconditioner` holds a `KbfgsPreconditioner` per
      layer and `statistics` a `KbfgsStatistics`).
  """

  count: Array
  previous_params: Any
  inner: Any


class PreviousPass(NamedTuple):
  """What the second pass brings to the layer units (internal): the capture at the
  previous parameters on this step's minibatch, both parameter values, and whether there
  was a previous step."""

  curvature: Curvature
  previous_params: Any
  params: Any
  has_previous: Array


class LayerData(NamedTuple):
  """One layer's data at this step (internal): captures and weights at `θ` and `θ'`."""

  current: LayerStats
  previous: LayerStats
  weights: Array
  previous_weights: Array
  has_previous: Array


def _output_mean_eigenvalue(statistics: KbfgsStatistics) -> Array:
  scale = statistics.output_scale
  return jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)


def _output_damping(statistics: KbfgsStatistics, damping: Array):
  """`(μ₂, h)`: the Levenberg–Marquardt damping `γ m_G` and `1/((1+γ) m_G)`, L-BFGS's
  initial scale before the first pair."""
  gamma = per_factor(damping, 2)
  mean = _output_mean_eigenvalue(statistics)
  return gamma * mean, 1.0 / ((1.0 + gamma) * mean)


def _initial_scale(preconditioner: "KbfgsPreconditioner", fallback: Array) -> Array:
  """L-BFGS's `H₀ = h₀ I`: `h₀ = s̃ᵀỹ / ỹᵀỹ` of the newest pair (Nocedal & Wright, eq.
  7.20), `fallback` before the first one."""
  p = preconditioner
  newest = (p.next_slot - 1) % p.filled.shape[0]
  s, y = p.pairs.s[newest], p.pairs.y[newest]
  sy, yy = jnp.sum(s * y), jnp.sum(y * y)
  ok = p.filled[newest] & (sy > 0) & (yy > 0)
  return jnp.where(ok, sy / jnp.where(ok, yy, 1.0), fallback).astype(fallback.dtype)


def _mean_rows(x: Array) -> Array:
  return jnp.mean(x.reshape((-1, x.shape[-1])), axis=0)


# ---------------------------------------------------------------------------------------
# The algorithm box.


@dataclasses.dataclass(frozen=True)
class Kbfgs(engine.Algorithm):
  """K-BFGS(L): `H_a` by BFGS (exact at refreshes), `H_g` by L-BFGS from secant pairs."""

  name = "kbfgs"
  step_reads_data = True
  memory: Optional[int] = 100

  def init_statistics(self, info):
    (d_in, _), dtype = info.matrix_shape, stats_dtype(info.dtype)
    return KbfgsStatistics(jnp.zeros((d_in, d_in), dtype), jnp.zeros((), dtype))

  def init_preconditioner(self, info):
    (d_in, d_out), dtype = info.matrix_shape, stats_dtype(info.dtype)
    zeros = lambda: jnp.zeros((self.memory, d_out), dtype)  # distinct buffers (donation)
    return KbfgsPreconditioner(jnp.eye(d_in, dtype=dtype), SecantPair(zeros(), zeros()),
                               jnp.zeros((self.memory,), bool), jnp.zeros((), jnp.int32))

  def statistics(self, info, data):
    a, g = kronecker.layer_view(data.current, stats_dtype(info.dtype))
    return KbfgsStatistics(kronecker.input_factor(a),
                           jnp.sum(jnp.square(g)) / (a.shape[0] * a.shape[1] * g.shape[-1]))

  def refresh(self, info, statistics, previous, damping, data):
    """The exact damped inverse `(A + γ m(A) I)⁻¹` (KFAC's input factor)."""
    factor = statistics.input_factor
    block = (factor, relative_damping(damping, factor, order=2))
    return {"input": block}, lambda solved: previous._replace(input_inverse=solved["input"])

  def solve(self, block):
    factor, damping = block
    return linalg.checked_damped_inverse(factor, damping.astype(factor.dtype))

  def step(self, info, preconditioner, grad, hyperparameters, *, data, statistics):
    damping = hyperparameters["damping"]
    dtype = preconditioner.input_inverse.dtype
    a, g = kronecker.layer_view(data.current, dtype)
    a_prev, g_prev = kronecker.layer_view(data.previous, dtype)
    mean_input = _mean_rows(a)

    # Input factor: BFGS with the Hessian action of the damped running average.
    factor = statistics.input_factor
    damped = linalg.add_to_diagonal(factor, relative_damping(damping, factor, order=2))
    s_a = linalg.matmul(preconditioner.input_inverse, mean_input)
    y_a = linalg.matmul(damped, s_a)
    input_inverse = jnp.where(jnp.trace(factor) > 0,
                              qn.bfgs_inverse_update(preconditioner.input_inverse, s_a, y_a),
                              preconditioner.input_inverse)

    # Output factor: a secant pair of mean pre-activations and their mean gradients.
    s = (linalg.matmul(mean_input, data.weights.astype(dtype))
         - linalg.matmul(_mean_rows(a_prev), data.previous_weights.astype(dtype)))
    y = _mean_rows(g) - _mean_rows(g_prev)
    lm_damping, fallback = _output_damping(statistics, damping)
    ring = preconditioner.pairs
    hy = qn.two_loop(ring.s, ring.y, preconditioner.filled, preconditioner.next_slot,
                     _initial_scale(preconditioner, fallback), y)
    s, y = qn.double_damping(s, y, hy, lm_damping)
    accept = data.has_previous & qn.curvature_ok(s, y)
    s_ring, y_ring, filled, next_slot = qn.push_pair(
        ring.s, ring.y, preconditioner.filled, preconditioner.next_slot, s, y, accept)
    return KbfgsPreconditioner(input_inverse, SecantPair(s_ring, y_ring), filled, next_slot)

  def apply(self, info, preconditioner, statistics, grad, damping):
    _, fallback = _output_damping(statistics, damping)
    p = preconditioner
    right = qn.two_loop(p.pairs.s, p.pairs.y, p.filled, p.next_slot,
                        _initial_scale(p, fallback), grad)
    return linalg.matmul(p.input_inverse, right)

  def describe(self, info):
    d_in, d_out = info.matrix_shape
    return (f"K-BFGS(L): BFGS inverse of A ({d_in}x{d_in}) ⊗ L-BFGS inverse of G "
            f"({d_out}x{d_out}, {self.memory} secant pairs)")


@dataclasses.dataclass(frozen=True)
class KbfgsCoverage(layerwise.LayerCoverage):
  """The captured layers, with the second pass's capture and weights next to this step's."""

  def source(self, method, updates, units, curvature, extra_args):
    previous = extra_args.get("kbfgs_previous")
    if previous is None:
      raise ValueError(f"{method}: the layer units need the second pass; use "
                       f"soo.scale_by_kbfgs / soo.kbfgs, whose update takes curvature_fn=")
    current = super().source(method, updates, units, curvature, {})
    before = super().source(method, updates, units, previous.curvature, {})
    return current, previous._replace(curvature=before)

  def read(self, source, units):
    current, previous = source
    now, before = super().read(current, units), super().read(previous.curvature, units)
    params = layerwise.to_pure(previous.params)
    prior = layerwise.to_pure(previous.previous_params)
    weights = lambda tree, info: patches.params_to_matrix(patches.tree_get(tree, info.path),
                                                          info.has_bias)
    return {key: LayerData(now[key], before[key], weights(params, info), weights(prior, info),
                           previous.has_previous) for key, info in units.items()}


# ---------------------------------------------------------------------------------------
# The second pass and the public transformations.


def _previous_curvature(method: str, curvature_fn: Callable[[Any], Any], params: Any
                        ) -> Curvature:
  out = curvature_fn(params)
  if isinstance(out, tuple) and out:
    out = out[-1]
  if not isinstance(out, Curvature):
    raise ValueError(f"{method}: curvature_fn must return the (loss, grads, curvature) of "
                     f"soo.linen_curvature / soo.nnx_curvature (or a soo.Curvature), got "
                     f"{type(out).__name__}")
  return out


def with_second_pass(inner: optax.GradientTransformation, method: str
                     ) -> optax.GradientTransformationExtraArgs:
  """`inner` (whose K-BFGS units read `kbfgs_previous=`) with the second pass: keeps the
  previous step's parameters and evaluates `curvature_fn` there at every step."""
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # its own buffers
    return KbfgsState(count=jnp.zeros((), jnp.int32), previous_params=copy,
                      inner=inner.init(params))

  def update_fn(updates, state, params=None, *, curvature=None, curvature_fn=None,
                **extra_args):
    if curvature is None:
      layerwise.check_curvature(method, None, {}, _NEEDS)
    if params is None:
      raise ValueError(f"{method} needs params=: call tx.update(grads, state, params, "
                       f"curvature=curvature, curvature_fn=...)")
    if curvature_fn is None or not callable(curvature_fn):
      raise ValueError(
          f"{method} needs curvature_fn=, a function of the parameters returning the "
          f"capture on this step's minibatch, e.g. curvature_fn=lambda p: curv_fn(p, x, y, "
          f"rng) with curv_fn = soo.linen_curvature(model, loss, fisher='empirical'); it is "
          f"evaluated at the previous step's parameters for the secant pairs (got "
          f"{curvature_fn!r})")
    previous = PreviousPass(_previous_curvature(method, curvature_fn, state.previous_params),
                            state.previous_params, params, state.count > 0)
    out, inner_state = inner.update(updates, state.inner, params, curvature=curvature,
                                    kbfgs_previous=previous, **extra_args)
    active = all_finite(updates)
    return out, KbfgsState(count=state.count + active.astype(state.count.dtype),
                           previous_params=select_tree(active, params, state.previous_params),
                           inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scale_by_kbfgs_units(*, damping, stats_decay, stats_every, inverse_every, memory,
                          fallback=None, layers=None) -> optax.GradientTransformationExtraArgs:
  """The engine's transformation of the K-BFGS units (reads `kbfgs_previous=`)."""
  method = Kbfgs.name
  validation.check_schedule(method, damping=damping, stats_decay=stats_decay,
                            stats_every=stats_every, inverse_every=inverse_every)
  paths, captured_only = layerwise.coverage_layers(method, layers)
  coverage = KbfgsCoverage(layers=paths, needs=_NEEDS, fisher="empirical",
                           captured_only=captured_only)
  return engine.transformation(
      Kbfgs(memory=validation.check_structural_int(method, "memory", memory)), coverage,
      damping=damping, stats_decay=stats_decay, stats_every=stats_every,
      inverse_every=inverse_every, fallback=fallback, step_hyperparameters={"damping": damping})


def scale_by_kbfgs(*, damping: ScalarOrSchedule = 1.0, stats_decay: Any = 0.95,
                   stats_every: int = 1, inverse_every: int = 20, memory: int = 100,
                   fallback: Optional[optax.GradientTransformation] = None,
                   layers: Union[None, str, Sequence[LayerPath]] = "dense",
                   ) -> optax.GradientTransformationExtraArgs:
  """K-BFGS(L) direction `H_a ∇W̄ H_g` of every captured layer. See `soo.kbfgs`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import secondorder_optax as soo
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy,
    ...                               fisher="empirical")
    >>> tx = soo.scale_by_kbfgs(memory=10)
    >>> state = tx.init(params)
    >>> loss, grads, curvature = curv_fn(params, x, y, None)
    >>> direction, state = tx.update(grads, state, params, curvature=curvature,
    ...                              curvature_fn=lambda p: curv_fn(p, x, y, None))
    >>> direction["kernel"].shape
    (4, 3)
  """
  return with_second_pass(_scale_by_kbfgs_units(**locals()), Kbfgs.name)


def kbfgs(learning_rate: optax.ScalarOrSchedule = 0.1, *, damping: ScalarOrSchedule = 1.0,
          momentum: Optional[float] = 0.9, weight_decay: float = 0.0,
          kl_clip: Optional[float] = 0.01, stats_decay: Any = 0.95, stats_every: int = 1,
          inverse_every: int = 20, memory: int = 100,
          fallback: Optional[optax.GradientTransformation] = None,
          fallback_learning_rate: optax.ScalarOrSchedule = 1e-3,
          layers: Union[None, str, Sequence[LayerPath]] = "dense"
          ) -> optax.GradientTransformationExtraArgs:
  """K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020): `soo.scale_by_kbfgs`, decoupled
  weight decay, momentum and `-learning_rate`.

  Its `update` needs, besides `curvature=` (captured with `fisher="empirical"`),
  `curvature_fn=`: a function of the parameters that captures on this step's minibatch,
  typically `lambda p: curv_fn(p, x, y, rng)`. Every step evaluates it once, at the
  previous step's parameters (kept in the state), for the secant pairs of the output
  factors: one extra forward and backward pass per step, as in the paper.

  Args:
    learning_rate: a number or an optax schedule.
    damping: relative damping λ (number, array or optax schedule of the step): each of the
      two factors is damped by `γ` times its mean eigenvalue, `(1 + γ)² = 1 + λ`, as
      `soo.kfac`'s; on the output factor this is the Levenberg–Marquardt part of the double
      damping (`μ₂ = γ m_G`, with `m_G` the mean eigenvalue of KFAC's output factor).
    momentum: `β` of the debiased EMA of the preconditioned directions, restarted at every
      refresh of the preconditioner (`soo.restarting_ema`);
      `None` or 0 for none.
    weight_decay: decoupled weight decay coefficient.
    kl_clip: `None` or κ > 0: shorten steps whose estimated KL change `η² ⟨Δ, g⟩` exceeds
      κ (`soo.clip_by_kl`).
    stats_decay: weight of the old value in the running averages of the input factor and
      the output scale; the first finite statistic initialises them.
    stats_every: the statistics are updated at steps where `count % stats_every == 0`.
    inverse_every: the input factor's inverse is reset to the exact damped inverse at steps
      where `count % inverse_every == 0` (all same-shape factors in one batched call);
      BFGS maintains it at every step in between.
    memory: the number of secant pairs L-BFGS keeps per layer (the paper's p).
    fallback: transformation for parameter leaves outside captured layers (default
      `optax.adamw(fallback_learning_rate, weight_decay=weight_decay)`).
    fallback_learning_rate: the default fallback's learning rate.
    layers: as `soo.kfac`. Default `'dense'`: K-BFGS(L) is an MLP method, and our conv
      extension (`None` or a list naming conv layers) diverged on a small Fashion-MNIST CNN
      (loss 2.3 → 9.97 in two epochs; dense layers only, convs to `fallback`: 0.313, 0.58×
      Adam's loss; `docs/kbfgs.md`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` takes `curvature=` and
    `curvature_fn=`; its state is a `soo.KbfgsState`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> import secondorder_optax as soo
    >>> model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> y = jnp.argmax(x[:, :3], axis=-1)
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy,
    ...                               fisher="empirical")
    >>> tx = soo.kbfgs(memory=10)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   loss, grads, curvature = curv_fn(params, x, y, None)
    ...   updates, state = tx.update(grads, state, params, curvature=curvature,
    ...                              curvature_fn=lambda p: curv_fn(p, x, y, None))
    ...   return optax.apply_updates(params, updates), state, loss
    >>> first = step(params, state)[2]
    >>> for _ in range(30):
    ...   params, state, loss = step(params, state)
    >>> bool(loss < 0.5 * first)
    True
  """
  body = dict(locals())
  return with_second_pass(alias.optimizer(_scale_by_kbfgs_units, **body), Kbfgs.name)
