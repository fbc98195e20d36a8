"""TNT: exact checks against dense Kronecker solves built here in float64, and the contract.

The reference builds every mode's statistic by unfolding the gradient tensor
(`X_(i) X_(i)ᵀ`), running-averages them, normalises them as in the paper
(`U_i = C_i · c · d_i / t`), forms `⊗_i (U_i + γ c I)` (relative damping: `(1 + γ)^k = 1 + ε`,
so the damped product's mean eigenvalue is `(1 + ε)` times `c^k`) as one dense matrix and
solves it against the row-major `vec(∇)`. Mode shapes are written out by hand per leaf.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo
from secondorder_optax._src.layerwise import leaf_paths
from tests import contract, models

EPS = 1.0  # relative damping (the default)
RTOL = 1e-5

# leaf -> (shape, modes, diagonal modes when max_factor_dim=MAX_DIM)
MAX_DIM = 8
TENSORS = {
    "vector": ((5,), (5,), ()),
    "matrix": ((4, 3), (4, 3), ()),
    "cube": ((3, 2, 4), (3, 2, 4), ()),
    "conv": ((2, 2, 3, 4), (4, 3, 4), ()),
    "wide": ((12, 3), (12, 3), (0,)),
    "scalar": ((), (1,), (0,)),
}


# ---------------------------------------------------------------------------------------
# Dense float64 reference.


def unfold(tensor, mode):
  return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def mode_statistics(tensor, diagonal):
  """`X_(i) X_(i)ᵀ` per mode, reduced to its diagonal for the diagonal modes."""
  stats = []
  for i in range(tensor.ndim):
    stat = unfold(tensor, i) @ unfold(tensor, i).T
    stats.append(np.diag(np.diag(stat)) if i in diagonal else stat)
  return stats


def running_statistics(tensors, diagonal, decay):
  """EMA of the per-mode statistics of a sequence of tensors (first one taken as is)."""
  stats = mode_statistics(tensors[0], diagonal)
  for tensor in tensors[1:]:
    stats = [decay * s + (1 - decay) * n for s, n in zip(stats, mode_statistics(tensor, diagonal))]
  return stats


def kron_all(matrices):
  return functools.reduce(np.kron, matrices)


def tnt_factors(stats):
  """`U_i = C_i · c · d_i / t`, `t = tr C_1`, `c = (t / d)^(1/k)`."""
  dims = [len(s) for s in stats]
  total = np.trace(stats[0])
  shared = (total / np.prod(dims)) ** (1.0 / len(dims))
  return [s * shared * d / total for s, d in zip(stats, dims)]


def relative_shift(eps, order, factor):
  """`γ m(U)` with `(1 + γ)^order = 1 + ε` and `m(U) = tr U / dim U`."""
  return ((1.0 + eps) ** (1.0 / order) - 1.0) * np.trace(factor) / len(factor)


def tnt_direction(stat_tensors, grad, modes, diagonal, decay, eps=EPS):
  """`(⊗_i (U_i + γ c I))⁻¹ vec(∇)` for statistics from `stat_tensors` (each in `modes`)."""
  stats = running_statistics([np.reshape(t, modes) for t in stat_tensors], diagonal, decay)
  factors = tnt_factors(stats)
  dense = kron_all([u + relative_shift(eps, len(factors), u) * np.eye(len(u)) for u in factors])
  return np.linalg.solve(dense, np.ravel(grad)).reshape(np.shape(grad))


def random_tree(seed, scale=1.0):
  keys = jax.random.split(jax.random.key(seed), len(TENSORS))
  return {name: scale * jax.random.normal(k, shape)
          for k, (name, (shape, _, _)) in zip(keys, TENSORS.items())}


def f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def assert_close(actual, expected, rtol=RTOL):
  err = models.relative_error(actual, expected)
  assert err < rtol, f"relative error {err:.2e}"


# ---------------------------------------------------------------------------------------
# Exact tests.


def test_direction_equals_dense_kronecker_solve_for_every_rank():
  """1-D..4-D tensors, a diagonal mode and a scalar; EMA over three steps."""
  tx = soo.scale_by_tnt(damping=EPS, stats_decay=0.7, inverse_every=1, max_factor_dim=MAX_DIM)
  grads = [random_tree(seed) for seed in range(3)]
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  for grad in grads:
    direction, state = update(grad, state)
  assert int(state.count) == 3 and int(state.failures) == 0
  for name, (shape, modes, diagonal) in TENSORS.items():
    history = [f64(g)[name] for g in grads]
    expected = tnt_direction(history, history[-1], modes, diagonal, decay=0.7)
    assert direction[name].shape == shape
    assert_close(direction[name], expected)
    assert [s.shape for s in state.statistics[name]] == [
        (d,) if i in diagonal else (d, d) for i, d in enumerate(modes)]


def test_normalised_factors_keep_the_trace_of_the_statistic():
  """From the stored inverses, `U_i = P_i⁻¹ - γcI`: `tr(⊗U_i) = tr C_1 = |G|²` (first step)."""
  tx = soo.scale_by_tnt(damping=EPS, max_factor_dim=MAX_DIM)
  grad = random_tree(5, scale=3.0)
  _, state = jax.jit(tx.update)(grad, tx.init(grad))
  for name, (_, modes, diagonal) in TENSORS.items():
    squared_norm = np.sum(np.square(np.asarray(grad[name], np.float64)))
    # all factors share the average eigenvalue c = (t/d)^(1/k)
    shared = (squared_norm / np.prod(modes)) ** (1 / len(modes))
    shift = ((1.0 + EPS) ** (1.0 / len(modes)) - 1.0) * shared
    factors = []
    for i, inverse in enumerate(state.preconditioner[name]):
      inverse = np.asarray(inverse, np.float64)
      inverse = np.diag(inverse) if i in diagonal else inverse
      factors.append(np.linalg.inv(inverse) - shift * np.eye(modes[i]))
    assert_close(np.trace(kron_all(factors)), squared_norm, rtol=1e-4)
    for factor, dim in zip(factors, modes):
      assert_close(np.trace(factor), shared * dim, rtol=1e-4)


def test_refresh_schedule():
  """Statistics at counts 0, 2 (stats_every=2), inverses at 0, 3 (inverse_every=3)."""
  tx = soo.scale_by_tnt(damping=EPS, stats_decay=0.5, stats_every=2, inverse_every=3,
                        max_factor_dim=MAX_DIM)
  grads = [random_tree(seed) for seed in range(10, 14)]
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  directions = []
  for grad in grads:
    direction, state = update(grad, state)
    directions.append(direction)
  name, (_, modes, diagonal) = "cube", TENSORS["cube"]
  history = [f64(g)[name] for g in grads]
  for step, stats_seen in ((1, [0]), (2, [0]), (3, [0, 2])):
    expected = tnt_direction([history[i] for i in stats_seen], history[step], modes, diagonal,
                             decay=0.5)
    assert_close(directions[step][name], expected)


def test_sampled_targets_use_fisher_grads_and_plain_path_the_gradient():
  """MLP: fisher_grads is the mean per-example gradient at sampled targets; TNT uses it,
  scaled to the per-example Fisher (its Gram times the batch size N)."""
  model, params, x, y, family = models.mlp_problem(batch=16, seed=1)
  curv_fn = soo.linen_curvature(model, family, fisher="sampled")
  rng = jax.random.key(3)
  _, grads, curvature = jax.jit(curv_fn)(params, x, y, rng)
  sampled = models.fisher_targets(model, params, x, y, family, "sampled", rng)
  fisher_grads = jax.tree.map(lambda g: np.mean(np.asarray(g, np.float64), axis=0),
                              models.per_example_grads(model, params, x, sampled, family))
  plain_grads = jax.tree.map(lambda g: np.mean(np.asarray(g, np.float64), axis=0),
                             models.per_example_grads(model, params, x, y, family))
  tx = soo.scale_by_tnt(damping=EPS)
  state = tx.init(params)
  update = jax.jit(tx.update)
  with_curvature, _ = update(grads, state, params, curvature=curvature)
  without_curvature, _ = update(grads, state, params)
  for path, grad in leaf_paths(plain_grads).items():
    fisher = leaf_paths(fisher_grads)[path]
    modes = tuple(d for d in grad.shape if d != 1)
    leaf = lambda tree: leaf_paths(tree)[path]
    assert_close(leaf(grads), grad)
    per_example_scale = np.sqrt(x.shape[0]) * fisher
    assert_close(leaf(with_curvature),
                 tnt_direction([per_example_scale], grad, modes, (), decay=0.9))
    assert_close(leaf(without_curvature), tnt_direction([grad], grad, modes, (), decay=0.9))
  assert models.relative_error(with_curvature["Dense_0"]["kernel"],
                               without_curvature["Dense_0"]["kernel"]) > 1e-2


def test_full_optimizer_averages_preconditioned_gradients():
  """tnt(): each gradient preconditioned (factors from the raw gradients), weight decay
  added, then the bias-corrected average of the directions since the last refresh, times
  `-lr`: with a refresh every step the average restarts every step (`restarting_ema`), so
  the second update is the second direction alone; `optax.ema` would average both."""
  lr, beta, decay, wd = 0.3, 0.9, 0.6, 0.01
  tx = soo.tnt(lr, damping=EPS, momentum=beta, stats_decay=decay, weight_decay=wd,
               inverse_every=1, max_factor_dim=MAX_DIM, kl_clip=None)
  params = random_tree(20)
  grads = [random_tree(21), random_tree(22)]
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(grads[0], state, params)
  updates, state = update(grads[1], state, params)
  for name, (_, modes, diagonal) in TENSORS.items():
    history = [f64(g)[name] for g in grads]
    decayed = wd * np.asarray(params[name], np.float64)
    first = tnt_direction(history[:1], history[0], modes, diagonal, decay=decay) + decayed
    second = tnt_direction(history, history[1], modes, diagonal, decay=decay) + decayed
    plain_average = (beta * (1 - beta) * first + (1 - beta) * second) / (1 - beta ** 2)
    assert_close(updates[name], -lr * second)
    assert np.max(np.abs(plain_average - second)) > 1e-3 * np.max(np.abs(second))


# ---------------------------------------------------------------------------------------
# Any pytree, no curvature.


class _MixedModel(nn.Module):
  """Embedding -> conv -> dense -> learned scalar temperature."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(40, 6)(tokens)
    x = nn.tanh(nn.Conv(4, (3, 3))(x))
    x = nn.Dense(3, use_bias=False)(jnp.mean(x, axis=(1, 2)))
    return x * self.param("temperature", nn.initializers.ones, ())


