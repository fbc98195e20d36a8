"""Exact tests of the KFAC family (KFAC, EKFAC, TKFAC, TEKFAC) and their optax contract.

Every direction is compared with a dense float64 solve of the method's approximate Fisher
block, built here from the layer inputs / output gradients (checked against per-example
gradients from `jax.vmap(jax.grad(...))`) and from those per-example gradients themselves.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo
from secondorder_optax._src import patches
from secondorder_optax._src.base import path_to_str
from tests import contract, models

DAMPING = 0.3  # relative: the damped block's mean eigenvalue is 1.3 times its own
METHODS = ("kfac", "ekfac", "tkfac", "tekfac")
PROBLEMS = ("mlp-squared", "mlp-softmax", "cnn-squared", "cnn-softmax")


# ---------------------------------------------------------------------------------------
# Dense reference matrices (float64), row-major vec of the (d_in [+1], d_out) matrix view,
# so vec(L X R) = (L ⊗ Rᵀ) vec(X).


def kronecker_factors(a, g):
  """KFC's A = E_n Σ_t ā ā ᵀ and G = E_n (1/T) Σ_t g gᵀ."""
  batch, locations = a.shape[:2]
  return (np.einsum("btd,bte->de", a, a) / batch,
          np.einsum("btd,bte->de", g, g) / (batch * locations))


def trace_restricted_factors(a, g):
  """(δ, Φ, Ψ): `δ = E_n ‖D_n‖²_F`, the trace of the exact block (per-example gradients
  `D_n = Σ_t ā gᵀ`, cross-location terms included), and unit-trace factors from
  per-location sums (DESIGN §5)."""
  a2 = np.sum(a * a, axis=-1)
  g2 = np.sum(g * g, axis=-1)
  delta = np.mean(np.sum(np.einsum("btd,bte->bde", a, g) ** 2, axis=(1, 2)))
  phi = np.einsum("bt,btd,bte->de", g2, a, a) / np.sum(a2 * g2)
  psi = np.einsum("bt,btd,bte->de", a2, g, g) / np.sum(a2 * g2)
  return delta, phi, psi


def relatively_damped(factor, gamma):
  """`F + γ m(F) I` with `m(F) = tr F / dim F` (the library's relative damping)."""
  return factor + gamma * np.trace(factor) / len(factor) * np.eye(len(factor))


def kfac_matrix(a, g, damping):
  """`(A + γ m(A) I) ⊗ (G + γ m(G) I)`, `(1 + γ)² = 1 + λ`: the damped block's mean eigenvalue
  is `(1 + λ)` times the undamped one's (the π-corrected factored damping)."""
  big_a, big_g = kronecker_factors(a, g)
  gamma = np.sqrt(1.0 + damping) - 1.0
  matrix = np.kron(relatively_damped(big_a, gamma), relatively_damped(big_g, gamma))
  mean = lambda m: np.trace(m) / len(m)
  assert np.isclose(mean(matrix), (1 + damping) * mean(np.kron(big_a, big_g)))
  return matrix


def tkfac_matrix(a, g, damping):
  delta, phi, psi = trace_restricted_factors(a, g)
  gamma = np.sqrt(1.0 + damping) - 1.0
  return np.kron(relatively_damped(np.sqrt(delta) * phi, gamma),
                 relatively_damped(np.sqrt(delta) * psi, gamma))


def check_eigenbasis(basis, factor):
  """`basis` is orthonormal and diagonalises `factor` (any basis of a degenerate eigenspace
  is as good as another, so the test checks the method's basis instead of choosing one)."""
  basis = np.asarray(basis, np.float64)
  np.testing.assert_allclose(basis.T @ basis, np.eye(len(basis)), atol=1e-5)
  rotated = basis.T @ factor @ basis
  off_diagonal = rotated - np.diag(np.diag(rotated))
  assert np.linalg.norm(off_diagonal) < 1e-5 * np.linalg.norm(factor)
  return basis


