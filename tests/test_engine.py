"""The refresh engine's guarantees, for every method (DESIGN §2a, §6).

One sampled-target backward pass per statistics step; a valid (identity) preconditioner
until the first successful refresh; non-finite first statistics leave the averages unset;
finite but unusable refreshes are failures; bad input gets a `ValueError` naming the method
and the argument or parameter path; every state round-trips through orbax-checkpoint; and
`soo.describe` sees through optax's wrappers.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import secondorder_optax as soo
from tests import models

METHODS = {
    "kfac": dict(damping=1e-2),
    "ekfac": dict(damping=1e-2),
    "tkfac": dict(damping=1e-2),
    "tekfac": dict(damping=1e-2),
    "tnt": dict(damping=0.1),
    "shampoo": dict(damping=1e-3),
    "mbf": dict(damping=1e-2, block_size=4),
    "seng": dict(damping=0.1, batch_size=16),
}
EMPIRICAL = ("mbf", "seng")
SAMPLED = ("kfac", "ekfac", "tkfac", "tekfac", "tnt")


def _problem(method, batch=16):
  model, params, x, y, family = models.mlp_problem(batch=batch, d_in=4, classes=3, seed=3)
  y = jnp.argmax(x @ jax.random.normal(jax.random.key(7), (4, 3)), axis=-1)
  fisher = "empirical" if method in EMPIRICAL else "sampled"
  return params, x, y, soo.linen_curvature(model, family, fisher=fisher)


def _walk(jaxpr):
  """Every equation of a jaxpr and of all its sub-jaxprs (cond branches, calls)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _walk(inner)


@pytest.mark.parametrize("method", SAMPLED + ("mbf",))
def test_one_sampled_backward_pass_per_update(method):
  hparams = dict(METHODS[method], stats_every=1)
  if method == "mbf":
    hparams["fisher"] = "sampled"
  tx = getattr(soo, f"scale_by_{method}")(**hparams)
  model, params, x, y, family = models.mlp_problem(batch=8, d_in=4, classes=3, seed=3)
  curv_fn = soo.linen_curvature(model, family, fisher="sampled")
  state = tx.init(params)

  def step(params, state, rng):
    _, grads, curvature = curv_fn(params, x, y, rng)
    return tx.update(grads, state, params, curvature=curvature)

  jaxpr = jax.make_jaxpr(step)(params, state, jax.random.key(0))
  sampling = [e for e in _walk(jaxpr.jaxpr) if e.primitive.name in ("random_bits",
                                                                      "threefry2x32")]
  assert len(sampling) == 1, [e.primitive.name for e in sampling]


def _injected_step(method, curv_fn):
  tx = optax.inject_hyperparams(getattr(soo, method))(learning_rate=0.05, **METHODS[method])

  @jax.jit
  def step(params, state, x, y, rng):
    _, grads, curvature = curv_fn(params, x, y, rng)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return updates, state, grads

  return tx, step


def _engine_state(state):
  (found,) = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, soo.PreconditionerState))
              if isinstance(s, soo.PreconditionerState)]
  return found


@pytest.mark.parametrize("method", sorted(METHODS))
def test_failed_first_refresh_keeps_a_valid_preconditioner(method):
  """A negative damping at step 0 (injected) fails every unit's first refresh: each update
  is then a finite, non-zero gradient step, and the next good refresh takes over."""
  params, x, y, curv_fn = _problem(method)
  tx, step = _injected_step(method, curv_fn)
  state = tx.init(params)
  state.hyperparams["damping"] = jnp.asarray(-1.0, state.hyperparams["damping"].dtype)
  updates, state, grads = step(params, state, x, y, jax.random.key(0))
  inner = _engine_state(state)
  assert int(inner.failures) == len(inner.preconditioner)
  for update, grad in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    update = np.asarray(update)
    assert np.all(np.isfinite(update)) and np.any(update != 0)
    # Bounded: the KL clip's step length grows as √kl_clip (0.03 for the EKFAC defaults).
    assert np.linalg.norm(update) <= 20 * np.linalg.norm(np.asarray(grad)) + 1e-6
  state.hyperparams["damping"] = jnp.asarray(METHODS[method]["damping"],
                                             state.hyperparams["damping"].dtype)
  state.hyperparams["inverse_every"] = jnp.asarray(1, jnp.int32)
  _, state, _ = step(params, state, x, y, jax.random.key(1))
  assert int(_engine_state(state).failures) == len(inner.preconditioner)  # no new failure


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"shampoo"}))  # Shampoo: no curvature
def test_nonfinite_first_curvature_leaves_averages_unset(method):
  params, x, y, curv_fn = _problem(method)
  tx = getattr(soo, method)(0.05, **METHODS[method])
  poison = lambda c: jax.tree.map(
      lambda s: s * jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else s, c)

  @jax.jit
  def step(params, state, rng, bad):
    loss, grads, curvature = curv_fn(params, x, y, rng)
    curvature = jax.lax.cond(bad, poison, lambda c: c, curvature)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  params, state, first_loss = step(params, state, jax.random.key(0), True)
  inner = _engine_state(state)
  assert int(inner.count) == 1 and int(inner.statistics_count) == 0
  losses = [float(first_loss)]
  for i in range(1, 20):
    params, state, loss = step(params, state, jax.random.key(i), False)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and max(losses) <= 1.5 * losses[0], losses
  assert losses[-1] < losses[0], losses


