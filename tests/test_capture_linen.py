"""Linen capture: per-example statistics are exact (DESIGN §3-4, issue 2 acceptance)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import secondorder_optax as soo
from secondorder_optax._src import patches
from tests import models


def _check_exact(model, params, x, y, family, fisher, curv_fn=None, **apply):
  curv_fn = curv_fn or soo.linen_curvature(model, family, fisher=fisher)
  rng = jax.random.key(5)
  loss, grads, curvature = jax.jit(curv_fn)(params, x, y, rng)
  targets = models.fisher_targets(model, params, x, y, family, fisher, rng)
  pex = models.per_example_grads(model, params, x, targets, family)
  true_grads = jax.grad(lambda p: family.per_example_loss(
      model.apply({"params": p}, x), y).mean())(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(true_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert curvature.layers, "nothing captured"
  for path, stats in curvature.layers.items():
    d_n = np.asarray(patches.per_example_grads(stats))
    ref = models.layer_matrices(pex, path, stats.has_bias)
    assert models.relative_error(d_n, ref) < 1e-5, path
    # The mean of D_n is the gradient at the Fisher targets.
    fisher_grad = models.grad_matrix(curvature.fisher_grads, path, stats.has_bias)
    np.testing.assert_allclose(d_n.mean(0), fisher_grad, rtol=1e-4, atol=1e-6)
    if fisher == "empirical":
      np.testing.assert_allclose(d_n.mean(0), models.grad_matrix(grads, path, stats.has_bias),
                                 rtol=1e-4, atol=1e-6)
  return curvature


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
@pytest.mark.parametrize("problem", [models.mlp_problem, models.cnn_problem])
def test_per_example_grads_are_exact(problem, fisher):
  model, params, x, y, family = problem()
  curvature = _check_exact(model, params, x, y, family, fisher)
  kinds = {s.kind for s in curvature.layers.values()}
  assert kinds == ({"dense"} if problem is models.mlp_problem else {"dense", "conv"})


class ExoticConvs(nn.Module):
  """1-D convs with CAUSAL / REFLECT padding and input dilation, then a 3-D conv."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(3, (3,), padding="CAUSAL", kernel_dilation=2)(x)
    h = nn.tanh(h)
    h = nn.Conv(2, (2,), padding="REFLECT", strides=2)(h)
    h = nn.tanh(h)
    h = nn.Conv(2, (2,), padding=((1, 1),), input_dilation=2, strides=3)(h)
    h = nn.tanh(h)
    v = h[:, :, None, None, :] * jnp.ones((1, 1, 3, 2, 1))
    v = nn.Conv(2, (2, 2, 1), padding=1, strides=(1, 2, 1))(v)
    return nn.Dense(2)(v.reshape((v.shape[0], -1)))


def test_exotic_padding_and_3d_conv_are_exact():
  model = ExoticConvs()
  x = jax.random.normal(jax.random.key(0), (4, 9, 2))
  y = jax.random.normal(jax.random.key(1), (4, 2))
  params = model.init(jax.random.key(2), x)["params"]
  curvature = _check_exact(model, params, x, y, soo.losses.squared_error, "sampled")
  assert curvature.layers[("Conv_0",)].conv.pre_pad[0] == "constant"
  assert curvature.layers[("Conv_1",)].conv.pre_pad[0] == "reflect"


class SharedTwice(nn.Module):
  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(4)
    h = nn.tanh(shared(x))
    h = nn.tanh(shared(h))
    return nn.Dense(3)(h)


class Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.remat(nn.Dense)(4)(x)
    return nn.Dense(3)(nn.tanh(h))


@pytest.mark.parametrize("module", [SharedTwice, Remat])
def test_shared_module_and_remat(module):
  model = module()
  x = jax.random.normal(jax.random.key(0), (5, 4))
  y = jnp.array([0, 1, 2, 1, 0])
  params = model.init(jax.random.key(1), x)["params"]
  curvature = _check_exact(model, params, x, y, soo.losses.softmax_cross_entropy, "empirical")
  if module is SharedTwice:
    assert curvature.layers[("Dense_0",)].calls == 2
    assert curvature.layers[("Dense_0",)].inputs.shape == (5, 2, 4)


class Block(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return nn.tanh(nn.Dense(4)(carry)), None


def _scan_model(axes):
  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Block, variable_axes=axes, split_rngs={"params": True}, length=3)
      h, _ = stack()(x, None)
      return nn.Dense(2)(h)
  return Scanned()


def test_scan_with_collections_gives_stacked_exact_stats():
  model = _scan_model({"params": 0, "soo_inputs": 0, "soo_perturbations": 0})
  x = jax.random.normal(jax.random.key(0), (5, 4))
  y = jax.random.normal(jax.random.key(1), (5, 2))
  params = model.init(jax.random.key(2), x)["params"]
  family = soo.losses.squared_error
  _, _, curvature = soo.linen_curvature(model, family, fisher="empirical")(params, x, y)
  stacked = curvature.layers[("ScanBlock_0", "Dense_0")]
  assert stacked.stack_ndim == 1 and stacked.inputs.shape == (3, 5, 4)
  pex = models.per_example_grads(model, params, x, y, family)
  kernel_pex = pex["ScanBlock_0"]["Dense_0"]
  for i, member in enumerate(patches.unstack(stacked)):
    ref = jax.tree.map(lambda g: g[:, i], kernel_pex)
    ref = jax.vmap(lambda g: patches.params_to_matrix(g, True))(ref)
    assert models.relative_error(patches.per_example_grads(member), ref) < 1e-5


