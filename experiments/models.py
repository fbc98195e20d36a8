"""Flax linen models of the papers' benchmarks.

* `Autoencoder`: the deep autoencoders of Hinton & Salakhutdinov (2006) used by the KFAC,
  TNT, MBF and K-BFGS papers: `mnist_autoencoder()` 784-1000-500-250-30-250-500-1000-784,
  `curves_autoencoder()` 784-400-200-100-50-25-6-25-50-100-200-400-784 (both trained with
  sigmoid binary cross-entropy on pixel intensities), `faces_autoencoder()`
  625-2000-1000-500-30-500-1000-2000-625 (squared error). The code layer is linear.
* `SmallCNN`: two convolutions and two dense layers, for MNIST-like classification.
* `ResNet`: the CIFAR-style ResNet-6n+2 of He et al. (2016): `resnet20()` (n=3),
  `resnet32()` (n=5); batch norm, three stages of 16/32/64 channels.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from experiments import models
  >>> ae = models.Autoencoder(encoder_sizes=(8, 2), output_dim=16)
  >>> params = ae.init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
  >>> ae.apply({"params": params}, jnp.zeros((3, 16))).shape
  (3, 16)
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}


class Autoencoder(nn.Module):
  """Deep autoencoder: encoder sizes mirrored into the decoder, linear code layer.

  Attributes:
    encoder_sizes: hidden sizes down to the code, e.g. `(1000, 500, 250, 30)`.
    output_dim: size of the reconstruction (flattened input size).
    activation: hidden nonlinearity, 'relu' (the TNT/MBF/K-BFGS papers' code), 'sigmoid'
      (Hinton & Salakhutdinov, KFAC paper) or 'tanh'.
  """
  encoder_sizes: Sequence[int]
  output_dim: int
  activation: str = "relu"

  @nn.compact
  def __call__(self, x):
    act = ACTIVATIONS[self.activation]
    x = x.reshape((x.shape[0], -1))
    sizes = list(self.encoder_sizes)
    decoder_sizes = sizes[-2::-1]
    for size in sizes[:-1]:
      x = act(nn.Dense(size)(x))
    x = nn.Dense(sizes[-1])(x)  # Linear code layer.
    for size in decoder_sizes:
      x = act(nn.Dense(size)(x))
    return nn.Dense(self.output_dim)(x)  # Logits (BCE) or means (squared error).


def mnist_autoencoder(activation: str = "relu") -> Autoencoder:
  return Autoencoder(encoder_sizes=(1000, 500, 250, 30), output_dim=784, activation=activation)


def curves_autoencoder(activation: str = "relu") -> Autoencoder:
  return Autoencoder(encoder_sizes=(400, 200, 100, 50, 25, 6), output_dim=784,
                     activation=activation)


def faces_autoencoder(activation: str = "relu") -> Autoencoder:
  return Autoencoder(encoder_sizes=(2000, 1000, 500, 30), output_dim=625,
                     activation=activation)


class MLPClassifier(nn.Module):
  """A ReLU MLP classifier on flattened images."""
  hidden: Sequence[int] = (128, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
  """Conv(32)-pool-Conv(64)-pool-Dense(128)-Dense(classes), ReLU."""
  num_classes: int = 10
  channels: Sequence[int] = (32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3), padding="SAME")(x))
      if min(x.shape[1:3]) >= 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
  """Two 3x3 convolutions with batch norm; a 1x1 projection when the shape changes."""
  channels: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.channels, (3, 3), strides=self.strides, padding="SAME",
                use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(y)
    y = norm()(y)
    if x.shape != y.shape:
      x = nn.Conv(self.channels, (1, 1), strides=self.strides, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet-(6n+2): a 3x3 stem, three stages of n blocks, global pooling.

  Call with `train=True` while training (batch statistics, `mutable=["batch_stats"]`) and
  `train=False` to evaluate.
  """
  blocks_per_stage: int = 3
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(width, strides)(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def resnet20(num_classes: int = 10) -> ResNet:
  return ResNet(blocks_per_stage=3, num_classes=num_classes)


def resnet32(num_classes: int = 10) -> ResNet:
  return ResNet(blocks_per_stage=5, num_classes=num_classes)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnist_autoencoder": mnist_autoencoder,
    "curves_autoencoder": curves_autoencoder,
    "faces_autoencoder": faces_autoencoder,
    "resnet20": resnet20,
    "resnet32": resnet32,
}
