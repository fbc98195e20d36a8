"""K-BFGS(L): exact checks against dense float64 computations, errors, and the optax contract.

The reference follows the paper's algorithm box in numpy: the running average of the input
factor, its exact damped inverse at refreshes and BFGS (Hessian-action) updates in between;
secant pairs of mean pre-activations and mean output gradients at the previous and the
current parameters on the same minibatch, double damped against the dense BFGS matrix of
the stored pairs (from `H₀ = (sᵀy / yᵀy) I` of the newest pair); the direction
`H_a ∇W̄ H_g` with `H_g` formed densely.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo
from secondorder_optax._src import quasi_newton as qn
from tests import contract, models

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------
# Dense references.


def dense_bfgs(h, s, y):
  rho = 1.0 / (s @ y)
  v = np.eye(len(s)) - rho * np.outer(s, y)
  return v @ h @ v.T + rho * np.outer(s, s)


def dense_lbfgs(pairs, h0, dim):
  """BFGS updates of `h0 I` by `pairs`, oldest first."""
  h = h0 * np.eye(dim)
  for s, y in pairs:
    h = dense_bfgs(h, s, y)
  return h


def dense_double_damping(s, y, h, mu2, mu1=0.2):
  hy = h @ y
  sy, yhy = s @ y, y @ hy
  theta = (1 - mu1) * yhy / (yhy - sy) if sy < mu1 * yhy else 1.0
  s = theta * s + (1 - theta) * hy
  return s, y + mu2 * s


def ring_pairs(preconditioner):
  """The filled pairs of a ring, oldest first, as float64 numpy."""
  s, y = (np.asarray(v, np.float64) for v in preconditioner.pairs)
  filled, memory = np.asarray(preconditioner.filled), len(s)
  oldest_first = (int(preconditioner.next_slot) + np.arange(memory)) % memory
  return [(s[i], y[i]) for i in oldest_first if filled[i]]


def problem():
  """The contract's tiny MLP (the same shapes, so eager work is shared with it)."""
  return models.mlp_problem(batch=32, d_in=4, classes=3, seed=3)


# ---------------------------------------------------------------------------------------
# quasi_newton.py


def test_bfgs_update_two_loop_ring_and_double_damping_are_dense():
  dim, memory = 5, 3
  h = np.linalg.inv(np.cov(RNG.normal(size=(dim, 20))) + np.eye(dim))
  s, y = RNG.normal(size=dim), RNG.normal(size=dim)
  y = y if s @ y > 0 else -y
  update = jax.jit(qn.bfgs_inverse_update)
  np.testing.assert_allclose(update(jnp.asarray(h, jnp.float32), s, y), dense_bfgs(h, s, y),
                             rtol=1e-4, atol=1e-5)
  # sᵀy ≤ 0 leaves H as it is.
  np.testing.assert_array_equal(update(jnp.asarray(h, jnp.float32), s, -y),
                                np.asarray(h, np.float32))

  # Five pushes into a ring of three, the third rejected: the ring wraps around and holds
  # the last three accepted pairs; the two-loop equals their dense BFGS matrix.
  @jax.jit
  def push(ring, vectors, s, y, accept):
    h0 = jnp.asarray(0.7)
    hv, hy = qn.two_loop(*ring, h0, vectors), qn.two_loop(*ring, h0, y)
    damped = qn.double_damping(s, y, hy, jnp.asarray(0.3))
    return hv, hy, damped, qn.push_pair(*ring, *damped, accept)

  ring = (jnp.zeros((memory, dim)), jnp.zeros((memory, dim)), jnp.zeros((memory,), bool),
          jnp.zeros((), jnp.int32))
  accepted = []
  for k in range(5):
    current = dense_lbfgs(accepted[-memory:], 0.7, dim)
    vectors, s, y = RNG.normal(size=(4, dim)), RNG.normal(size=dim), RNG.normal(size=dim)
    hv, hy, (ds, dy), ring = push(ring, jnp.asarray(vectors, jnp.float32),
                                  jnp.asarray(s, jnp.float32), jnp.asarray(y, jnp.float32),
                                  jnp.asarray(k != 2))
    np.testing.assert_allclose(hv, vectors @ current, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hy, current @ y, rtol=1e-4, atol=1e-5)
    ref_s, ref_y = dense_double_damping(s, y, current, 0.3)
    np.testing.assert_allclose(ds, ref_s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dy, ref_y, rtol=1e-4, atol=1e-5)
    assert float(ds @ dy) >= 0.2 * float(y @ hy) + 0.3 * float(ds @ ds) - 1e-4
    if k != 2:
      accepted.append((np.asarray(ds, np.float64), np.asarray(dy, np.float64)))
  assert int(ring[3]) == 1 and bool(jnp.all(ring[2]))