def eigen_corrected_matrix(q_in, q_out, per_example, damping):
  """`K diag(vec S + λ mean(S)) Kᵀ`, `K = Q_in ⊗ Q_out`, `S = E_n (Q_inᵀ D_n Q_out)²`; and S."""
  scalings = np.mean(np.einsum("di,bde,ej->bij", q_in, per_example, q_out) ** 2, axis=0)
  basis = np.kron(q_in, q_out)
  damped = scalings.reshape(-1) + damping * np.mean(scalings)
  return basis @ np.diag(damped) @ basis.T, scalings


def reference_matrix(method, layer, layer_state, damping):
  """The method's dense approximate block; checks the factors (and bases, scalings) too."""
  a, g = layer["a"], layer["g"]
  if method in ("kfac", "ekfac"):
    input_factor, output_factor = kronecker_factors(a, g)
  else:
    delta, phi, psi = trace_restricted_factors(a, g)
    input_factor, output_factor = delta * phi, delta * psi
  np.testing.assert_allclose(layer_state.input_factor, input_factor, rtol=1e-5,
                             atol=1e-6 * np.abs(input_factor).max())
  np.testing.assert_allclose(layer_state.output_factor, output_factor, rtol=1e-5,
                             atol=1e-6 * np.abs(output_factor).max())
  if method == "kfac":
    return kfac_matrix(a, g, damping)
  if method == "tkfac":
    return tkfac_matrix(a, g, damping)
  q_in = check_eigenbasis(layer_state.input_basis, input_factor)
  q_out = check_eigenbasis(layer_state.output_basis, output_factor)
  matrix, scalings = eigen_corrected_matrix(q_in, q_out, layer["per_example"], damping)
  assert models.relative_error(layer_state.scalings, scalings) < 1e-5
  return matrix


def _layer_state(state, key):
  """A layer's statistics and preconditioner fields in one namespace."""
  return type("LayerState", (), {**state.statistics[key]._asdict(),
                                 **state.preconditioner[key]._asdict()})


def dense_direction(matrix, grad):
  return np.linalg.solve(matrix, grad.reshape(-1)).reshape(grad.shape)


# ---------------------------------------------------------------------------------------
# Problems: exact per-layer data plus every method's direction and state at step 0.


def exact_layers(model, params, x, y, family, fisher, rng, curvature, grads):
  """Per layer: float64 inputs a (B,T,d_a), output grads g (B,T,d_g), per-example
  gradients D_n from vmap(grad) at the Fisher targets, and the mean gradient ∇."""
  targets = models.fisher_targets(model, params, x, y, family, fisher, rng)
  per_example_fn = jax.jit(lambda t: models.per_example_grads(model, params, x, t, family))
  pex = per_example_fn(targets)
  mean_grads = jax.tree.map(lambda p: p.mean(0), per_example_fn(y))
  layers = {}
  for path, stats in curvature.layers.items():
    a = np.asarray(patches.layer_inputs(stats), np.float64)
    g = np.asarray(patches.layer_output_grads(stats), np.float64)
    per_example = models.layer_matrices(pex, path, stats.has_bias)
    # The captured statistics reproduce the exact per-example gradients.
    assert models.relative_error(np.einsum("btd,bte->bde", a, g), per_example) < 1e-5
    grad = models.grad_matrix(grads, path, stats.has_bias)
    assert models.relative_error(grad, models.grad_matrix(mean_grads, path, stats.has_bias)) < 1e-5
    layers[path] = dict(a=a, g=g, per_example=per_example, grad=grad,
                        vectors=per_example.reshape(len(per_example), -1),
                        has_bias=stats.has_bias)
  return layers


def capture(model, family, fisher, params, x, y, rng):
  return jax.jit(soo.linen_curvature(model, family, fisher=fisher))(params, x, y, rng)