def mixed_problem():
  model = _MixedModel()
  tokens = jax.random.randint(jax.random.key(0), (32, 4, 4), 0, 40)
  labels = jnp.argmax(jax.random.normal(jax.random.key(1), (40, 3))[tokens].sum((1, 2)), -1)
  params = model.init(jax.random.key(2), tokens)["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, tokens)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  return params, loss_fn


MIXED_MODES = {  # max_factor_dim=16: the 40-row embedding is diagonal in its vocab mode
    "Embed_0/embedding": ((40, 6), (0,)),
    "Conv_0/kernel": ((9, 6, 4), ()),
    "Conv_0/bias": ((4,), ()),
    "Dense_0/kernel": ((4, 3), ()),
    "temperature": ((1,), (0,)),
}


def train_without_curvature(tx, loss_fn, params, steps=25):
  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses, state


def test_mixed_pytree_without_curvature():
  params, loss_fn = mixed_problem()
  # Without curvature the statistics are the rank-one minibatch gradients: that mode needs
  # a larger damping than the default (documented in soo.tnt; at 1 this problem does not train).
  tx = soo.tnt(damping=10.0, max_factor_dim=16)
  rules = soo.describe(tx, params, print_fn=None)
  assert rules == {key: f"tnt: modes {modes}, " + (
      "full factors" if not diag else
      "diagonal factors" if len(diag) == len(modes) else "diagonal: mode 0")
                   for key, (modes, diag) in MIXED_MODES.items()}
  # Exact first direction on every leaf.
  grads = jax.grad(loss_fn)(params)
  direction, _ = jax.jit(soo.scale_by_tnt(damping=EPS, max_factor_dim=16).update)(
      grads, soo.scale_by_tnt(max_factor_dim=16).init(params))
  for path, grad in leaf_paths(f64(grads)).items():
    modes, diag = MIXED_MODES["/".join(path)]
    actual = leaf_paths(direction)[path]
    assert_close(actual, tnt_direction([grad], grad, modes, diag, decay=0.9))
  losses, state = train_without_curvature(tx, loss_fn, params)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  is_tnt = lambda s: isinstance(s, soo.PreconditionerState)
  (tnt_state,) = [s for s in jax.tree.leaves(state, is_leaf=is_tnt) if is_tnt(s)]
  assert int(tnt_state.count) == 25 and int(tnt_state.failures) == 0


# ---------------------------------------------------------------------------------------
# Bad input and non-finite values.


def test_bad_input_errors():
  params = random_tree(0)
  tx = soo.scale_by_tnt()
  state = tx.init(params)
  with pytest.raises(ValueError, match="curvature= must be a soo.Curvature"):
    tx.update(params, state, params, curvature={"fisher_grads": params})
  wrong = soo.Curvature(layers={}, fisher_grads={"other": jnp.ones(3)})
  with pytest.raises(ValueError, match="fisher_grads must have the leaves of the updates"):
    tx.update(params, state, params, curvature=wrong)
  with pytest.raises(ValueError, match="tnt: other is not in the optimizer state"):
    tx.update({"other": jnp.ones(3)}, state)
  with pytest.raises(ValueError, match="tnt: inverse_every must be an integer >= 1"):
    soo.scale_by_tnt(inverse_every=0)
  with pytest.raises(ValueError, match="tnt: max_factor_dim must be an integer >= 1"):
    soo.scale_by_tnt(max_factor_dim=0)


def test_nonfinite_gradient_and_failed_inverse_keep_state():
  params = {"w": jnp.ones((3, 2))}
  tx = soo.scale_by_tnt(damping=EPS)
  state = tx.init(params)
  update = jax.jit(tx.update)
  good = {"w": jnp.arange(6.0).reshape(3, 2)}
  _, state = update(good, state)
  bad = {"w": good["w"].at[0, 0].set(jnp.inf)}
  _, after_bad = update(bad, state)
  for a, b in zip(jax.tree.leaves(after_bad), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A (scheduled) negative damping fails the refresh: the previous inverses are kept and the
  # leaf counts one failure.
  failing = soo.scale_by_tnt(damping=lambda count: -1e3, inverse_every=1)
  _, failed = jax.jit(failing.update)(good, state)
  assert int(failed.failures) == 1
  for a, b in zip(jax.tree.leaves(failed.preconditioner), jax.tree.leaves(state.preconditioner)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------
# optax contract (with curvature, and without).

HPARAMS = dict(learning_rate=0.1, damping=EPS)


def test_contract_jit_convergence():
  contract.check_jit_convergence(soo.tnt, inverse_every=5, **HPARAMS)
  contract.check_jit_convergence(soo.tnt, pass_curvature=False, **HPARAMS)


def test_contract_chain_inject_multisteps_bf16():
  contract.check_chain_and_inject(soo.scale_by_tnt, soo.tnt, **HPARAMS)
  contract.check_multisteps_and_nonfinite(soo.tnt, **HPARAMS)
  contract.check_bf16(soo.tnt, **HPARAMS)


def test_inject_hyperparams_traces_refresh_periods():
  """Without static_args, injected refresh periods are traced and still act, no recompiles."""
  params = {"w": jnp.ones((3, 2)), "s": jnp.ones(())}
  tx = optax.inject_hyperparams(soo.tnt)(learning_rate=0.1, inverse_every=1)
  state = tx.init(params)
  assert state.hyperparams["inverse_every"].dtype == jnp.int32
  state.hyperparams["inverse_every"] = jnp.asarray(1, jnp.int32)  # not weakly typed
  step = jax.jit(tx.update)
  inverses = lambda s: [np.asarray(x)
                        for x in jax.tree.leaves(s.inner_state[0].inner.preconditioner)]
  _, state = step({"w": jnp.arange(6.0).reshape(3, 2), "s": jnp.ones(())}, state, params)
  before = inverses(state)
  state.hyperparams["inverse_every"] = jnp.asarray(1000, jnp.int32)
  _, state = step({"w": jnp.ones((3, 2)), "s": jnp.ones(())}, state, params)
  for a, b in zip(inverses(state), before):
    np.testing.assert_array_equal(a, b)
  state.hyperparams["inverse_every"] = jnp.asarray(1, jnp.int32)
  _, state = step({"w": jnp.ones((3, 2)), "s": jnp.ones(())}, state, params)
  assert any(not np.allclose(a, b) for a, b in zip(inverses(state), before))
  assert step._cache_size() == 1
