"""Tiny models and exact-curvature builders shared by the tests (the exact-curvature kit).

Everything here is deliberately dense and slow: per-example gradients by
`jax.vmap(jax.grad(...))`, Fisher blocks as explicit outer products, so that each method's
direction can be compared with a dense solve of the matrix it claims to approximate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

import secondorder_optax as soo
from secondorder_optax._src import patches

jax.config.update("jax_default_matmul_precision", "highest")


class MLP(nn.Module):
  """Dense layers with and without bias."""
  features: tuple = (6, 5, 3)

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features[0])(x)
    x = nn.tanh(x)
    x = nn.Dense(self.features[1], use_bias=False)(x)
    x = nn.tanh(x)
    return nn.Dense(self.features[2])(x)


class CNN(nn.Module):
  """Convs with mixed strides, explicit/SAME/CIRCULAR padding, dilation, then dense."""
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), strides=2, padding="SAME")(x)
    x = nn.tanh(x)
    x = nn.Conv(4, (2, 3), kernel_dilation=(1, 2), padding=((1, 0), (2, 1)))(x)
    x = nn.tanh(x)
    x = nn.Conv(2, (3, 3), padding="CIRCULAR", use_bias=False)(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.classes)(x)


def mlp_problem(batch=12, d_in=4, classes=3, seed=0, loss="softmax"):
  """(model, params, x, y, loss_family) for the MLP."""
  model = MLP(features=(6, 5, classes))
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, d_in))
  if loss == "softmax":
    family = soo.losses.softmax_cross_entropy
    y = jax.random.randint(ky, (batch,), 0, classes)
  else:
    family = soo.losses.squared_error
    y = jax.random.normal(ky, (batch, classes))
  params = model.init(kp, x)["params"]
  return model, params, x, y, family


def cnn_problem(batch=6, seed=0, loss="softmax"):
  model = CNN()
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, 7, 8, 2))
  if loss == "softmax":
    family = soo.losses.softmax_cross_entropy
    y = jax.random.randint(ky, (batch,), 0, 3)
  else:
    family = soo.losses.squared_error
    y = jax.random.normal(ky, (batch, 3))
  params = model.init(kp, x)["params"]
  return model, params, x, y, family


def per_example_grads(model, params, x, targets, family):
  """Parameter gradients of each example's loss: a params tree with a leading batch axis."""
  def one(p, xi, ti):
    out = model.apply({"params": p}, xi[None])
    return family.per_example_loss(out, ti[None])[0]
  return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, targets)


def fisher_targets(model, params, x, targets, family, fisher, rng):
  """The targets the capture uses for its statistics (same rng => same samples)."""
  if fisher == "empirical":
    return targets
  return family.sample(rng, model.apply({"params": params}, x))


def layer_vectors(pex, path, has_bias):
  """`vec(D_n)` in the matrix view `[kernel; bias]` (row-major): shape (B, d)."""
  mats = jax.vmap(lambda g: patches.params_to_matrix(patches.tree_get(g, path), has_bias))(pex)
  return np.asarray(mats.reshape(mats.shape[0], -1), np.float64)


def layer_matrices(pex, path, has_bias):
  """Per-example `D_n` in the matrix view: (B, d_in [+1], d_out)."""
  return np.asarray(jax.vmap(
      lambda g: patches.params_to_matrix(patches.tree_get(g, path), has_bias))(pex), np.float64)


def fisher_block(vectors):
  """Exact (empirical or sampled) Fisher block `E_n[vec(D_n) vec(D_n)ᵀ]`."""
  return vectors.T @ vectors / vectors.shape[0]


def grad_matrix(grads, path, has_bias):
  return np.asarray(patches.params_to_matrix(patches.tree_get(grads, path), has_bias), np.float64)


def relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