def scale_by(method, **kwargs):
  return getattr(soo, f"scale_by_{method}")(**kwargs)


@functools.lru_cache(maxsize=None)
def solved_problem(name):
  """Exact layers and, for every method, (direction, state) after one update."""
  model_name, loss = name.split("-")
  problem = models.mlp_problem if model_name == "mlp" else models.cnn_problem
  model, params, x, y, family = problem(loss=loss)
  fisher = "sampled" if loss == "squared" else "empirical"
  rng = jax.random.key(5)
  _, grads, curvature = capture(model, family, fisher, params, x, y, rng)
  txs = {m: scale_by(m, damping=DAMPING) for m in METHODS}

  @jax.jit
  def all_methods(grads, curvature):
    return {m: tx.update(grads, tx.init(params), params, curvature=curvature)
            for m, tx in txs.items()}

  results = all_methods(grads, curvature)
  layers = exact_layers(model, params, x, y, family, fisher, rng, curvature, grads)
  return layers, results, (model, params, grads, curvature)


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("method", METHODS)
def test_direction_is_dense_solve_of_approximation(method, problem):
  layers, results, _ = solved_problem(problem)
  direction, state = results[method]
  assert int(state.count) == 1 and int(state.failures) == 0
  for path, layer in layers.items():
    layer_state = _layer_state(state, path_to_str(path))
    expected = dense_direction(reference_matrix(method, layer, layer_state, DAMPING),
                               layer["grad"])
    got = models.grad_matrix(direction, path, layer["has_bias"])
    err = models.relative_error(got, expected)
    assert err < 2e-5, f"{method} {problem} layer {path}: relative error {err}"


@pytest.mark.parametrize("problem", ["mlp-squared", "cnn-softmax"])
def test_tkfac_trace_is_exact_block_trace(problem):
  layers, results, _ = solved_problem(problem)
  _, state = results["tkfac"]
  for path, layer in layers.items():
    if layer["a"].shape[1] != 1:
      continue  # conv layers: δ is the trace of the spatially uncorrelated (KFC) block.
    layer_state = _layer_state(state, path_to_str(path))
    delta = float(jnp.trace(layer_state.input_factor))
    phi = np.asarray(layer_state.input_factor, np.float64) / delta
    psi = np.asarray(layer_state.output_factor, np.float64) / delta
    np.testing.assert_allclose([np.trace(phi), np.trace(psi)], [1.0, 1.0], rtol=1e-5)
    exact_trace = np.trace(models.fisher_block(layer["vectors"]))
    np.testing.assert_allclose(delta * np.trace(np.kron(phi, psi)), exact_trace, rtol=1e-5)


def test_one_layer_undamped_ekfac_is_kfe_diagonal_fisher():
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (32, 4))
  y = jax.random.normal(jax.random.key(1), (32, 3))
  family = soo.losses.squared_error
  params = model.init(jax.random.key(2), x)["params"]
  rng = jax.random.key(3)
  _, grads, curvature = capture(model, family, "sampled", params, x, y, rng)
  tx = soo.scale_by_ekfac(damping=0.0)
  direction, _ = jax.jit(lambda g, c: tx.update(g, tx.init(params), params, curvature=c))(
      grads, curvature)

  targets = models.fisher_targets(model, params, x, y, family, "sampled", rng)
  pex = models.per_example_grads(model, params, x, targets, family)
  fisher = models.fisher_block(models.layer_vectors(pex, (), True))
  x_bar = np.concatenate([np.asarray(x, np.float64), np.ones((32, 1))], axis=1)
  g = np.asarray(curvature.layers[()].output_grads, np.float64)
  _, q_in = np.linalg.eigh(x_bar.T @ x_bar / 32)
  _, q_out = np.linalg.eigh(g.T @ g / 32)
  basis = np.kron(q_in, q_out)
  kfe_diagonal = basis @ np.diag(np.diag(basis.T @ fisher @ basis)) @ basis.T
  grad = models.grad_matrix(grads, (), True)
  expected = dense_direction(kfe_diagonal, grad)
  got = models.grad_matrix(direction, (), True)
  assert models.relative_error(got, expected) < 1e-4


