"""Loss families that can sample targets from the model's predictive distribution.

A `LossFamily` gives the per-example negative log-likelihood of a predictive
distribution parameterised by the model's outputs, and a sampler for that distribution.
The training loss is the batch mean of `per_example_loss`; the true Fisher is the expected
outer product of gradients at targets drawn with `sample` (DESIGN §3).

Example:
  >>> import jax, jax.numpy as jnp
  >>> import secondorder_optax as soo
  >>> logits = jnp.zeros((4, 3))
  >>> soo.losses.softmax_cross_entropy.per_example_loss(logits, jnp.array([0, 1, 2, 0])).shape
  (4,)
  >>> soo.losses.softmax_cross_entropy.sample(jax.random.key(0), logits).shape
  (4,)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossFamily:
  """A negative log-likelihood with a sampler.

  Attributes:
    name: the family's name.
    per_example_loss: `(outputs, targets) -> (B,)` loss of each example.
    sample: `(rng, outputs) -> targets` drawn from the predictive distribution.
    check_targets: `(outputs, targets) -> None`; raises `ValueError` naming the problem
      when the targets do not fit the outputs.
    one_categorical: `(outputs) -> bool` (static, from the shape): whether each example's
      loss is the negative log-likelihood of one categorical distribution, so that the
      exact empirical Fisher of a step is a model of the loss (`soo.clip_by_kl` caps steps
      with it). Default: never.
  """

  name: str
  per_example_loss: Callable[[Array, Array], Array]
  sample: Callable[[jax.Array, Array], Array]
  check_targets: Callable[[Array, Array], None]
  one_categorical: Callable[[Array], bool] = lambda outputs: False

  def __repr__(self) -> str:
    return f"LossFamily({self.name})"


def _sum_per_example(x: Array) -> Array:
  return x.reshape((x.shape[0], -1)).sum(axis=1)


def _check_same_shape(name: str):
  def check(outputs, targets):
    if tuple(targets.shape) != tuple(outputs.shape):
      raise ValueError(
          f"{name}: targets of shape {tuple(targets.shape)} do not match model outputs of "
          f"shape {tuple(outputs.shape)}; the targets must have the outputs' shape.")
  return check


def _check_integer_labels(outputs, targets):
  if tuple(targets.shape) != tuple(outputs.shape[:-1]):
    raise ValueError(
        "softmax_cross_entropy: integer labels of shape "
        f"{tuple(targets.shape)} do not match logits of shape {tuple(outputs.shape)}; "
        f"expected labels of shape {tuple(outputs.shape[:-1])} (one class index per row).")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(
        f"softmax_cross_entropy: labels must be integer class indices, got dtype "
        f"{targets.dtype} (one-hot targets are not accepted).")


def _softmax_ce(outputs, targets):
  logits = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
  return _sum_per_example(
      optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def _softmax_sample(rng, outputs):
  return jax.random.categorical(rng, outputs.astype(jnp.float32), axis=-1)


def _sigmoid_bce(outputs, targets):
  logits = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
  return _sum_per_example(optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype)))


def _sigmoid_sample(rng, outputs):
  probs = jax.nn.sigmoid(outputs.astype(jnp.float32))
  return jax.random.bernoulli(rng, probs).astype(outputs.dtype)


def _squared_error(outputs, targets):
  diff = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32)) - targets
  return _sum_per_example(0.5 * diff**2)


def _gaussian_sample(rng, outputs):
  noise = jax.random.normal(rng, outputs.shape, jnp.float32)
  return (outputs.astype(jnp.float32) + noise).astype(outputs.dtype)


softmax_cross_entropy = LossFamily(
    name="softmax_cross_entropy",
    per_example_loss=_softmax_ce,
    sample=_softmax_sample,
    check_targets=_check_integer_labels,
    one_categorical=lambda outputs: outputs.ndim == 2,
)

sigmoid_binary_cross_entropy = LossFamily(
    name="sigmoid_binary_cross_entropy",
    per_example_loss=_sigmoid_bce,
    sample=_sigmoid_sample,
    check_targets=_check_same_shape("sigmoid_binary_cross_entropy"),
    one_categorical=lambda outputs: math.prod(outputs.shape[1:]) == 1,
)

squared_error = LossFamily(
    name="squared_error",
    per_example_loss=_squared_error,
    sample=_gaussian_sample,
    check_targets=_check_same_shape("squared_error"),
)