# ---------------------------------------------------------------------------------------
# The method against the paper's algorithm box, in float64.

DAMPING, DECAY, MEMORY, INVERSE_EVERY, STEPS, LR = 0.5, 0.7, 4, 3, 7, 0.3


def matrix(layer_params, has_bias):
  w = np.asarray(layer_params["kernel"], np.float64)
  if has_bias:
    w = np.concatenate([w, np.asarray(layer_params["bias"], np.float64)[None]], 0)
  return w


def homogeneous(stats):
  a = np.asarray(stats.inputs, np.float64)
  return np.concatenate([a, np.ones((a.shape[0], 1))], 1) if stats.has_bias else a


class Reference:
  """One layer of K-BFGS(L) from the formulas."""

  def __init__(self):
    self.factor = self.scale = None
    self.inverse, self.pairs = None, []

  def step(self, k, stats, previous_stats, weights, previous_weights, grad):
    a, g = homogeneous(stats), np.asarray(stats.output_grads, np.float64)
    batch_factor, batch_scale = a.T @ a / len(a), np.mean(np.square(g))
    first = self.factor is None
    self.factor = batch_factor if first else DECAY * self.factor + (1 - DECAY) * batch_factor
    self.scale = batch_scale if first else DECAY * self.scale + (1 - DECAY) * batch_scale
    gamma = np.sqrt(1 + DAMPING) - 1
    damped = self.factor + gamma * np.trace(self.factor) / len(self.factor) * np.eye(
        len(self.factor))
    if k % INVERSE_EVERY == 0:
      self.inverse = np.linalg.inv(damped)
      exact = self.inverse
    else:
      exact = None
    s_a = self.inverse @ a.mean(0)
    self.inverse = dense_bfgs(self.inverse, s_a, damped @ s_a)
    mu2 = gamma * self.scale
    # H₀ = (sᵀy / yᵀy) I of the newest pair; 1/((1 + γ) m_G) before the first.
    def h0():
      if not self.pairs:
        return 1 / ((1 + gamma) * self.scale)
      s, y = self.pairs[-1]
      return (s @ y) / (y @ y)

    if k > 0:
      a_prev = homogeneous(previous_stats)
      s = a.mean(0) @ weights - a_prev.mean(0) @ previous_weights
      y = g.mean(0) - np.asarray(previous_stats.output_grads, np.float64).mean(0)
      s, y = dense_double_damping(s, y, dense_lbfgs(self.pairs, h0(), len(s)), mu2)
      self.pairs = (self.pairs + [(s, y)])[-MEMORY:]
    direction = self.inverse @ grad @ dense_lbfgs(self.pairs, h0(), grad.shape[1])
    return direction, exact