# ---------------------------------------------------------------------------------------
# Schedules: running averages, stale refreshes, damping schedules.


def _two_batches():
  model, params, x, y, family = models.mlp_problem(batch=16, loss="squared", seed=1)
  curv_fn = soo.linen_curvature(model, family, fisher="empirical")
  first = curv_fn(params, x[:8], y[:8])
  second = curv_fn(params, x[8:], y[8:])
  views = [{path: (np.asarray(patches.layer_inputs(s), np.float64),
                   np.asarray(patches.layer_output_grads(s), np.float64))
            for path, s in c.layers.items()} for _, _, c in (first, second)]
  return params, (first, second), views


def _run_two_steps(tx, params, batches):
  step = jax.jit(lambda g, s, c: tx.update(g, s, params, curvature=c))
  state = tx.init(params)
  for _, grads, curvature in batches:
    direction, state = step(grads, state, curvature)
  return direction, state


def test_kfac_skipped_statistics_and_damping_schedule():
  """stats_every=2: step 1 keeps step 0's factors; its inverses use the scheduled λ."""
  params, batches, views = _two_batches()
  schedule = lambda count: 1e-2 * (1.0 + 3.0 * count)
  tx = soo.scale_by_kfac(damping=schedule, stats_every=2, inverse_every=1)
  direction, state = _run_two_steps(tx, params, batches)
  grads = batches[1][1]
  for path, (a, g) in views[0].items():
    has_bias = "bias" in patches.tree_get(params, path)
    expected = dense_direction(kfac_matrix(a, g, schedule(1)),
                               models.grad_matrix(grads, path, has_bias))
    got = models.grad_matrix(direction, path, has_bias)
    assert models.relative_error(got, expected) < 2e-5


def test_ekfac_running_averages_and_stale_basis():
  """inverse_every=2: step 1 averages A, G and S (S in step 0's eigenbasis)."""
  params, batches, views = _two_batches()
  decay = 0.8
  tx = soo.scale_by_ekfac(damping=DAMPING, stats_decay=decay, inverse_every=2)
  direction, state = _run_two_steps(tx, params, batches)
  grads = batches[1][1]
  for path, (a0, g0) in views[0].items():
    a1, g1 = views[1][path]
    layer_state = _layer_state(state, path_to_str(path))
    factors = [(np.einsum("btd,bte->de", a, a) / len(a), np.einsum("btd,bte->de", g, g) / len(g))
               for a, g in ((a0, g0), (a1, g1))]
    averaged_in = decay * factors[0][0] + (1 - decay) * factors[1][0]
    averaged_out = decay * factors[0][1] + (1 - decay) * factors[1][1]
    np.testing.assert_allclose(layer_state.input_factor, averaged_in, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer_state.output_factor, averaged_out, rtol=1e-5, atol=1e-6)
    _, q_in = np.linalg.eigh(factors[0][0])
    _, q_out = np.linalg.eigh(factors[0][1])
    scalings = [np.mean(np.einsum("di,bd,be,ej->bij", q_in, a[:, 0], g[:, 0], q_out) ** 2, 0)
                for a, g in ((a0, g0), (a1, g1))]
    averaged_scalings = decay * scalings[0] + (1 - decay) * scalings[1]
    basis = np.kron(q_in, q_out)
    damped = averaged_scalings.reshape(-1) + DAMPING * np.mean(averaged_scalings)
    matrix = basis @ np.diag(damped) @ basis.T
    has_bias = "bias" in patches.tree_get(params, path)
    expected = dense_direction(matrix, models.grad_matrix(grads, path, has_bias))
    got = models.grad_matrix(direction, path, has_bias)
    assert models.relative_error(got, expected) < 2e-5


