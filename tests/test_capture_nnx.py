"""`soo.nnx_curvature`: exact per-example statistics for NNX models, and NNX usability of the
layer-wise transformations (`nnx.Optimizer`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import secondorder_optax as soo
from secondorder_optax._src import engine, layerwise, patches
from secondorder_optax._src.capture import nnx as nnx_capture
from secondorder_optax._src.capture.common import UnsupportedLayerError
from tests import models, nnx_models

TOL = 1e-5


def _layer_paths(model):
  return {tuple(p) for p, m in nnx.iter_modules(model) if isinstance(m, (nnx.Linear, nnx.Conv))}


def _member(tree, path, stats, i, stack_axis):
  """The leaves of member i of a (possibly stacked) layer, as `{"n": {"kernel", "bias"}}`."""
  node = patches.tree_get(tree, path)
  if stats.stack_ndim:
    node = jax.tree.map(lambda a: jnp.take(a, i, axis=stack_axis), node)
  return {"n": node}


def check_exact(model, x, y, family, fisher, rng, loss, grads, curvature):
  """Every captured layer: D_n equals vmap(grad)'s per-example gradient at the Fisher targets,
  mean_n D_n equals fisher_grads, and loss/grads are those of the given targets."""
  targets = nnx_models.fisher_targets(model, x, y, family, fisher, rng)
  pex_fisher = nnx_models.per_example_grads(model, x, targets, family)
  pex_true = nnx_models.per_example_grads(model, x, y, family)
  grads, fisher_grads = nnx_models.pure(grads), nnx_models.pure(curvature.fisher_grads)
  apply, params = nnx_models.forward_fn(model)
  np.testing.assert_allclose(loss, family.per_example_loss(apply(params, x), y).mean(),
                             rtol=TOL)
  assert set(curvature.layers) == _layer_paths(model)
  for path, stats in curvature.layers.items():
    members = patches.unstack(stats)
    assert len(members) == int(np.prod(stats.inputs.shape[:stats.stack_ndim]))
    for i, member in enumerate(members):
      bias = stats.has_bias
      d = np.asarray(patches.per_example_grads(member), np.float64)
      ref_d = models.layer_matrices(_member(pex_fisher, path, stats, i, 1), ("n",), bias)
      assert models.relative_error(d, ref_d) < TOL, (path, i)
      fg = models.grad_matrix(_member(fisher_grads, path, stats, i, 0), ("n",), bias)
      assert models.relative_error(d.mean(0), fg) < TOL, (path, i)
      g = models.grad_matrix(_member(grads, path, stats, i, 0), ("n",), bias)
      ref_g = models.layer_matrices(_member(pex_true, path, stats, i, 1), ("n",), bias)
      assert models.relative_error(g, ref_g.mean(0)) < TOL, (path, i)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_exact_per_example_statistics_under_nnx_jit(kind, fisher):
  model, x, y, family = nnx_models.problem(kind, batch=6)
  rng = jax.random.key(3)
  curv_fn = nnx.jit(soo.nnx_curvature(family, fisher=fisher))
  loss, grads, curvature = curv_fn(model, x, y, rng)
  assert isinstance(grads, nnx.State)
  assert jax.tree.structure(grads) == jax.tree.structure(nnx.state(model, nnx.Param))
  assert curvature.fisher == fisher
  if kind == "cnn":
    assert {s.kind for s in curvature.layers.values()} == {"conv", "dense"}
    assert curvature.layers[("conv_2",)].conv.pre_pad is not None
    assert not curvature.layers[("conv_2",)].has_bias
  check_exact(model, x, y, family, fisher, rng, loss, grads, curvature)


def test_shared_layer_called_twice_and_scan_remat_are_exact():
  fn = soo.nnx_curvature(soo.losses.softmax_cross_entropy, fisher="sampled")
  rng = jax.random.key(5)
  model, x, y, family = nnx_models.problem("shared", batch=5)
  loss, grads, curvature = nnx.jit(fn)(model, x, y, rng)
  assert curvature.layers[("shared",)].calls == 2
  assert curvature.layers[("shared",)].inputs.shape == (5, 2, 4)
  assert curvature.layers[("head",)].calls == 1
  check_exact(model, x, y, family, "sampled", rng, loss, grads, curvature)

  model, x, y, family = nnx_models.problem("scan", batch=5)
  loss, grads, curvature = nnx.jit(fn)(model, x, y, rng)
  stacked = curvature.layers[("blocks", "linear")]
  assert stacked.stack_ndim == 1 and stacked.inputs.shape == (2, 5, 5)
  assert curvature.layers[("remat_block", "linear")].stack_ndim == 0
  check_exact(model, x, y, family, "sampled", rng, loss, grads, curvature)


def test_consecutive_captures_name_layers_correctly():
  fn = soo.nnx_curvature(soo.losses.softmax_cross_entropy, fisher="empirical")
  mlp, x, y, _ = nnx_models.problem("mlp", batch=3)
  cnn, xc, yc, _ = nnx_models.problem("cnn", batch=3)
  trace = lambda model, *args: nnx.eval_shape(fn, model, *args)[2]  # names are static
  first = trace(mlp, x, y)
  second = trace(cnn, xc, yc)
  third = trace(mlp, x, y)
  params_mlp, params_cnn = nnx.state(mlp, nnx.Param), nnx.state(cnn, nnx.Param)
  for curvature, params in [(first, params_mlp), (second, params_cnn), (third, params_mlp)]:
    for path, stats in curvature.layers.items():
      assert stats.calls == 1, path
      assert stats.kernel_shape == patches.tree_get(params, path)["kernel"].shape
  assert set(first.layers) == set(third.layers) == {("dense_0",), ("dense_1",), ("dense_2",)}
  assert set(second.layers) == {("conv_0",), ("conv_1",), ("conv_2",), ("head",)}
  rules = soo.describe(second, params_cnn, print_fn=None)
  assert rules["conv_1/kernel"].startswith("captured conv layer, kernel (2, 3, 3, 4)")
  # The user's model object never carries the capture's variables or stamps.
  for _, module in nnx.iter_modules(mlp):
    assert not any(k.startswith(("soo_", "_soo_")) for k in vars(module)), module


class _Boom(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 3, rngs=rngs)
    self.conv = nnx.Conv(1, 1, (1,), rngs=rngs)

  def __call__(self, x):
    self.linear(x)
    raise RuntimeError("boom in the forward pass")


def test_wrappers_restored_after_an_exception():
  before = {cls: cls.__dict__["__call__"] for cls in (nnx.Linear, nnx.Conv)}
  fn = soo.nnx_curvature(soo.losses.softmax_cross_entropy, fisher="empirical")
  model = _Boom(nnx.Rngs(0))
  x, y = jnp.ones((2, 4)), jnp.array([0, 1])
  with pytest.raises(RuntimeError, match="boom"):
    fn(model, x, y)
  with pytest.raises(RuntimeError, match="boom"):
    nnx.jit(fn)(model, x, y)
  assert {cls: cls.__dict__["__call__"] for cls in (nnx.Linear, nnx.Conv)} == before
  assert not hasattr(nnx.Linear.__call__, "__soo_capture_wrapper__")
  assert nnx_capture._PATCH_DEPTH[0] == 0 and nnx_capture._active() is None
  assert "soo_captured_inputs" not in vars(model.linear)


def test_batchnorm_and_dropout_state_is_written_back():
  family = soo.losses.softmax_cross_entropy
  model, x, y, _ = nnx_models.problem("norm", batch=8)
  reference = nnx.clone(model)
  before = nnx_models.pure(nnx.state(model, nnx.BatchStat))
  fn = nnx.jit(soo.nnx_curvature(family, fisher="empirical"))
  rngs, ref_rngs = nnx.Rngs(dropout=4), nnx.Rngs(dropout=4)
  loss, grads, curvature = fn(model, x, y, rngs=rngs)  # a graph-node call argument

  def mean_loss(m, r):
    return family.per_example_loss(m(x, rngs=r), y).mean()
  ref_loss, ref_grads = nnx.value_and_grad(mean_loss)(reference, ref_rngs)
  assert int(rngs.dropout.count[...]) == int(ref_rngs.dropout.count[...]) == 1
  np.testing.assert_allclose(loss, ref_loss, rtol=TOL)
  # (dense_0's bias gradient is ~0 through BatchNorm: compare the whole gradient at once.)
  flat = [jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(g)]) for g in (grads, ref_grads)]
  assert models.relative_error(*flat) < TOL
  # Updated batch statistics and rng counters are written back like a call would.
  after = nnx_models.pure(nnx.state(model, nnx.BatchStat))
  assert models.relative_error(after["norm"]["mean"], before["norm"]["mean"]) > 1e-3
  for kind in (nnx.BatchStat, nnx.RngState):
    for a, b in zip(jax.tree.leaves(nnx.state(model, kind)),
                    jax.tree.leaves(nnx.state(reference, kind))):
      a, b = (jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
              for v in (a, b))
      np.testing.assert_allclose(a, b, rtol=TOL)
  # Per-example statistics still average to the gradient (empirical targets).
  pure_grads = nnx_models.pure(grads)
  assert set(curvature.layers) == {("dense_0",), ("dense_1",)}
  for path, stats in curvature.layers.items():
    mean_d = np.asarray(patches.per_example_grads(stats)).mean(0)
    assert models.relative_error(mean_d, models.grad_matrix(pure_grads, path, True)) < TOL


class _Grouped(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3,), feature_group_count=2, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.conv(x).mean(axis=1))


class _NoLayer(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones(3))

  def __call__(self, x):
    return x[:, :3] * self.w


class _RawCheckpoint(nnx.Module):
  """Runs its block through a raw jax.checkpoint over split/merge: state changes are lost."""

  def __init__(self, rngs):
    self.block = nnx_models.Block(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    graphdef, state = nnx.split(self.block)
    x = jax.checkpoint(lambda s, h: nnx.merge(graphdef, s)(h))(state, x)
    return self.head(x)


def test_clear_errors_and_skip_unsupported():
  family = soo.losses.softmax_cross_entropy
  fn = soo.nnx_curvature(family, fisher="empirical", skip_unsupported=False)
  trace = lambda f, *args: nnx.eval_shape(f, *args)  # errors are raised while tracing
  x, y = jnp.ones((2, 5, 2)), jnp.array([0, 1])
  with pytest.raises(UnsupportedLayerError, match="layer conv uses grouped convolution"):
    trace(fn, _Grouped(nnx.Rngs(0)), x, y)
  skip_fn = soo.nnx_curvature(family, fisher="empirical")  # skips by default
  assert set(trace(skip_fn, _Grouped(nnx.Rngs(0)), x, y)[2].layers) == {("head",)}
  with pytest.raises(ValueError, match="no capturable layer"):
    trace(fn, _NoLayer(), jnp.ones((2, 4)), y)
  with pytest.raises(ValueError, match="layer block/linear ran but produced no statistics"):
    trace(fn, _RawCheckpoint(nnx.Rngs(0)), jnp.ones((2, 4)), y)
  mlp, xm, ym, _ = nnx_models.problem("mlp", batch=4)
  with pytest.raises(ValueError, match="labels of shape"):
    trace(fn, mlp, xm, jnp.zeros((4, 3), jnp.int32))
  with pytest.raises(ValueError, match="batch size"):
    fn(mlp, xm, ym[:3])
  with pytest.raises(ValueError, match="needs an rng"):
    trace(soo.nnx_curvature(family), mlp, xm, ym)
  with pytest.raises(TypeError, match="flax.nnx.Module"):
    fn(lambda v: v, xm, ym)
  with pytest.raises(ValueError, match="fisher must be one of"):
    soo.nnx_curvature(family, fisher="true")
  with pytest.raises(TypeError, match="loss_family"):
    soo.nnx_curvature(optax.softmax_cross_entropy)
  assert nnx_capture._PATCH_DEPTH[0] == 0 and nnx_capture._active() is None


@dataclasses.dataclass(frozen=True)
class _Dummy(engine.Algorithm):
  """A minimal layer-wise method on the engine: direction = gradient / (1 + damping)."""

  name = "dummy"

  def init_preconditioner(self, info):
    return jnp.ones((), jnp.float32)

  def refresh(self, info, statistics, previous, damping, data):
    return {"scale": 1.0 / (1.0 + damping)}, lambda solved: solved["scale"]

  def solve(self, block):
    return block

  def apply(self, info, scale, statistics, grad, damping):
    return grad * scale


def scale_by_dummy(*, damping=1.0):
  return layerwise.layer_transformation(_Dummy(), damping=damping, stats_decay=0.0,
                                        stats_every=1, inverse_every=1)


def _train_step(curv_fn):
  @nnx.jit
  def step(model, optimizer, x, y, rng):
    loss, grads, curvature = curv_fn(model, x, y, rng)
    optimizer.update(model, grads, curvature=curvature)
    return loss, grads
  return step


def test_nnx_optimizer_with_a_layerwise_method():
  family = soo.losses.softmax_cross_entropy
  curv_fn = soo.nnx_curvature(family, fisher="sampled")
  # One exact step on a model with captured layers and fallback leaves (BatchNorm).
  model, x, y, _ = nnx_models.problem("norm", batch=8)
  lr, damping = 0.1, 0.5
  tx = soo.build_optimizer(scale_by_dummy(damping=damping), learning_rate=lr, momentum=None)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx_models.pure(nnx.state(model, nnx.Param))
  _, grads = _train_step(curv_fn)(model, optimizer, x, y, jax.random.key(0))
  after = nnx_models.pure(nnx.state(model, nnx.Param))
  grads = nnx_models.pure(grads)
  for layer in ("dense_0", "dense_1", "norm"):
    scale = lr / (1.0 + damping) if layer.startswith("dense") else lr
    for leaf in after[layer]:
      np.testing.assert_allclose(after[layer][leaf] - before[layer][leaf],
                                 -scale * grads[layer][leaf], rtol=1e-4, atol=1e-7)
  rules = soo.describe(tx, nnx.state(model, nnx.Param), print_fn=None)
  assert rules["dense_0/kernel"].startswith("dummy") and rules["norm/scale"].startswith("fallback")

  # Training a tiny deterministic model with momentum.
  model, x, y, _ = nnx_models.problem("mlp", batch=32, seed=3)
  y = jnp.argmax(x @ jax.random.normal(jax.random.key(7), (4, 3)), axis=-1)
  tx = soo.build_optimizer(scale_by_dummy(damping=0.0), learning_rate=0.3, momentum=0.9)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = _train_step(curv_fn)
  losses = [float(step(model, optimizer, x, y, jax.random.key(i))[0]) for i in range(30)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  assert int(nnx.as_pure(optimizer.opt_state)[0].count) == 30