def test_direction_inverses_and_pairs_equal_dense_algorithm():
  model, params, x0, _, family = problem()
  curv_fn = soo.linen_curvature(model, family, fisher="empirical")
  capture = jax.jit(lambda p, x, y: curv_fn(p, x, y, None))
  # Eager updates (the engine's step is compiled on its own, as for the contract's eager
  # checks of the same shapes).
  tx = soo.scale_by_kbfgs(damping=DAMPING, stats_decay=DECAY, inverse_every=INVERSE_EVERY,
                          memory=MEMORY)
  state, previous = tx.init(params), params
  references = {}
  for k in range(STEPS):
    x = RNG.normal(size=x0.shape).astype(np.float32)
    labels = RNG.integers(0, 3, size=x0.shape[0]).astype(np.int32)
    _, grads, curvature = capture(params, x, labels)
    direction, state = tx.update(grads, state, params, curvature=curvature,
                                 curvature_fn=lambda p: capture(p, x, labels))
    layers, previous_layers = curvature.layers, capture(previous, x, labels)[2].layers
    new_params = jax.tree.map(lambda p, d: p - LR * d, params, direction)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
      stats = layers[(name,)]
      has_bias = stats.has_bias
      ref_direction, exact = references.setdefault(name, Reference()).step(
          k, stats, previous_layers[(name,)], matrix(params[name], has_bias),
          matrix(previous[name], has_bias), matrix(grads[name], has_bias))
      np.testing.assert_allclose(matrix(direction[name], has_bias), ref_direction,
                                 rtol=2e-4, atol=2e-5)
      held = state.inner.preconditioner[name]
      np.testing.assert_allclose(held.input_inverse, references[name].inverse, rtol=2e-4,
                                 atol=2e-5)
      if exact is not None:  # a refresh: the exact damped inverse (BFGS keeps it)
        np.testing.assert_allclose(held.input_inverse, exact, rtol=2e-4, atol=2e-5)
      pairs = ring_pairs(held)
      assert len(pairs) == min(k, MEMORY)
      for (s, y), (ref_s, ref_y) in zip(pairs, references[name].pairs):
        np.testing.assert_allclose(s, ref_s, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(y, ref_y, rtol=2e-4, atol=2e-6)
    previous, params = params, new_params
  assert int(state.count) == STEPS and int(state.inner.failures) == 0


# ---------------------------------------------------------------------------------------
# Errors and describe.


def test_errors_and_describe():
  model, params, x, y, family = problem()
  empirical = jax.jit(soo.linen_curvature(model, family, fisher="empirical"))
  tx = soo.scale_by_kbfgs(memory=2)
  state = tx.init(params)
  _, grads, curvature = empirical(params, x, y, None)
  sampled = soo.Curvature(curvature.layers, curvature.fisher_grads, fisher="sampled")
  second = lambda p: empirical(p, x, y, None)
  with pytest.raises(ValueError, match="curvature_fn"):
    tx.update(grads, state, params, curvature=curvature)
  with pytest.raises(ValueError, match="curvature_fn must return"):
    tx.update(grads, state, params, curvature=curvature, curvature_fn=lambda p: 1.0)
  with pytest.raises(ValueError, match="params="):
    tx.update(grads, state, curvature=curvature, curvature_fn=second)
  with pytest.raises(ValueError, match="fisher='empirical'"):
    tx.update(grads, state, params, curvature=sampled, curvature_fn=second)
  with pytest.raises(ValueError, match="memory"):
    soo.kbfgs(memory=0)
  with pytest.raises(ValueError, match="damping"):
    soo.scale_by_kbfgs(damping=-1.0)
  rules = soo.describe(soo.kbfgs(memory=2), {"dense": params["Dense_0"],
                                             "scale": jnp.ones(3)}, print_fn=None)
  assert "K-BFGS(L)" in rules["dense/kernel"] and "adam" in rules["scale"]


# ---------------------------------------------------------------------------------------
# optax contract (empirical capture, second pass). The first check runs `soo.kbfgs()` at
# its defaults (memory 100): the small-problem convergence test at defaults.

CONTRACT = dict(capture_fisher="empirical", second_pass=True)


def test_contract_jit_convergence_at_defaults():
  losses = contract.check_jit_convergence(soo.kbfgs, **CONTRACT)
  assert losses[-1] < 0.3 * losses[0]


def test_contract_chain_inject_multisteps_nonfinite_bf16_missing():
  hparams = dict(memory=4, **CONTRACT)
  contract.check_chain_and_inject(soo.scale_by_kbfgs, soo.kbfgs, learning_rate=0.1,
                                  damping=1.0, **hparams)
  contract.check_multisteps_and_nonfinite(soo.kbfgs, **hparams)
  contract.check_bf16(soo.kbfgs, **hparams)
  contract.check_missing_curvature(soo.kbfgs, "kbfgs", **hparams)


def test_default_preconditions_dense_layers_only():
  """K-BFGS(L) is an MLP method: by default (`layers='dense'`) conv layers go to the Adam
  fallback (the conv extension diverged on a Fashion-MNIST CNN; docs/kbfgs.md); with
  `layers=None` they are preconditioned too. The default trains a conv net."""
  model, params, x, y, family = models.cnn_problem(batch=16)
  rules = soo.describe(soo.kbfgs(), params, print_fn=None)
  assert all(("adam" in rule) == path.startswith("Conv") for path, rule in rules.items())
  assert all("K-BFGS(L)" in rule
             for rule in soo.describe(soo.kbfgs(layers=None), params, print_fn=None).values())
  curv_fn = soo.linen_curvature(model, family, fisher="empirical")
  tx = soo.kbfgs()

  @jax.jit
  def step(params, state):
    loss, grads, curvature = curv_fn(params, x, y, None)
    updates, state = tx.update(grads, state, params, curvature=curvature,
                               curvature_fn=lambda p: curv_fn(p, x, y, None))
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  for _ in range(10):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
