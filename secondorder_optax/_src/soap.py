"""SOAP: Adam in Shampoo's eigenbasis (Vyas et al., ICLR 2025), DESIGN §5.

Every parameter tensor of rank 2 or more, with modes `(d_1, ..., d_k)` (see `tensor_modes`),
gets one statistic per mode, the running average `L_i` of `contract_all_but_i(G, G)` of the
gradient (Shampoo's statistics, decay `stats_decay`, the paper's `shampoo_beta`). At every
refresh (`count % inverse_every == 0`) each `L_i` gets a new orthonormal basis `Q_i`, its
columns ordered by decreasing eigenvalue: by `eigh` (`refresh="eigh"`), or by the paper's
one step of power iteration, `Q_i ← QR(L_i Q_i)` (`refresh="qr"`; the first refresh uses
`eigh`). Adam runs in the rotated coordinates, with its moments kept there:

    G' = G ×_1 Q_1ᵀ … ×_k Q_kᵀ
    M ← β1 M + (1 − β1) G',   V ← β2 V + (1 − β2) G'²
    direction = (M̂ / (√V̂ + ε)) ×_1 Q_1 … ×_k Q_k      (M̂, V̂ bias-corrected)

When a basis is refreshed the first moment is carried into it exactly
(`M ← M ×_i (Q_iᵀ_new Q_i,old)`), and the second moment, as in the official code, is only
re-ordered: its coordinates follow the old basis vectors sorted by their estimated
eigenvalues `diag(Q_iᵀ L_i Q_i)`. Modes larger than `max_factor_dim` stay unrotated (Adam
along them), and leaves of rank 0 or 1 get plain Adam.

SOAP only needs the gradient, so it works on any pytree; a `curvature=` argument is
accepted and ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from secondorder_optax._src import alias, engine, linalg, validation
from secondorder_optax._src import tensor_modes as tm
from secondorder_optax._src.base import ScalarOrSchedule

Array = jax.Array
_REFRESHES = ("eigh", "qr")
MIN_PARAMETER_SCALE = 1e-3  # `soap`'s floor under RMS(leaf): zero-initialised leaves move


class SoapPreconditioner(NamedTuple):
  """SOAP's preconditioner of one parameter leaf: the eigenbases and Adam's state in them.

  Attributes:
    bases: per mode, the orthonormal basis `Q_i` (`(d_i, d_i)`, columns by decreasing
      eigenvalue of the mode statistic), or `None` for a mode left unrotated.
    exp_avg: Adam's first moment in the rotated coordinates (shaped like the modes).
    exp_avg_sq: Adam's second moment in the rotated coordinates.
    first_debias: `1 − β1^t`, the total weight of the first moment (0 before any step).
    second_debias: `1 − β2^t`.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> state = soo.scale_by_soap().init({"w": jnp.ones((3, 2)), "b": jnp.ones(2)})
    >>> [None if q is None else q.shape for q in state.preconditioner["w"].bases]
    [(3, 3), (2, 2)]
    >>> state.preconditioner["b"].bases  # a vector gets plain Adam
    (None,)
  """

  bases: Tuple[Optional[Array], ...]
  exp_avg: Array
  exp_avg_sq: Array
  first_debias: Array
  second_debias: Array


def _mode_product(tensor: Array, matrix: Array, mode: int) -> Array:
  """`tensor ×_mode matrix`: `Σ_b matrix[a, b] tensor[…b…]` (`linalg.tensordot`'s dtypes)."""
  return jnp.moveaxis(linalg.tensordot(matrix, tensor, axes=(1, mode)), 0, mode).astype(
      tensor.dtype)


def rotate(tensor: Array, bases: Tuple[Optional[Array], ...]) -> Array:
  """`X ×_1 Q_1ᵀ … ×_k Q_kᵀ`: coordinates in the eigenbases (unrotated modes left as they
  are)."""
  for mode, basis in enumerate(bases):
    if basis is not None:
      # `Σ_a X[…a…] Q[a, b]` with the tensor on the left: XLA:CPU cannot run the bfloat16
      # product `Qᵀ X` whose result is then moved into place (UNIMPLEMENTED DotThunk).
      tensor = jnp.moveaxis(linalg.tensordot(tensor, basis, axes=(mode, 0)), -1,
                            mode).astype(tensor.dtype)
  return tensor


def rotate_back(tensor: Array, bases: Tuple[Optional[Array], ...]) -> Array:
  """`X ×_1 Q_1 … ×_k Q_k`: back from the eigenbases' coordinates."""
  for mode, basis in enumerate(bases):
    if basis is not None:
      tensor = _mode_product(tensor, basis, mode)
  return tensor


def _eigenbasis(statistic: Array) -> Array:
  """Eigenvectors of a symmetric statistic, by decreasing eigenvalue."""
  _, vectors = jnp.linalg.eigh(linalg.symmetrize(statistic))
  return vectors[:, ::-1]


@dataclasses.dataclass(frozen=True)
class Soap(tm.ModeAlgorithm):
  """SOAP: per-mode eigenbases of Shampoo's statistics, with Adam run in them (`step`)."""

  name = "soap"
  refresh_method: str = "eigh"

  def init_preconditioner(self, layout):
    dtype = linalg.refreshed_dtype(layout.dtype, self.preconditioner_dtype)
    zeros = lambda shape: jnp.zeros(shape, layout.dtype)  # distinct buffers (donation)
    return SoapPreconditioner(
        bases=tuple(None if diag else jnp.eye(d, dtype=dtype)
                    for d, diag in zip(layout.modes, layout.diagonal)),
        exp_avg=zeros(layout.modes), exp_avg_sq=zeros(layout.modes), first_debias=zeros(()),
        second_debias=zeros(()))

  def refresh(self, layout, statistics, previous, damping, data):
    rotated = [i for i, diag in enumerate(layout.diagonal) if not diag]
    blocks = {str(i): (statistics[i], previous.bases[i].astype(statistics[i].dtype))
              for i in rotated}

    def assemble(solved):
      bases = list(previous.bases)
      exp_avg, exp_avg_sq = previous.exp_avg, previous.exp_avg_sq
      for i in rotated:
        basis, order = solved[str(i)]
        if self.refresh_method == "qr":  # the paper starts the power iteration from eigh:
          first = previous.first_debias == 0  # no step taken in any basis yet
          basis = lax.cond(first, _eigenbasis, lambda _, b=basis: b, statistics[i])
        old = previous.bases[i].astype(basis.dtype)
        exp_avg = _mode_product(exp_avg, linalg.matmul(basis.T, old), i)
        exp_avg_sq = jnp.take(exp_avg_sq, order, axis=i)
        bases[i] = basis.astype(previous.bases[i].dtype)
      return previous._replace(bases=tuple(bases), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)

    return blocks, assemble

  def solve(self, block):
    """`(new basis, order)`: `order` sorts the old basis vectors by decreasing estimated
    eigenvalue `diag(Qᵀ L Q)`; the QR refresh is one power-iteration step from them."""
    statistic, old = block
    product = linalg.matmul(statistic, old)
    order = jnp.argsort(-jnp.sum(old * product, axis=0))
    if self.refresh_method == "qr":
      basis, _ = jnp.linalg.qr(product[:, order])
    else:
      basis = _eigenbasis(statistic)
    return basis, order

  def step(self, layout, preconditioner, grad, hyperparameters):
    b1, b2 = hyperparameters["b1"], hyperparameters["b2"]
    rotated = rotate(grad, preconditioner.bases)
    p = preconditioner
    return p._replace(
        exp_avg=(b1 * p.exp_avg + (1.0 - b1) * rotated).astype(p.exp_avg.dtype),
        exp_avg_sq=(b2 * p.exp_avg_sq + (1.0 - b2) * jnp.square(rotated)).astype(
            p.exp_avg_sq.dtype),
        first_debias=(b1 * p.first_debias + (1.0 - b1)).astype(p.first_debias.dtype),
        second_debias=(b2 * p.second_debias + (1.0 - b2)).astype(p.second_debias.dtype))

  def apply(self, layout, preconditioner, statistics, grad, damping):
    p = preconditioner
    first = p.exp_avg / p.first_debias
    second = p.exp_avg_sq / p.second_debias
    adam = first / (jnp.sqrt(second) + damping.astype(second.dtype))
    return rotate_back(adam, p.bases).astype(grad.dtype)

  def describe(self, layout):
    if all(layout.diagonal):
      return f"plain Adam, modes {layout.modes} unrotated"
    text = f"Adam in the eigenbasis of modes {layout.modes}"
    plain = [str(i) for i, diag in enumerate(layout.diagonal) if diag]
    if plain:
      text += f", unrotated: mode{'s' if len(plain) > 1 else ''} " + ", ".join(plain)
    return text


@dataclasses.dataclass(frozen=True)
class SoapCoverage(tm.LeafCoverage):
  """`tensor_modes.LeafCoverage` where leaves of rank 0 or 1 have no rotated mode (plain
  Adam, as the paper's default)."""

  def leaf_layout(self, leaf):
    limit = self.max_factor_dim if jnp.ndim(leaf) >= 2 else 0
    return tm.mode_layout(jnp.shape(leaf), limit, jnp.asarray(leaf).dtype)


def scale_by_soap(
    *,
    b1: ScalarOrSchedule = 0.95,
    b2: ScalarOrSchedule = 0.95,
    damping: ScalarOrSchedule = 1e-8,
    stats_decay: ScalarOrSchedule = 0.95,
    stats_every: int = 1,
    inverse_every: int = 10,
    max_factor_dim: int = 10000,
    refresh: str = "eigh",
    preconditioner_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """SOAP's direction: Adam in the eigenbases of Shampoo's per-mode statistics.

  The arguments are those of `soo.soap` (all but `learning_rate` and `weight_decay`).

  Returns:
    An `optax.GradientTransformationExtraArgs` returning the direction with the gradient's
    sign (a `curvature=` argument is ignored).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.scale_by_soap(refresh="qr")
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}, state)
    >>> updates["b"]  # plain Adam's first step on a vector: the gradient's sign
    Array([1., 1.], dtype=float32)
  """
  method = Soap.name
  if refresh not in _REFRESHES:
    raise ValueError(f"{method}: refresh must be one of {_REFRESHES}, got {refresh!r}")
  validation.check_schedule(method, damping=damping, stats_decay=stats_decay,
                            stats_every=stats_every, inverse_every=inverse_every)
  validation.check_unit_interval(method, "b1", b1)
  validation.check_unit_interval(method, "b2", b2)
  limit = validation.check_structural_int(method, "max_factor_dim", max_factor_dim)
  algorithm = Soap(validation.check_preconditioner_dtype(method, preconditioner_dtype),
                   refresh_method=refresh)
  return engine.transformation(
      algorithm, SoapCoverage(max_factor_dim=limit), damping=damping,
      stats_decay=stats_decay, stats_every=stats_every, inverse_every=inverse_every,
      step_hyperparameters={"b1": b1, "b2": b2})


def soap(
    learning_rate: ScalarOrSchedule = 0.1,
    *,
    multiply_by_parameter_scale: bool = True,
    b1: ScalarOrSchedule = 0.95,
    b2: ScalarOrSchedule = 0.95,
    damping: ScalarOrSchedule = 1e-8,
    weight_decay: float = 1e-3,
    stats_decay: ScalarOrSchedule = 0.95,
    stats_every: int = 1,
    inverse_every: int = 10,
    max_factor_dim: int = 10000,
    refresh: str = "eigh",
    preconditioner_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """SOAP optimizer: SOAP direction, times each leaf's scale, decoupled weight decay, `-lr`.

  Defaults are the paper's (Vyas et al., ICLR 2025, and its official code) but for the step
  size: by default the step of every leaf is relative to the leaf's size, as in
  `optax.adafactor` (`multiply_by_parameter_scale`): `-lr (max(1e-3, RMS(W)) Δ + wd W)`.
  An Adam-type direction moves every coordinate by about the learning rate, whatever the
  layer's width: a fixed rate that a 784×1000 kernel (RMS 0.036) tolerates (1e-2; at 2e-2
  the MNIST autoencoder blows up) is too slow for a small network (RMS 0.45: 30 steps of
  a 4-8-3 MLP only reach 0.58× the loss). Adam's first moment is the only momentum.

  Args:
    learning_rate: a number or an optax schedule. With `multiply_by_parameter_scale` a
      relative rate, 0.1 (a kernel of RMS 0.036 moves as with an absolute 3.6e-3): at equal
      steps against `optax.adam(1e-3)` it ends at 0.004× Adam's loss on a digits MLP,
      0.50× on a Fashion-MNIST CNN, 0.71× on the MNIST autoencoder, and halves a tiny MLP's
      loss in 30 steps at its inputs' scale and at 1e4 times it (`docs/defaults.md`, ninth
      round). Without it, an absolute (Adam-scale) rate: 1e-2 there (the paper's 3e-3 is
      tuned for language models).
    multiply_by_parameter_scale: scale each leaf's direction by `max(1e-3, RMS(leaf))`
      (`optax.scale_by_param_block_rms`); `False` for the paper's absolute step.
    b1: Adam's first-moment decay (the paper's betas[0]).
    b2: Adam's second-moment decay (betas[1]).
    damping: Adam's `ε`, added to `√V̂` (the paper's eps).
    weight_decay: decoupled weight decay coefficient, multiplied by the learning rate (not
      by the leaf's scale): 1e-3 at the rate 0.1 decays as 0.01 (the paper's) did at the
      former absolute rate 1e-2.
    stats_decay: EMA weight of the old mode statistics (the paper's shampoo_beta); the
      first finite statistic initialises them.
    stats_every: update the mode statistics at steps where `count % stats_every == 0`.
    inverse_every: refresh the eigenbases at steps where `count % inverse_every == 0` (the
      paper's precondition_frequency).
    max_factor_dim: modes larger than this stay unrotated (the paper's max_precond_dim).
    refresh: `"eigh"` (an eigendecomposition at every refresh) or `"qr"` (the paper's one
      power-iteration step and a QR decomposition, from an `eigh` at the first refresh).
    preconditioner_dtype: dtype in which the eigenbases are stored and applied (default:
      the statistics' dtype, float32 at least); `jnp.bfloat16` halves their memory and
      rotates with bfloat16 products summed in float32. Adam's moments stay float32.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a `curvature=` argument is ignored).

  Example:
    >>> import jax, jax.numpy as jnp, optax, secondorder_optax as soo
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> loss = lambda p: jnp.sum((jnp.ones(3) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = soo.soap(learning_rate=0.05)
    >>> state = tx.init(params)
    >>> for _ in range(50):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 0.1)
    True
  """
  relative = validation.check_flag(Soap.name, "multiply_by_parameter_scale",
                                   multiply_by_parameter_scale)
  direction = scale_by_soap(b1=b1, b2=b2, damping=damping, stats_decay=stats_decay,
                            stats_every=stats_every, inverse_every=inverse_every,
                            max_factor_dim=max_factor_dim, refresh=refresh,
                            preconditioner_dtype=preconditioner_dtype)
  if relative:
    direction = optax.chain(direction,
                            optax.scale_by_param_block_rms(min_scale=MIN_PARAMETER_SCALE))
  return alias.build_optimizer(direction, learning_rate=learning_rate, momentum=None,
                               weight_decay=weight_decay)