# ---------------------------------------------------------------------------------------
# Failures, errors and describe.


def test_failed_inverse_keeps_previous_and_counts():
  """A factor that cannot be inverted keeps its previous inverse and counts a failure."""
  model, params, x, y, family = models.mlp_problem(batch=4, loss="squared")
  curv_fn = jax.jit(soo.linen_curvature(model, family, fisher="empirical"))
  # Step 0: damped. Step 1: undamped, and zero inputs make Dense_0's A exactly singular.
  tx = soo.scale_by_kfac(damping=lambda count: jnp.where(count == 0, 1e-2, 0.0),
                         stats_decay=0.0, inverse_every=1)
  step = jax.jit(lambda g, s, c: tx.update(g, s, params, curvature=c))
  _, grads, curvature = curv_fn(params, x, y)
  _, first = step(grads, tx.init(params), curvature)
  _, grads, curvature = curv_fn(params, jnp.zeros_like(x), y)
  direction, second = step(grads, first, curvature)
  assert int(first.failures) == 0 and int(second.failures) >= 1
  np.testing.assert_array_equal(second.preconditioner["Dense_0"].input_inverse,
                                first.preconditioner["Dense_0"].input_inverse)
  assert not np.allclose(second.statistics["Dense_0"].input_factor,
                         first.statistics["Dense_0"].input_factor)
  for leaf in jax.tree.leaves((direction, second)):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_bad_inputs_raise_clear_errors():
  for bad in (dict(damping=-1.0), dict(damping=1e-3, stats_every=0),
              dict(damping=1e-3, inverse_every=2.5), dict(damping=1e-3, stats_decay=1.0)):
    with pytest.raises(ValueError, match="tekfac"):
      soo.scale_by_tekfac(**bad)
  _, _, (model, params, grads, curvature) = solved_problem("mlp-softmax")
  # Curvature of another model (Dense_0 has 6 outputs there, 7 here).
  other_params = models.MLP(features=(7, 5, 3)).init(jax.random.key(0), jnp.ones((1, 4)))
  other_params = other_params["params"]
  tx = soo.scale_by_kfac(damping=1e-3)
  with pytest.raises(ValueError, match="kfac: curvature for layer Dense_0 has kernel shape"):
    tx.update(other_params, tx.init(other_params), other_params, curvature=curvature)


def test_describe_and_fallback():
  params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
            "scale": jnp.ones(3)}
  rules = soo.describe(soo.scale_by_tekfac(damping=1e-3, fallback=optax.scale_by_adam()),
                       params, print_fn=None)
  assert rules["Dense_0/kernel"].startswith("tekfac: trace-restricted")
  assert "5x5" in rules["Dense_0/bias"]
  assert rules["scale"] == "fallback (scale_by_adam)"
  # The full optimizer trains uncovered leaves with its own first-order optimizer.
  rules = soo.describe(soo.tekfac(fallback=optax.sgd(0.1, momentum=0.9)), params, print_fn=None)
  assert rules["scale"] == "fallback: momentum (its own learning rate)"
  assert soo.describe(soo.kfac(), params, print_fn=None)["scale"].startswith("fallback: adam")


# ---------------------------------------------------------------------------------------
# optax contract.


@pytest.mark.parametrize("method", METHODS)
def test_optax_contract(method):
  full, scale = getattr(soo, method), getattr(soo, f"scale_by_{method}")
  contract.check_jit_convergence(full, learning_rate=0.1)  # damping and kl_clip: defaults
  contract.check_chain_and_inject(scale, full, learning_rate=0.1, damping=1e-2)
  contract.check_multisteps_and_nonfinite(full, learning_rate=0.1, damping=1e-2)
  contract.check_bf16(full, learning_rate=0.1, damping=1e-2)
  contract.check_missing_curvature(full, method, learning_rate=0.1, damping=1e-2)
