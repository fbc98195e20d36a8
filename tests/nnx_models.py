"""NNX twins of the tiny models in `tests/models.py`, and their exact per-example gradients.

`per_example_grads` returns a pure nested dict (module path -> leaves with a leading batch
axis), so `models.layer_matrices` / `models.layer_vectors` / `models.grad_matrix` work on it
unchanged; `pure(tree)` turns an `nnx.State` into the same layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import secondorder_optax as soo
from tests import models  # noqa: F401  (sets the highest matmul precision)


class MLP(nnx.Module):
  """Linear layers with and without bias (twin of `models.MLP`)."""

  def __init__(self, d_in=4, features=(6, 5, 3), *, rngs: nnx.Rngs):
    self.dense_0 = nnx.Linear(d_in, features[0], rngs=rngs)
    self.dense_1 = nnx.Linear(features[0], features[1], use_bias=False, rngs=rngs)
    self.dense_2 = nnx.Linear(features[1], features[2], rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.dense_0(x))
    x = jnp.tanh(self.dense_1(x))
    return self.dense_2(x)


class CNN(nnx.Module):
  """Convs with mixed strides, explicit/SAME/CIRCULAR padding, dilation (twin of `models.CNN`).

  Input `(B, 7, 8, 2)`.
  """

  def __init__(self, classes=3, *, rngs: nnx.Rngs):
    self.conv_0 = nnx.Conv(2, 3, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.conv_1 = nnx.Conv(3, 4, (2, 3), kernel_dilation=(1, 2), padding=((1, 0), (2, 1)),
                           rngs=rngs)
    self.conv_2 = nnx.Conv(4, 2, (3, 3), padding="CIRCULAR", use_bias=False, rngs=rngs)
    self.head = nnx.Linear(4 * 3 * 2, classes, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.conv_0(x))
    x = jnp.tanh(self.conv_1(x))
    x = self.conv_2(x)
    return self.head(x.reshape((x.shape[0], -1)))


class SharedMLP(nnx.Module):
  """One Linear called twice (a shared layer), then a head."""

  def __init__(self, d=4, classes=3, *, rngs: nnx.Rngs):
    self.shared = nnx.Linear(d, d, rngs=rngs)
    self.head = nnx.Linear(d, classes, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.shared(x))
    x = jnp.tanh(self.shared(x))
    return self.head(x)


class Block(nnx.Module):
  def __init__(self, d, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


class ScanRematMLP(nnx.Module):
  """An input layer, a block under `nnx.remat`, `nnx.scan` over stacked blocks, a head."""

  def __init__(self, d_in=4, d=5, depth=2, classes=3, *, rngs: nnx.Rngs):
    self.inp = nnx.Linear(d_in, d, rngs=rngs)
    self.remat_block = Block(d, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
      return Block(d, rngs=rngs)

    self.blocks = stack(rngs)
    self.head = nnx.Linear(d, classes, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.inp(x))
    x = nnx.remat(lambda block, h: block(h))(self.remat_block, x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return block(h)

    x = body(x, self.blocks)
    return self.head(x)


class NormDropMLP(nnx.Module):
  """Linear -> BatchNorm -> relu -> Dropout -> Linear; dropout rngs held by the model or
  passed as `rngs=` (which takes precedence)."""

  def __init__(self, d_in=4, d=6, classes=3, *, rngs: nnx.Rngs):
    self.dense_0 = nnx.Linear(d_in, d, rngs=rngs)
    self.norm = nnx.BatchNorm(d, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.dense_1 = nnx.Linear(d, classes, rngs=rngs)

  def __call__(self, x, rngs=None):
    x = nnx.relu(self.norm(self.dense_0(x)))
    return self.dense_1(self.drop(x, rngs=rngs))


def pure(tree):
  """`nnx.State` (of Variables or arrays) -> nested dict of arrays."""
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def problem(kind="mlp", batch=8, seed=0):
  """(model, x, y, loss_family) with softmax targets for 'mlp', 'cnn', 'shared', 'scan'."""
  kx, ky = jax.random.split(jax.random.key(seed))
  rngs = nnx.Rngs(seed + 1)
  if kind == "cnn":
    model, x = CNN(rngs=rngs), jax.random.normal(kx, (batch, 7, 8, 2))
  else:
    model = {"mlp": MLP, "shared": SharedMLP, "scan": ScanRematMLP, "norm": NormDropMLP}[kind](
        rngs=rngs)
    x = jax.random.normal(kx, (batch, 4))
  y = jax.random.randint(ky, (batch,), 0, 3)
  return model, x, y, soo.losses.softmax_cross_entropy


def forward_fn(model):
  """`(params, x) -> outputs` for a model with only `nnx.Param` state (pure)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(p, x):
    return nnx.merge(graphdef, p, rest)(x)
  return apply, params


def per_example_grads(model, x, targets, family):
  """Parameter gradients of each example's loss (vmap(grad)) as a pure dict, batch first."""
  apply, params = forward_fn(model)

  def one(p, xi, ti):
    return family.per_example_loss(apply(p, xi[None]), ti[None])[0]
  return pure(jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, targets))


def fisher_targets(model, x, targets, family, fisher, rng):
  """The targets the capture uses for its statistics (same rng => same samples)."""
  if fisher == "empirical":
    return targets
  apply, params = forward_fn(model)
  return family.sample(rng, apply(params, x))
