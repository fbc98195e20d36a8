"""KL clipping: the scale against its formula, schedules, non-finite steps, full optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo
from secondorder_optax._src import kl_clip as soo_kl_clip
from tests import models

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
GRADS = {"w": jnp.arange(6.0).reshape(3, 2) / 3, "b": jnp.array([1.0, -2.0])}


def _squared_norm(tree):
  return sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("kl_clip", [1e-3, 1e3])
def test_scale_matches_formula(kl_clip):
  lr = 0.1
  tx = soo.clip_by_kl(optax.scale(2.0), kl_clip=kl_clip, learning_rate=lr)
  direction, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  nu = min(1.0, np.sqrt(kl_clip / (lr ** 2 * 2.0 * _squared_norm(GRADS))))
  for got, g in zip(jax.tree.leaves(direction), jax.tree.leaves(GRADS)):
    np.testing.assert_allclose(got, nu * 2.0 * np.asarray(g), rtol=1e-6)
  if kl_clip < 1:  # clipped: the step's KL change, with F = I/2 (so F Δ = g), is κ.
    np.testing.assert_allclose(lr ** 2 * 0.5 * _squared_norm(direction), kl_clip, rtol=1e-5)


def test_ascent_pairing_is_left_alone_and_schedule_follows_finite_steps():
  tx = soo.clip_by_kl(optax.scale(-1.0), kl_clip=1e-9, learning_rate=lambda c: 0.1 * (c + 1))
  state = tx.init(PARAMS)
  direction, state = tx.update(GRADS, state, PARAMS)
  np.testing.assert_allclose(direction["w"], -GRADS["w"])
  assert int(state.count) == 1
  bad = jax.tree.map(lambda g: g * jnp.nan, GRADS)
  _, state = tx.update(bad, state, PARAMS)
  assert int(state.count) == 1, "a non-finite step must not advance the schedule"
  # Step 1 with a descent preconditioner reads the schedule at count 1 (lr 0.2).
  tx2 = soo.clip_by_kl(optax.identity(), kl_clip=1e-3, learning_rate=lambda c: 0.1 * (c + 1))
  _, s2 = tx2.update(GRADS, tx2.init(PARAMS), PARAMS)
  direction, _ = tx2.update(GRADS, s2, PARAMS)
  nu = np.sqrt(1e-3 / (0.2 ** 2 * _squared_norm(GRADS)))
  np.testing.assert_allclose(direction["w"], nu * GRADS["w"], rtol=1e-6)


def test_full_kfac_with_kl_clip_bounds_its_first_step_under_jit_and_inject():
  model, params, x, y, family = models.mlp_problem(batch=12, loss="softmax", seed=2)
  _, grads, curvature = jax.jit(soo.linen_curvature(model, family, fisher="empirical"))(
      params, x, y)
  lr, kl_clip = 1.0, 1e-4
  tx = optax.inject_hyperparams(soo.kfac, static_args=("stats_every", "inverse_every"))(
      learning_rate=lr, damping=1e-3, kl_clip=kl_clip)
  updates, state = jax.jit(lambda g, s, c: tx.update(g, s, params, curvature=c))(
      grads, tx.init(params), curvature)
  # First step: the debiased EMA of the directions is Δ itself, so updates = -lr ν Δ.
  plain = soo.kfac(lr, damping=1e-3, kl_clip=None)
  unclipped, _ = plain.update(grads, plain.init(params), params, curvature=curvature)
  ratio = [np.asarray(a) / np.asarray(b) for a, b in
           zip(jax.tree.leaves(updates), jax.tree.leaves(unclipped))]
  flat = np.concatenate([r.ravel() for r in ratio])
  nu = flat[0]
  np.testing.assert_allclose(flat, nu, rtol=1e-4)  # one common scale
  assert 0 < nu < 1
  pairing = -sum(float(jnp.vdot(u, g)) for u, g in
                 zip(jax.tree.leaves(unclipped), jax.tree.leaves(grads))) / lr  # <Δ, g>
  np.testing.assert_allclose(lr ** 2 * nu ** 2 * pairing, kl_clip, rtol=1e-4)
  assert "kernel" in str(soo.describe(soo.kfac(lr, damping=1e-3, kl_clip=kl_clip), params,
                                      print_fn=None))


def test_kl_clip_must_be_positive():
  with pytest.raises(ValueError, match="kl_clip must be positive"):
    soo.tnt(0.1, kl_clip=0.0)


def _exact_cap(per_example_grads, direction, lr):
  """Dense reference: `E d_n / (η E d_n²)`, `d_n = Σ_leaves ⟨∇l_n, Δ⟩` from vmapped
  per-example gradients (leaves with a leading batch axis, in `direction`'s order)."""
  leaves = jax.tree.leaves(per_example_grads)
  batch = leaves[0].shape[0]
  d = sum(np.asarray(g, np.float64).reshape(batch, -1) @ np.asarray(u, np.float64).ravel()
          for g, u in zip(leaves, jax.tree.leaves(direction)))
  return d.mean() / (lr * np.mean(d ** 2))


def _scan_problem():
  from tests.test_capture_linen import _scan_model  # pylint: disable=g-import-not-at-top
  model = _scan_model({"params": 0, "soo_inputs": 0, "soo_perturbations": 0})
  x = jax.random.normal(jax.random.key(0), (5, 4))
  y = jnp.array([0, 1, 1, 0, 1])
  params = model.init(jax.random.key(2), x)["params"]
  return model, params, x, y, soo.losses.softmax_cross_entropy


@pytest.mark.parametrize("problem", ["mlp", "cnn", "scan"])
@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_exact_model_cap_matches_per_example_gradients(problem, fisher):
  """The cap `E_n d_n / (η E_n d_n²)` from the capture equals the dense computation, for
  either capture (the sampled one takes `d_n` from the gradient's own pullback), and the
  clipped direction is scaled by it."""
  if problem == "scan":
    model, params, x, y, family = _scan_problem()
  else:
    make = models.mlp_problem if problem == "mlp" else models.cnn_problem
    model, params, x, y, family = make(seed=4)
  _, grads, curvature = jax.jit(soo.linen_curvature(model, family, fisher=fisher))(
      params, x, y, jax.random.key(3))
  assert curvature.one_categorical
  lr = 10.0
  expected = _exact_cap(models.per_example_grads(model, params, x, y, family), grads, lr)
  assert 0 < expected < 1
  got = soo_kl_clip.exact_model_cap_scale(grads, curvature, lr)
  np.testing.assert_allclose(float(got), expected, rtol=1e-4)
  tx = soo.clip_by_kl(optax.identity(), kl_clip=1e9, learning_rate=lr)
  direction, _ = jax.jit(lambda g, c: tx.update(g, tx.init(params), params, curvature=c))(
      grads, curvature)
  for d, g in zip(jax.tree.leaves(direction), jax.tree.leaves(grads)):
    np.testing.assert_allclose(d, expected * np.asarray(g), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["squared_error", "multi_output_sigmoid"])
def test_exact_model_cap_is_off_for_losses_over_many_outputs(loss):
  """Regression and a sigmoid over several outputs per example keep the KL estimate only."""
  model, params, x, y, family = models.mlp_problem(seed=4, loss="squared")
  if loss == "multi_output_sigmoid":
    family, y = soo.losses.sigmoid_binary_cross_entropy, (y > 0).astype(jnp.float32)
  _, grads, curvature = soo.linen_curvature(model, family, fisher="empirical")(params, x, y)
  assert not curvature.one_categorical
  assert np.isinf(float(soo_kl_clip.exact_model_cap_scale(grads, curvature, 10.0)))
  tx = soo.clip_by_kl(optax.identity(), kl_clip=1e9, learning_rate=10.0)
  direction, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  for d, g in zip(jax.tree.leaves(direction), jax.tree.leaves(grads)):
    np.testing.assert_allclose(d, g)


def test_exact_model_cap_can_be_turned_off_and_seng_runs_without_it():
  model, params, x, y, family = models.mlp_problem(seed=4)
  _, grads, curvature = soo.linen_curvature(model, family, fisher="empirical")(params, x, y)
  assert float(soo_kl_clip.exact_model_cap_scale(grads, curvature, 10.0)) < 1
  tx = soo.clip_by_kl(optax.identity(), kl_clip=1e9, learning_rate=10.0,
                      exact_model_cap=False)
  direction, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  for d, g in zip(jax.tree.leaves(direction), jax.tree.leaves(grads)):
    np.testing.assert_allclose(d, g)
  # SENG's full optimizer = build_optimizer(scale_by_seng, exact_model_cap=False).
  seng = soo.seng(10.0, batch_size=len(x), kl_clip=1e9, momentum=None)
  plain = soo.build_optimizer(soo.scale_by_seng(batch_size=len(x)), learning_rate=10.0,
                              momentum=None, kl_clip=1e9, exact_model_cap=False)
  got, _ = seng.update(grads, seng.init(params), params, curvature=curvature)
  want, _ = plain.update(grads, plain.init(params), params, curvature=curvature)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("kind", ["cnn", "shared", "scan"])
def test_exact_model_cap_for_nnx_models(kind):
  """NNX captures (a conv net, a layer called twice, `nnx.scan` with remat): the cap equals
  the dense computation over `nnx.State` directions."""
  from tests import nnx_models  # pylint: disable=g-import-not-at-top
  model, x, y, family = nnx_models.problem(kind, batch=8, seed=2)
  pex = nnx_models.per_example_grads(model, x, y, family)
  _, grads, curvature = soo.nnx_curvature(family)(model, x, y, jax.random.key(0))
  lr = 10.0
  expected = _exact_cap(pex, nnx_models.pure(grads), lr)
  assert 0 < expected < 1
  np.testing.assert_allclose(float(soo_kl_clip.exact_model_cap_scale(grads, curvature, lr)),
                             expected, rtol=1e-4)
