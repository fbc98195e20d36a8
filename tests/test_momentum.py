"""The momentum of the full optimizers: a debiased EMA that restarts at refreshes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo


def _run(tx, updates):
  state = tx.init(updates[0])
  outs = []
  for u in updates:
    out, state = tx.update(u, state)
    outs.append(out)
  return outs, state


def _reference(updates, decay, restarts):
  """Debiased EMA written out: weights decay**(t - s) (1 - decay) over s since the restart."""
  outs = []
  for t in range(len(updates)):
    start = max(r for r in restarts if r <= t)
    weights = np.array([(1 - decay) * decay ** (t - s) for s in range(start, t + 1)])
    stacked = np.stack([np.asarray(u["w"]) for u in updates[start:t + 1]])
    outs.append(np.tensordot(weights, stacked, axes=1) / weights.sum())
  return outs


def test_restarting_ema_matches_the_written_out_average():
  updates = [{"w": jnp.asarray(np.random.RandomState(t).randn(3, 2), jnp.float32)}
             for t in range(8)]
  outs, state = _run(soo.restarting_ema(0.9, restart_every=3), updates)
  for got, want in zip(outs, _reference(updates, 0.9, restarts=[0, 3, 6])):
    np.testing.assert_allclose(got["w"], want, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 8 and int(state.since_restart) == 2


def test_without_restarts_it_is_optax_ema():
  updates = [{"w": jnp.full((2,), float(t))} for t in range(5)]
  outs, _ = _run(soo.restarting_ema(0.8, restart_every=100), updates)
  want, _ = _run(optax.ema(0.8, debias=True), updates)
  for got, expected in zip(outs, want):
    np.testing.assert_allclose(got["w"], expected["w"], rtol=1e-6)


def test_restarts_follow_a_growing_period():
  updates = [{"w": jnp.asarray([float(t) ** 2])} for t in range(10)]
  outs, _ = _run(soo.restarting_ema(0.5, restart_every=soo.growing_period(4)), updates)
  restarts = [0, 1, 2, 4, 8]  # growing_period(4): periods 1, 1, 2, 2, 4, ...
  for got, want in zip(outs, _reference(updates, 0.5, restarts)):
    np.testing.assert_allclose(got["w"], want, rtol=1e-6)


def test_restarts_while_the_period_grows_then_one_average():
  """The full optimizers' restarts (`periods.while_growing`): growing_period(4) refreshes
  at 0, 1, 2, 4, 8, ...; the restarts stop once the period has reached 4 (step 6), and the
  average runs on."""
  from secondorder_optax._src import periods
  updates = [{"w": jnp.asarray([float(t) ** 2])} for t in range(10)]
  restart_every = periods.while_growing(soo.growing_period(4))
  outs, state = _run(soo.restarting_ema(0.5, restart_every=restart_every), updates)
  for got, want in zip(outs, _reference(updates, 0.5, restarts=[0, 1, 2, 4])):
    np.testing.assert_allclose(got["w"], want, rtol=1e-6)
  assert int(state.since_restart) == 6
  assert periods.while_growing(3) == 3


def _momentum_states(state):
  is_momentum = lambda x: isinstance(x, soo.RestartingEmaState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_momentum) if is_momentum(s)]


def test_build_optimizer_restarts_its_momentum_at_the_refreshes():
  """`restart_momentum_every=3`: the momentum restarts where the roots are refreshed."""
  tx = soo.build_optimizer(soo.scale_by_shampoo(inverse_every=3, stats_every=1),
                           learning_rate=0.1, momentum=0.9, restart_momentum_every=3)
  params = {"w": jnp.ones((3, 2))}
  state = tx.init(params)
  for t in range(5):  # refreshes (and restarts) at steps 0 and 3
    grads = {"w": jnp.asarray(np.random.RandomState(t).randn(3, 2), jnp.float32)}
    _, state = tx.update(grads, state, params)
  (momentum,) = _momentum_states(state)
  assert int(momentum.count) == 5 and int(momentum.since_restart) == 2
  for method in (soo.kfac, soo.tnt, soo.mbf, functools.partial(soo.seng, batch_size=4)):
    assert len(_momentum_states(method().init(params))) == 1, method
  assert not _momentum_states(soo.kfac(momentum=None).init(params))
  assert not _momentum_states(soo.shampoo().init(params))  # Shampoo keeps optax.ema


@pytest.mark.parametrize("method", ["kfac", "tnt", "mbf"])
def test_full_optimizers_restart_only_while_the_refresh_period_grows(method):
  """With `inverse_every=growing_period(4)` (refreshes at 0, 1, 2, 4, 8, 12, ...) the
  momentum of `soo.kfac` / `soo.tnt` / `soo.mbf` restarts at 0, 1, 2 and 4, then averages on
  (10 steps: 6 since the last restart), on a captured tiny MLP."""
  from tests import contract
  params, x, y, curv_fn = contract._problem("empirical" if method == "mbf" else "sampled")
  tx = getattr(soo, method)(inverse_every=soo.growing_period(4), stats_every=1)
  state = tx.init(params)
  step = contract._make_step(tx, curv_fn, pass_curvature=True)
  for i in range(10):
    params, state, _ = step(params, state, x, y, jax.random.key(i))
  (momentum,) = _momentum_states(state)
  assert int(momentum.count) == 10 and int(momentum.since_restart) == 6


def test_bad_decay_is_named():
  with pytest.raises(ValueError, match="decay"):
    soo.restarting_ema(1.0, restart_every=2)


def test_hyperparameters_can_be_injected():
  """Under `optax.inject_hyperparams` (decay and period traced in `jit`), same outputs."""
  tx = optax.inject_hyperparams(soo.restarting_ema)(decay=0.5, restart_every=2)
  update = jax.jit(tx.update)
  state, outs = tx.init(jnp.zeros(())), []
  for g in (1.0, 3.0, 5.0):
    out, state = update(jnp.asarray(g), state)
    outs.append(float(out))
  np.testing.assert_allclose(outs, [1.0, 7 / 3, 5.0], rtol=1e-6)
