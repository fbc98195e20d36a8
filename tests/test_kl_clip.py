"""KL clipping: the scale against its formula, schedules, non-finite steps, full optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo
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