def test_scan_without_collections_names_the_layer():
  model = _scan_model({"params": 0})
  x = jax.random.normal(jax.random.key(0), (5, 4))
  params = model.init(jax.random.key(2), x)["params"]
  curv_fn = soo.linen_curvature(model, soo.losses.squared_error, fisher="empirical")
  with pytest.raises(Exception, match="ScanBlock_0/Dense_0|variable_axes"):
    curv_fn(params, x, jnp.zeros((5, 2)))


class BNDropout(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(6)(x)
    h = nn.BatchNorm(use_running_average=not train)(h)
    h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
    return nn.Dense(3)(h)


def test_batch_stats_and_dropout_pass_through():
  model = BNDropout()
  x = jax.random.normal(jax.random.key(0), (8, 4))
  y = jnp.arange(8) % 3
  variables = model.init(jax.random.key(1), x, train=False)
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  family = soo.losses.softmax_cross_entropy
  curv_fn = soo.linen_curvature(model, family, fisher="empirical", mutable=("batch_stats",))
  rngs = {"dropout": jax.random.key(3)}
  loss, grads, curvature, new_state = jax.jit(curv_fn, static_argnames="train")(
      params, x, y, model_state=state, rngs=rngs, train=True)

  def reference(p):
    out, upd = model.apply({"params": p, **state}, x, train=True, rngs=rngs,
                           mutable=["batch_stats"])
    return family.per_example_loss(out, y).mean(), upd
  (ref_loss, ref_state), ref_grads = jax.value_and_grad(reference, has_aux=True)(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert set(curvature.layers) == {("Dense_0",), ("Dense_1",)}


def test_sampled_fisher_matches_analytic_softmax_fisher():
  """Averaged sampled outer products -> E_x[(diag p - p pᵀ) ⊗ ā āᵀ] of a softmax regression."""
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (4, 2))
  y = jnp.zeros((4,), jnp.int32)
  params = model.init(jax.random.key(1), x)["params"]
  curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)

  def outer(rng):
    _, _, curvature = curv_fn(params, x, y, rng)
    (stats,) = curvature.layers.values()
    v = patches.per_example_grads(stats).reshape(4, -1)
    return v.T @ v / 4

  draws = jax.vmap(outer)(jax.random.split(jax.random.key(2), 4000))
  estimate = np.asarray(draws.mean(0))
  a_bar = np.concatenate([np.asarray(x), np.ones((4, 1))], axis=1)
  probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, x)))
  analytic = np.mean([np.kron(np.outer(a, a), np.diag(p) - np.outer(p, p))
                      for a, p in zip(a_bar, probs)], axis=0)
  stderr = np.asarray(draws.std(0)) / np.sqrt(draws.shape[0])
  assert np.all(np.abs(estimate - analytic) <= 5 * stderr + 1e-6)
  assert models.relative_error(estimate, analytic) < 0.05


def test_clear_errors():
  model, params, x, y, family = models.mlp_problem()
  curv_fn = soo.linen_curvature(model, family)
  with pytest.raises(ValueError, match="labels of shape"):
    curv_fn(params, x, jnp.zeros((x.shape[0], 3), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match="integer class indices"):
    curv_fn(params, x, y.astype(jnp.float32), jax.random.key(0))
  with pytest.raises(ValueError, match="rng"):
    curv_fn(params, x, y)
  with pytest.raises(ValueError, match="batch size"):
    curv_fn(params, x, y[:3], jax.random.key(0))
  with pytest.raises(ValueError, match="fisher must be"):
    soo.linen_curvature(model, family, fisher="true")
  with pytest.raises(TypeError, match="loss_family"):
    soo.linen_curvature(model, "softmax")

  class NoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param("w", nn.initializers.ones, (x.shape[-1],))
  no_layers = NoLayers()
  p = no_layers.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match="no capturable layer"):
    soo.linen_curvature(no_layers, soo.losses.squared_error)(p, x, x, jax.random.key(0))

  grouped = nn.Conv(4, (3,), feature_group_count=2)
  xc = jnp.ones((2, 5, 4))
  pg = grouped.init(jax.random.key(0), xc)["params"]
  with pytest.raises(ValueError, match="grouped convolution"):
    soo.linen_curvature(grouped, soo.losses.squared_error, skip_unsupported=False)(
        pg, xc, jnp.ones((2, 5, 4)), jax.random.key(0))
  with pytest.raises(ValueError, match="no capturable layer"):  # skipped by default
    soo.linen_curvature(grouped, soo.losses.squared_error)(pg, xc, jnp.ones((2, 5, 4)),
                                                          jax.random.key(0))
