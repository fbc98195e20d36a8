"""Refresh periods that grow: frequent refreshes early, sparse ones later (DESIGN §2a).

A method's `stats_every` / `inverse_every` is an integer, or a schedule `count -> period`;
the engine refreshes at steps where `count % period(count) == 0`. `growing_period(every)`
starts at period 1 and doubles it after every `refreshes_per_stage` refreshes until it
reaches `every`: with the default 2 per stage, refreshes at steps 0, 1, 2, 4, 8, 12, 16,
24, 32, 48, 64, 96, then every `every` steps (50: 150, 200, ...). A run of a few dozen
steps sees its preconditioner rebuilt as often as a fixed period of a few steps would, while
a run of thousands pays for `1 / every` refreshes per step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Period = Union[int, Array, Callable[[Array], Array]]


@dataclasses.dataclass(frozen=True)
class GrowingPeriod:
  """A refresh period `count -> 1, 2, 4, ...` capped at `every` (see `growing_period`).

  Example:
    >>> import secondorder_optax as soo
    >>> period = soo.GrowingPeriod(every=4, refreshes_per_stage=1)
    >>> [int(period(step)) for step in range(8)]
    [1, 2, 2, 4, 4, 4, 4, 4]
  """

  every: int
  refreshes_per_stage: int = 2

  def __call__(self, count: Array) -> Array:
    stage = jnp.asarray(count, jnp.int32) // self.refreshes_per_stage + 1  # 1, 1, 2, 2, ...
    largest_power_of_two = jnp.left_shift(jnp.int32(1), 31 - lax.clz(stage))
    return jnp.minimum(largest_power_of_two, self.every)


def _check_positive_int(name: str, value: object) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"growing_period: {name} must be an integer >= 1, got {value!r}")


def growing_period(every: int, *, refreshes_per_stage: int = 2) -> GrowingPeriod:
  """A refresh period that starts at 1 and doubles up to `every`.

  Pass it as `stats_every=` or `inverse_every=` of any method: the refresh runs at steps
  where `count % period(count) == 0`. The period is 1 for the first `refreshes_per_stage`
  steps and doubles after every `refreshes_per_stage` refreshes until it reaches `every`.
  Early in training, when the curvature changes fastest and its estimate has seen few
  batches, the preconditioner is rebuilt often; later the refreshes cost `1 / every` of a
  step's work.

  Args:
    every: the largest period (an integer >= 1).
    refreshes_per_stage: refreshes at each period before it doubles (an integer >= 1).

  Returns:
    A callable `count -> period` (an int32 array), usable as a refresh period.

  Example:
    >>> import secondorder_optax as soo
    >>> period = soo.growing_period(50)
    >>> [int(period(step)) for step in (0, 1, 2, 5, 10, 40, 100, 1000)]
    [1, 1, 2, 2, 4, 16, 32, 50]
    >>> [step for step in range(70) if step % int(period(step)) == 0]
    [0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    >>> tx = soo.kfac(inverse_every=period)
  """
  _check_positive_int("every", every)
  _check_positive_int("refreshes_per_stage", refreshes_per_stage)
  return GrowingPeriod(every=every, refreshes_per_stage=refreshes_per_stage)


# A period no training run reaches: `count % NEVER == 0` only at step 0.
NEVER = 2**30


@dataclasses.dataclass(frozen=True)
class WhileGrowing:
  """`period(count)` while it is below `period.every`, `NEVER` once it has reached it (see
  `while_growing`)."""

  period: GrowingPeriod

  def __call__(self, count: Array) -> Array:
    value = self.period(count)
    return jnp.where(value < self.period.every, value, jnp.int32(NEVER))


def while_growing(period: Period) -> Period:
  """The refreshes of a growing period, only while it grows (for momentum restarts).

  The full optimizers' momentum restarts at their refreshes while `inverse_every` grows
  (with `growing_period(50)`: up to step 96) and then runs on as one debiased average:
  later restarts, one every 50 steps, each left the next steps unaveraged; they raised
  MBF's loss (docs/defaults.md, tenth round) and cost the KFAC family and TNT 0.09–0.13
  after ten epochs of the MNIST autoencoder (eleventh round). An integer or any other
  schedule is returned unchanged.

  Example:
    >>> from secondorder_optax._src import periods
    >>> restarts = periods.while_growing(periods.GrowingPeriod(4, refreshes_per_stage=1))
    >>> [step for step in range(12) if step % int(restarts(step)) == 0]
    [0, 2]
  """
  return WhileGrowing(period) if isinstance(period, GrowingPeriod) else period


# The defaults of the KFAC family, TNT, MBF and Shampoo (docs/defaults.md, "Third round").
STATS_EVERY = GrowingPeriod(every=5)
INVERSE_EVERY = GrowingPeriod(every=50)
