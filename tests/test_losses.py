"""Loss families: per-example losses equal optax's; samples follow the model's distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder_optax as soo

LOGITS = jax.random.normal(jax.random.key(0), (5, 4))


def test_per_example_losses_equal_optax():
  labels = jnp.array([0, 3, 1, 2, 0])
  np.testing.assert_allclose(
      soo.losses.softmax_cross_entropy.per_example_loss(LOGITS, labels),
      optax.softmax_cross_entropy_with_integer_labels(LOGITS, labels), rtol=1e-6)
  probs = jax.random.uniform(jax.random.key(1), LOGITS.shape)
  np.testing.assert_allclose(
      soo.losses.sigmoid_binary_cross_entropy.per_example_loss(LOGITS, probs),
      optax.sigmoid_binary_cross_entropy(LOGITS, probs).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(
      soo.losses.squared_error.per_example_loss(LOGITS, probs),
      0.5 * optax.l2_loss(LOGITS, probs).sum(-1) * 2, rtol=1e-6)


def _draws(family, n=20000):
  return jax.vmap(lambda k: family.sample(k, LOGITS))(jax.random.split(jax.random.key(2), n))


def test_samples_have_the_model_distribution():
  n = 20000
  labels = np.asarray(_draws(soo.losses.softmax_cross_entropy, n))
  freq = np.stack([(labels == c).mean(0) for c in range(4)], axis=-1)
  p = np.asarray(jax.nn.softmax(LOGITS))
  assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-3)

  bits = np.asarray(_draws(soo.losses.sigmoid_binary_cross_entropy, n))
  q = np.asarray(jax.nn.sigmoid(LOGITS))
  assert set(np.unique(bits)) <= {0.0, 1.0}
  assert np.all(np.abs(bits.mean(0) - q) < 5 * np.sqrt(q * (1 - q) / n) + 1e-3)

  gauss = np.asarray(_draws(soo.losses.squared_error, n))
  assert np.all(np.abs(gauss.mean(0) - np.asarray(LOGITS)) < 5 / np.sqrt(n))
  assert np.all(np.abs(gauss.var(0) - 1.0) < 0.05)


def test_target_checks_name_the_problem():
  with pytest.raises(ValueError, match="labels of shape"):
    soo.losses.softmax_cross_entropy.check_targets(LOGITS, jnp.zeros((5, 4), jnp.int32))
  with pytest.raises(ValueError, match="do not match"):
    soo.losses.squared_error.check_targets(LOGITS, jnp.zeros((5, 3)))
  with pytest.raises(ValueError, match="do not match"):
    soo.losses.sigmoid_binary_cross_entropy.check_targets(LOGITS, jnp.zeros((4, 4)))
