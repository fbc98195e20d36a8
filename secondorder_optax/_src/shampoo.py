"""Shampoo (Gupta, Koren & Singer, ICML 2018), DESIGN §5.

Every parameter tensor with modes `(d_1, ..., d_k)` (see `tensor_modes`) gets one statistic
per mode, `H_i = contract_all_but_i(G, G)` of the gradient, either summed over steps (the
original, AdaGrad-like Shampoo; `stats_decay=None`) or running-averaged. At each inverse
refresh every factor's root `R_i = (H_i + εI)^(-1/(2k))` is computed by `eigh` (all
same-size factors of the model in one batched call) and the direction is
`∇ ×_1 R_1 ×_2 … ×_k R_k`. Modes larger than `max_factor_dim` (and scalars) keep only the
diagonal of their statistic. With `block_size`, longer full modes are cut and every block
of a leaf is preconditioned on its own (`blocking`).

With `graft="rmsprop"` or `graft="adam"` each tensor's direction is rescaled to the norm of
that optimizer's step for the same tensor (layer-wise grafting), so that Shampoo supplies
the direction and the well-tuned first-order method the step size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import alias, linalg, validation
from secondorder_optax._src import tensor_modes as tm
from secondorder_optax._src.base import ScalarOrSchedule
from secondorder_optax._src.damping import relative as relative_damping
from secondorder_optax._src.periods import INVERSE_EVERY, STATS_EVERY, Period

Array = jax.Array
_GRAFTS = ("rmsprop", "adam")


@dataclasses.dataclass(frozen=True)
class Shampoo(tm.ModeAlgorithm):
  """Shampoo: per-mode inverse roots `(H_i + εI)^(-1/(2k))` of the gradient statistics."""

  name = "shampoo"

  def refresh(self, layout, statistics, previous, damping, data):
    exponent = jnp.asarray(2.0 * layout.order, jnp.float32)
    blocks = {str(i): (stat, relative_damping(damping, stat, order=layout.order), exponent)
              for i, stat in enumerate(statistics)}
    return blocks, lambda solved: tuple(solved[str(i)] for i in range(layout.order))

  def solve(self, block):
    factor, damping, exponent = block
    damping, exponent = damping.astype(factor.dtype), exponent.astype(factor.dtype)
    if factor.ndim == 1:
      return (jnp.maximum(factor, 0.0) + damping) ** (-1.0 / exponent)
    return linalg.inverse_root(factor, exponent, damping)


class GraftState(NamedTuple):
  """State of a grafted direction: the direction's and the grafted method's states.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> state = soo.scale_by_shampoo(graft="adam").init({"w": jnp.ones((3, 2))})
    >>> type(state.direction).__name__, type(state.graft).__name__
    ('PreconditionerState', 'ScaleByAdamState')
  """

  direction: Any
  graft: Any


def _graft_transformation(graft: Optional[str], decay: float, eps: float,
                          momentum: float) -> optax.GradientTransformation:
  if graft == "rmsprop":
    return optax.scale_by_rms(decay=decay, eps=eps, eps_in_sqrt=False, bias_correction=True)
  if graft == "adam":
    return optax.scale_by_adam(b1=momentum, b2=decay, eps=eps)
  raise ValueError(f"shampoo: graft must be None or one of {_GRAFTS}, got {graft!r}")


def _graft_norm(direction: Array, graft_step: Array) -> Array:
  """`direction` rescaled to the norm of `graft_step` (zero where the direction is zero)."""
  direction32 = direction.astype(jnp.float32)
  norm = jnp.linalg.norm(direction32)
  safe = jnp.where(norm > 0, norm, 1.0)
  scale = jnp.where(norm > 0, jnp.linalg.norm(graft_step.astype(jnp.float32)) / safe, 0.0)
  return (direction32 * scale).astype(direction.dtype)


def grafted(direction: optax.GradientTransformation,
          step: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Layer-wise grafting: each leaf of `direction`'s output rescaled to the norm of `step`'s
  output for the same leaf (`step`'s state is left as it is on non-finite updates)."""
  direction = optax.with_extra_args_support(direction)
  step = alias.keep_state_if_nonfinite(step)

  def init_fn(params):
    return GraftState(direction=direction.init(params), graft=step.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    directions, direction_state = direction.update(updates, state.direction, params,
                                                   **extra_args)
    steps, graft_state = step.update(updates, state.graft, params)
    out = jax.tree.map(_graft_norm, directions, steps)
    return out, GraftState(direction=direction_state, graft=graft_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_shampoo(
    *,
    damping: ScalarOrSchedule = 1e-3,
    stats_decay: Optional[ScalarOrSchedule] = 0.9,
    stats_every: Period = STATS_EVERY,
    inverse_every: Period = INVERSE_EVERY,
    max_factor_dim: int = 2048,
    block_size: Optional[int] = None,
    preconditioner_dtype: Any = None,
    graft: Optional[str] = None,
    graft_decay: float = 0.999,
    graft_eps: float = 1e-8,
    graft_momentum: float = 0.9,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions every parameter tensor by Shampoo's per-mode inverse roots.

  Works on any pytree from the gradients alone; a `curvature=` argument is accepted and
  ignored (Shampoo's statistics are those of the ordinary gradient).

  The arguments are those of `soo.shampoo` (all but the first four).

  Returns:
    An `optax.GradientTransformationExtraArgs` returning the preconditioned gradient with
    the gradient's sign.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> params = {"w": jnp.ones((3, 2)), "scale": jnp.ones(())}
    >>> tx = soo.scale_by_shampoo(damping=1e-4, graft="rmsprop")
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((3, 2), 0.5), "scale": jnp.ones(())}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape, int(state.direction.count)
    ((3, 2), 1)
  """
  preconditioner_dtype = validation.check_preconditioner_dtype("shampoo",
                                                               preconditioner_dtype)
  tx = tm.factor_transformation(
      Shampoo(preconditioner_dtype), damping=damping, stats_decay=stats_decay,
      stats_every=stats_every, inverse_every=inverse_every, max_factor_dim=max_factor_dim,
      block_size=block_size, summed_statistics=True)
  if graft is None:
    return tx
  return grafted(tx, _graft_transformation(graft, graft_decay, graft_eps, graft_momentum))


def shampoo(
    learning_rate: ScalarOrSchedule = 2e-2,
    *,
    damping: ScalarOrSchedule = 1e-3,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    kl_clip: Optional[float] = 0.3,
    stats_decay: Optional[ScalarOrSchedule] = 0.9,
    stats_every: Period = STATS_EVERY,
    inverse_every: Period = INVERSE_EVERY,
    max_factor_dim: int = 2048,
    block_size: Optional[int] = None,
    preconditioner_dtype: Any = None,
    graft: Optional[str] = "adam",
    graft_decay: float = 0.999,
    graft_eps: float = 1e-8,
    graft_momentum: float = 0.9,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo optimizer: Shampoo direction, decoupled weight decay, momentum, `-lr`.

  Args:
    learning_rate: a number or an optax schedule. With the default Adam grafting the step
      has Adam's per-layer size, so this is an Adam-scale rate. 2e-2, with `kl_clip` 0.3
      holding back the first steps: on the full MNIST autoencoder 75.8 after one epoch and
      61.9 after four (unclipped 96.2 and 68.0; unclipped at 1e-2 84.7 and 65.0); with
      inputs scaled by 1e4, 30 steps of a tiny MLP take the loss to 0.45× at 2e-2 and only
      to 0.57× at 1e-2 (`docs/defaults.md`).
    damping: relative damping λ: each statistic gets `H_i + γ m(H_i) I` before its root,
      `(1 + γ)^k = 1 + λ` over a leaf's `k` modes (`soo` DESIGN §6).
    momentum: `β` of the EMA of the preconditioned directions (`optax.ema(β, debias=True)`);
      `None` or 0 for none. Unlike the other methods' momentum it does not restart at the
      refreshes: with restarts the MNIST autoencoder ended 10 epochs at 73.1 instead of 63.9
      (`docs/defaults.md`).
    weight_decay: decoupled weight decay coefficient.
    kl_clip: `None` or κ > 0: shorten steps whose estimated change `η² ⟨Δ, g⟩` exceeds κ
      (`soo.clip_by_kl`; for Shampoo a trust region rather than a KL bound). 0.3 keeps
      Adam-scale steps of 2e-2 from stalling the deep autoencoder early (after one epoch:
      75.8 at 0.3, 79.0 at 0.1, 96.2 unclipped); on the digits MLP it does not bind
      (0.0203 after 50 steps at 0.1, 0.3 and 1).
    stats_decay: EMA weight of the old statistics (the first finite statistic
      initialises them); `None` sums the statistics over steps as in the original paper.
    stats_every: update the statistics at steps where `count % stats_every == 0` (an
      integer or a schedule `count -> period`; default `soo.growing_period(5)`).
    inverse_every: recompute the roots at steps where `count % inverse_every == 0`;
      default `soo.growing_period(50)`, frequent early and every 50 steps later
      (`docs/defaults.md`).
    max_factor_dim: modes larger than this keep a diagonal statistic (with `block_size`,
      only those whose blocks are larger: a mode of 4096 at `block_size=1024` is cut into
      four full blocks).
    block_size: `None`, or an integer >= 2: full modes longer than this are cut into
      `⌈d / block_size⌉` nearly equal segments, and each block of a leaf gets its own
      statistics and roots (block-diagonal Shampoo, as Distributed Shampoo). Cheaper
      steps and refreshes (a `(784, 1000)` kernel at 512: 2 × 2 blocks of `(392, 500)`,
      half the multiply-adds of its roots' product), at some loss per step; `soo.describe`
      shows the blocks.
    preconditioner_dtype: dtype in which the roots are stored and applied (default: the
      statistics' dtype, float32 at least); `jnp.bfloat16` halves their memory and, where
      bfloat16 multiplies faster (accelerators, CPUs with AVX512-BF16), the cost of
      applying them, with float32 sums and a float32 direction.
    graft: `None`, `"rmsprop"` or `"adam"`: rescale each tensor's direction to the norm of
      that method's step (bias-corrected, `eps` outside the square root).
    graft_decay: second-moment decay of the grafted method.
    graft_eps: its `eps`.
    graft_momentum: first-moment decay of the grafted Adam.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a `curvature=` argument is ignored).

  Example:
    >>> import jax, jax.numpy as jnp, optax, secondorder_optax as soo
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> loss = lambda p: jnp.sum((jnp.ones(3) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = soo.shampoo()
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 0.1)
    True
  """
  return alias.optimizer(scale_by_shampoo, restart_momentum=False, **locals())
