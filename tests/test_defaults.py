"""Every method at its defaults (`soo.<m>()`; SENG: `batch_size=` only) trains, and the
same defaults survive inputs rescaled by 1e4 (DESIGN §6: the damping is relative).

No timings here: wall-clock comparisons live in `experiments` and `docs/defaults.md`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo
from tests import models

METHODS = ("kfac", "ekfac", "tkfac", "tekfac", "tnt", "shampoo", "soap", "mbf", "seng",
           "kbfgs")
FISHER = {"mbf": "empirical", "seng": "empirical", "kbfgs": "empirical"}
SECOND_PASS = ("kbfgs",)  # its update also takes the capture as a function of the params
BATCH = 32
STEPS = 30


def _problem(input_scale):
  """A 4-8-3 MLP on a learnable teacher task, inputs multiplied by `input_scale`."""
  model, params, x, _, family = models.mlp_problem(batch=BATCH, d_in=4, classes=3, seed=3)
  teacher = jax.random.normal(jax.random.key(7), (4, 3))
  y = jnp.argmax(x @ teacher, axis=-1)
  return model, params, x * input_scale, y, family


def _default(method):
  factory = getattr(soo, method)
  return factory(batch_size=BATCH) if method == "seng" else factory()


def _train(method, input_scale):
  model, params, x, y, family = _problem(input_scale)
  curv_fn = soo.linen_curvature(model, family, fisher=FISHER.get(method, "sampled"))
  tx = _default(method)

  @jax.jit
  def step(params, state, rng):
    loss, grads, curvature = curv_fn(params, x, y, rng)
    extra = {}
    if method in SECOND_PASS:
      extra["curvature_fn"] = lambda p: curv_fn(p, x, y, rng)[2]
    updates, state = tx.update(grads, state, params, curvature=curvature, **extra)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for i in range(STEPS):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  return losses


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("input_scale", [1.0, 1e4])
def test_defaults_halve_the_loss(method, input_scale):
  """At defaults, 30 steps halve the training loss, at the data's scale and at 1e4 times it
  (where the loss starts in the thousands)."""
  losses = _train(method, input_scale)
  assert np.all(np.isfinite(losses)), (method, losses)
  assert min(losses[-3:]) < 0.5 * losses[0], (method, losses[0], losses[-3:])


class _EmbedMLP(nn.Module):
  """An embedding (no captured layer) feeding dense layers."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(20, 8)(tokens).mean(axis=1)
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def test_uncaptured_leaves_train_with_adam_by_default():
  """The embedding goes to the full optimizer's Adam branch (its own learning rate), not
  to momentum SGD at the second-order learning rate."""
  model = _EmbedMLP()
  tokens = jax.random.randint(jax.random.key(0), (64, 5), 0, 20)
  labels = jax.random.randint(jax.random.key(1), (20,), 0, 3)[tokens[:, 0]]
  params = model.init(jax.random.key(2), tokens)["params"]
  rules = soo.describe(soo.kfac(), params, print_fn=None)
  assert rules["Embed_0/embedding"] == "fallback: adam (its own learning rate)"
  curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)
  tx = soo.kfac(fallback_learning_rate=1e-2)
  state = tx.init(params)
  _, grads, curvature = curv_fn(params, tokens, labels, jax.random.key(3))
  updates, _ = tx.update(grads, state, params, curvature=curvature)
  adam_updates, _ = optax.adamw(1e-2, weight_decay=0.0).update(
      grads["Embed_0"], optax.adamw(1e-2).init(params["Embed_0"]), params["Embed_0"])
  np.testing.assert_allclose(updates["Embed_0"]["embedding"], adam_updates["embedding"],
                             rtol=1e-6, atol=1e-9)