def test_near_singular_refresh_is_a_failure():
  """MBF at damping 0 on a batch smaller than its blocks: the blocks are singular and
  Cholesky can come out finite but meaningless (updates of 1e15 before the residual check);
  such blocks' layers keep the identity, the others take the undamped solve."""
  params, x, y, curv_fn = _problem("mbf", batch=4)
  tx = soo.scale_by_mbf(damping=0.0, block_size=16)
  _, grads, curvature = curv_fn(params, x, y, jax.random.key(0))
  updates, state = jax.jit(lambda g, s, c: tx.update(g, s, params, curvature=c))(
      grads, tx.init(params), curvature)
  assert int(state.failures) >= 1
  for update, grad in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert np.all(np.isfinite(np.asarray(update)))
    assert np.abs(np.asarray(update)).max() <= 1e6 * np.abs(np.asarray(grad)).max() + 1e-6


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bad_arguments_name_the_method_and_argument(method):
  factory = getattr(soo, f"scale_by_{method}")
  hparams = METHODS[method]
  bad = {"damping": -1.0, "inverse_every": 0}
  if method != "seng":
    bad.update(stats_every=2.5, stats_decay=1.0)
  for name, value in bad.items():
    with pytest.raises(ValueError, match=f"{method}: {name} must be"):
      factory(**dict(hparams, **{name: value}))


def test_growing_periods_refresh_often_early_then_every_period():
  """`soo.growing_period`: statistics and inverses at counts where `count % period == 0`,
  the period doubling after every two refreshes up to its cap."""
  params = {"w": jnp.ones((3, 2)), "v": jnp.ones((4,))}
  tx = soo.scale_by_tnt(damping=0.1, stats_every=soo.growing_period(3),
                        inverse_every=soo.growing_period(8))
  state = tx.init(params)
  step = jax.jit(tx.update)
  stats_steps, inverse_steps = [], []
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  for count in range(40):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(count), x.shape), params)
    _, new = step(grads, state)
    if any(not np.array_equal(a, b) for a, b in zip(leaves(new.statistics),
                                                     leaves(state.statistics))):
      stats_steps.append(count)
    if any(not np.array_equal(a, b) for a, b in zip(leaves(new.preconditioner),
                                                     leaves(state.preconditioner))):
      inverse_steps.append(count)
    state = new
  assert stats_steps == [0, 1, 2, 4, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39]
  assert inverse_steps == [0, 1, 2, 4, 8, 12, 16, 24, 32]
  assert step._cache_size() == 1


def test_bad_periods_are_rejected_with_their_names():
  for bad in (0, 2.5, -3, True):
    with pytest.raises(ValueError, match="growing_period: every must be an integer >= 1"):
      soo.growing_period(bad)
  with pytest.raises(ValueError, match="refreshes_per_stage must be an integer >= 1"):
    soo.growing_period(10, refreshes_per_stage=0)
  with pytest.raises(ValueError, match="kfac: inverse_every must be an integer >= 1 or a sched"):
    soo.kfac(inverse_every=lambda count: 0 * count)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_update_on_other_parameters_names_the_leaf(method):
  params, x, y, curv_fn = _problem(method)
  tx = getattr(soo, f"scale_by_{method}")(**METHODS[method])
  state = tx.init(params)
  other = models.MLP(features=(7, 5, 3)).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError,
                     match=rf"{method}: Dense_0/bias: state holds \(6,\), updates have \(7,\)"):
    tx.update(other, state, other)


