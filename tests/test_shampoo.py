"""Shampoo: exact checks against dense Kronecker products of float64 inverse roots, and the
contract.

The reference unfolds each gradient tensor per mode (`X_(i) X_(i)ᵀ`), sums or
running-averages the statistics, takes `(H_i + εI)^(-1/(2k))` by float64 `eigh`, forms
`⊗_i R_i` as one dense matrix and applies it to the row-major `vec(∇)`.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo
from secondorder_optax._src.layerwise import leaf_paths
from tests import contract
from tests.test_tnt import (MAX_DIM, MIXED_MODES, TENSORS, assert_close, f64, kron_all,
                            mixed_problem, mode_statistics, random_tree, running_statistics,
                            train_without_curvature)

EPS = 0.1


def inverse_root(matrix, power, shift):
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * (np.maximum(values, 0.0) + shift) ** -power) @ vectors.T


def shampoo_direction(stats, grad):
  """`⊗_i (H_i + γ m(H_i) I)^(-1/(2k)) vec(∇)`, `(1 + γ)^k = 1 + ε` (relative damping)."""
  power = 1.0 / (2 * len(stats))
  gamma = (1.0 + EPS) ** (1.0 / len(stats)) - 1.0
  dense = kron_all([inverse_root(h, power, gamma * np.trace(h) / len(h)) for h in stats])
  return (dense @ np.ravel(grad)).reshape(np.shape(grad))


def summed_statistics(tensors, diagonal):
  per_step = [mode_statistics(t, diagonal) for t in tensors]
  return [sum(step[i] for step in per_step) for i in range(len(per_step[0]))]


def run(tx, grads):
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  for grad in grads:
    direction, state = update(grad, state)
  return direction, state


@pytest.mark.parametrize("stats_decay", [0.7, None], ids=["running-average", "summed"])
def test_direction_equals_dense_kronecker_roots_for_every_rank(stats_decay):
  grads = [random_tree(seed) for seed in range(3)]
  direction, state = run(soo.scale_by_shampoo(damping=EPS, stats_decay=stats_decay,
                                              inverse_every=1, max_factor_dim=MAX_DIM), grads)
  assert int(state.count) == 3 and int(state.failures) == 0
  for name, (shape, modes, diagonal) in TENSORS.items():
    history = [np.reshape(f64(g)[name], modes) for g in grads]
    if stats_decay is None:
      stats = summed_statistics(history, diagonal)
    else:
      stats = running_statistics(history, diagonal, stats_decay)
    assert direction[name].shape == shape
    assert_close(direction[name], shampoo_direction(stats, history[-1]).reshape(shape))


def test_blocked_direction_equals_dense_roots_per_block():
  """With `block_size=3` every full mode longer than 3 is cut into nearly equal segments
  (`np.array_split`), and each block gets the dense roots of its own statistics."""
  grads = [random_tree(seed) for seed in range(20, 23)]
  tx = soo.scale_by_shampoo(damping=EPS, stats_decay=0.7, inverse_every=1,
                            max_factor_dim=MAX_DIM, block_size=3)
  direction, state = run(tx, grads)
  assert int(state.failures) == 0
  for name, (shape, modes, diagonal) in TENSORS.items():
    # A mode above max_factor_dim whose blocks fit under it is cut, not diagonal ("wide").
    diagonal = diagonal if name == "scalar" else ()
    history = [np.reshape(f64(g)[name], modes) for g in grads]
    segments = [[np.arange(d)] if i in diagonal else np.array_split(np.arange(d), -(-d // 3))
                for i, d in enumerate(modes)]
    expected = np.zeros(modes)
    for block in itertools.product(*segments):
      index = np.ix_(*block)
      stats = running_statistics([h[index] for h in history], diagonal, 0.7)
      expected[index] = shampoo_direction(stats, history[-1][index])
    assert_close(direction[name], expected.reshape(shape))
  rules = soo.describe(tx, grads[0], print_fn=None)
  assert rules["matrix"] == "shampoo: 2 blocks (2×1) of modes (2, 3); modes (2, 3), full factors"
  assert rules["wide"].startswith("shampoo: 4 blocks (4×1) of modes (3, 3)")
  unblocked = soo.describe(soo.scale_by_shampoo(max_factor_dim=MAX_DIM, block_size=9),
                           grads[0], print_fn=None)  # blocks of 6 fit under 8
  assert unblocked["wide"].startswith("shampoo: 2 blocks (2×1) of modes (6, 3)")
  too_big = soo.describe(soo.scale_by_shampoo(max_factor_dim=5, block_size=9), grads[0],
                         print_fn=None)  # blocks of 6 > 5: diagonal, so not cut
  assert too_big["wide"] == "shampoo: modes (12, 3), diagonal: mode 0"
  assert rules["conv"].startswith("shampoo: 4 blocks (2×1×2) of modes (2, 3, 2)")
  with pytest.raises(ValueError, match="shampoo: block_size must be an integer >= 2"):
    soo.shampoo(block_size=1)


@pytest.mark.parametrize("graft", ["rmsprop", "adam"])
def test_grafting_takes_the_first_order_step_norm(graft):
  b1, b2, eps = 0.8, 0.9, 1e-3
  grads = [random_tree(seed) for seed in range(30, 33)]
  direction, state = run(soo.scale_by_shampoo(
      damping=EPS, stats_decay=0.7, inverse_every=1, max_factor_dim=MAX_DIM, graft=graft,
      graft_decay=b2, graft_eps=eps, graft_momentum=b1), grads)
  for name, (shape, modes, diagonal) in TENSORS.items():
    history = [f64(g)[name] for g in grads]
    stats = running_statistics([np.reshape(h, modes) for h in history], diagonal, 0.7)
    shampoo = shampoo_direction(stats, history[-1])
    steps = len(history)
    second = sum((1 - b2) * b2 ** (steps - 1 - t) * h ** 2 for t, h in enumerate(history))
    first = sum((1 - b1) * b1 ** (steps - 1 - t) * h for t, h in enumerate(history))
    numerator = history[-1] if graft == "rmsprop" else first / (1 - b1 ** steps)
    step = numerator / (np.sqrt(second / (1 - b2 ** steps)) + eps)
    expected = shampoo * np.linalg.norm(step) / np.linalg.norm(shampoo)
    assert_close(direction[name], expected.reshape(shape))


def test_mixed_pytree_without_curvature():
  params, loss_fn = mixed_problem()
  tx = soo.shampoo(0.02, damping=1e-3, max_factor_dim=16, graft="rmsprop")
  rules = soo.describe(tx, params, print_fn=None)
  assert rules["Embed_0/embedding"] == (
      "shampoo: modes (40, 6), diagonal: mode 0, grafted to rmsprop")
  assert rules["temperature"] == "shampoo: modes (1,), diagonal factors, grafted to rmsprop"
  assert set(rules) == set(MIXED_MODES)
  grads = jax.grad(loss_fn)(params)
  direction, _ = run(soo.scale_by_shampoo(damping=EPS, max_factor_dim=16), [grads])
  for path, grad in leaf_paths(f64(grads)).items():
    modes, diag = MIXED_MODES["/".join(path)]
    stats = mode_statistics(np.reshape(grad, modes), diag)
    expected = shampoo_direction(stats, np.reshape(grad, modes)).reshape(grad.shape)
    assert_close(leaf_paths(direction)[path], expected)
  losses, state = train_without_curvature(tx, loss_fn, params)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  is_graft = lambda s: isinstance(s, soo.GraftState)
  (graft_state,) = [s for s in jax.tree.leaves(state, is_leaf=is_graft) if is_graft(s)]
  shampoo_state = graft_state.direction
  assert int(shampoo_state.count) == 25 and int(shampoo_state.failures) == 0


def test_bad_input_and_nonfinite():
  with pytest.raises(ValueError, match="graft must be None or one of"):
    soo.scale_by_shampoo(graft="sgd")
  with pytest.raises(ValueError, match="shampoo: stats_every must be an integer >= 1"):
    soo.shampoo(0.1, stats_every=0)
  params = {"w": jnp.ones((3, 2))}
  tx = soo.scale_by_shampoo(damping=EPS, graft="adam")
  state = tx.init(params)
  with pytest.raises(ValueError, match="shampoo: v is not in the optimizer state"):
    tx.update({"v": jnp.ones((3, 2))}, state)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.arange(6.0).reshape(3, 2)}, state)
  _, after_bad = update({"w": jnp.full((3, 2), jnp.nan)}, state)
  for a, b in zip(jax.tree.leaves(after_bad), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


HPARAMS = dict(learning_rate=0.05, damping=1e-3)


def test_contract_jit_convergence():
  contract.check_jit_convergence(soo.shampoo, inverse_every=5, **HPARAMS)
  contract.check_jit_convergence(soo.shampoo, pass_curvature=False, stats_decay=None,
                                 **HPARAMS)


def test_contract_chain_inject_multisteps_bf16():
  contract.check_chain_and_inject(soo.scale_by_shampoo, soo.shampoo, **HPARAMS)
  contract.check_multisteps_and_nonfinite(soo.shampoo, graft="rmsprop", **HPARAMS)
  contract.check_bf16(soo.shampoo, **HPARAMS)


def test_inject_hyperparams_traces_refresh_periods():
  """Without static_args, injected refresh periods and graft settings are traced."""
  params = {"w": jnp.ones((3, 2)), "s": jnp.ones(())}
  tx = optax.inject_hyperparams(soo.shampoo)(learning_rate=0.1, inverse_every=1,
                                             graft="adam", kl_clip=None)
  state = tx.init(params)
  state.hyperparams["inverse_every"] = jnp.asarray(1, jnp.int32)  # not weakly typed
  step = jax.jit(tx.update)
  roots = lambda s: [np.asarray(x)
                     for x in jax.tree.leaves(s.inner_state[0].direction.preconditioner)]
  _, state = step({"w": jnp.arange(6.0).reshape(3, 2), "s": jnp.ones(())}, state, params)
  before = roots(state)
  state.hyperparams["inverse_every"] = jnp.asarray(1000, jnp.int32)
  _, state = step({"w": jnp.ones((3, 2)), "s": jnp.ones(())}, state, params)
  for a, b in zip(roots(state), before):
    np.testing.assert_array_equal(a, b)
  state.hyperparams["inverse_every"] = jnp.asarray(1, jnp.int32)
  state.hyperparams["graft_decay"] = jnp.asarray(0.5, jnp.float32)
  _, state = step({"w": jnp.ones((3, 2)), "s": jnp.ones(())}, state, params)
  assert any(not np.allclose(a, b) for a, b in zip(roots(state), before))
  assert step._cache_size() == 1