def test_sampled_curvature_and_unknown_fisher_are_rejected():
  params, x, y, _ = _problem("kfac")
  model, *_ = models.mlp_problem(batch=16, d_in=4, classes=3, seed=3)
  sampled = soo.linen_curvature(model, soo.losses.softmax_cross_entropy, fisher="sampled")
  _, grads, curvature = sampled(params, x, y, jax.random.key(0))
  for tx in (soo.scale_by_seng(damping=0.1, batch_size=16), soo.scale_by_mbf(damping=0.1)):
    with pytest.raises(ValueError, match="fisher='empirical' but got fisher='sampled'"):
      tx.update(grads, tx.init(params), params, curvature=curvature)
  with pytest.raises(ValueError, match="mbf: fisher must be one of"):
    soo.scale_by_mbf(damping=0.1, fisher="true")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_orbax_round_trip_resumes_bit_identically(method, tmp_path):
  params, x, y, curv_fn = _problem(method)
  tx = getattr(soo, method)(0.05, **METHODS[method], inverse_every=2)

  @jax.jit
  def step(params, state, rng):
    _, grads, curvature = curv_fn(params, x, y, rng)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  params, state = step(params, state, jax.random.key(0))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(tx.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  a, b = (params, state), (params, restored)
  for i in range(1, 4):
    a, b = step(*a, jax.random.key(i)), step(*b, jax.random.key(i))
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_describe_sees_through_optax_wrappers():
  params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "scale": jnp.ones(2)}
  wrapped = {
      "chain": optax.chain(optax.clip_by_global_norm(1.0), soo.scale_by_tkfac(damping=1e-3)),
      "inject": optax.inject_hyperparams(soo.tkfac)(learning_rate=0.1, damping=1e-3),
      "multisteps": optax.MultiSteps(soo.tkfac(0.1, damping=1e-3), every_k_schedule=2),
      "apply_if_finite": optax.apply_if_finite(soo.tkfac(0.1, damping=1e-3), 3),
  }
  for name, tx in wrapped.items():
    rules = soo.describe(tx, params, print_fn=None)
    assert rules["Dense_0/kernel"].startswith("tkfac: trace-restricted"), name
    # A bare scale_by_<method> passes uncaptured leaves through; a full optimizer trains them
    # with its own Adam branch.
    expected = "fallback (identity)" if name == "chain" else "fallback: adam (its own learning rate)"
    assert rules["scale"] == expected, name
  with pytest.raises(ValueError, match="contains a secondorder_optax method"):
    soo.describe(optax.adam(1e-3), params, print_fn=None)


class _Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 4))(x)
    return nn.Dense(3)(h.reshape(h.shape[0], -1))


def test_describe_with_curvature_reports_uncaptured_layers():
  model = _Attention()
  x, y = jnp.ones((4, 5)), jnp.zeros((4,), jnp.int32)
  params = model.init(jax.random.key(0), x)["params"]
  curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy,
                                skip_unsupported=True)
  _, _, curvature = curv_fn(params, x, y, jax.random.key(1))
  rules = soo.describe(soo.kfac(0.1, damping=1e-3), params, curvature=curvature,
                       print_fn=None)
  assert "NOT CAPTURED" in rules["DenseGeneral_0/kernel"]
  assert rules["Dense_0/kernel"].startswith("kfac: Kronecker")


@pytest.mark.parametrize("name,fisher", [("kfac", "sampled"), ("mbf", "empirical")])
def test_layers_captured_sends_uncaptured_layers_to_the_fallback(name, fisher):
  """One switch, `layers='captured'`: the DenseGeneral the capture leaves out is trained by
  Adam (exactly `optax.adamw`'s step), the captured Dense exactly as with an explicit
  `layers=[Dense_0]`; the default `layers=None` names the switch in its error."""
  model = _Attention()
  x = jax.random.normal(jax.random.key(2), (6, 5))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  params = model.init(jax.random.key(0), x)["params"]
  curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy, fisher=fisher)
  _, grads, curvature = curv_fn(params, x, y, jax.random.key(1))
  assert set(curvature.layers) == {("Dense_0",)}
  make = getattr(soo, name)
  tx = make(layers="captured")
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, curvature=curvature)
  adam = optax.adamw(1e-3, weight_decay=0.0)
  adam_updates, _ = adam.update(grads, adam.init(params), params)
  chex.assert_trees_all_close(updates["DenseGeneral_0"], adam_updates["DenseGeneral_0"],
                              rtol=1e-6)
  explicit = make(layers=[("Dense_0",)])
  explicit_updates, _ = explicit.update(grads, explicit.init(params), params,
                                        curvature=curvature)
  chex.assert_trees_all_close(updates["Dense_0"], explicit_updates["Dense_0"], rtol=1e-5)
  assert float(jnp.abs(updates["Dense_0"]["kernel"]).max()) > 0
  # A second step: the absent layer's state is kept, nothing fails.
  _, state = tx.update(grads, state, params, curvature=curvature)
  inner = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "failures"))
           if hasattr(s, "failures")]
  assert inner and all(int(s.failures) == 0 for s in inner)
  rules = soo.describe(tx, params, curvature=curvature, print_fn=None)
  assert rules["DenseGeneral_0/kernel"].startswith("fallback: adam"), rules
  assert "not captured" in rules["DenseGeneral_0/kernel"]
  assert rules["Dense_0/kernel"].startswith(name)
  default = make()
  with pytest.raises(ValueError, match="layers='captured'"):
    default.update(grads, default.init(params), params, curvature=curvature)
  with pytest.raises(ValueError, match="layers= must be None, 'captured'"):
    make(layers="all")
