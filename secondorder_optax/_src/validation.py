"""Hyperparameter validation: one rule per argument, shared by every method.

Each rule checks a value given at construction and raises a `ValueError` that names the
method and the argument. Values that cannot be checked there (arrays traced by
`optax.inject_hyperparams`, optax schedules) pass; the engine guards what matters at run time
(a refresh with a negative traced damping fails and keeps the previous preconditioner).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

FISHER_KINDS = ("sampled", "empirical")


def concrete(value: Any) -> Optional[float]:
  """The number held by `value`, or `None` when it is traced, a schedule or not a scalar."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Number):
    return value
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    return np.asarray(value).item()
  return None


def check_damping(method: str, value: Any, *, positive: bool = False) -> None:
  """`damping >= 0` (`> 0` where the method divides by it)."""
  number = concrete(value)
  if number is None:
    if value is None:
      raise ValueError(f"{method}: damping must be a number, an array or a schedule, got None")
    return
  if positive and not number > 0:
    raise ValueError(f"{method}: damping must be > 0, got {number}")
  if not number >= 0:
    raise ValueError(f"{method}: damping must be >= 0, got {number}")


def check_period(method: str, name: str, value: Any) -> None:
  """Refresh periods (`stats_every`, `inverse_every`): integers >= 1, traced, or schedules
  `count -> period` (such as `soo.growing_period(50)`, checked at step 0)."""
  number = value(0) if callable(value) else value  # a schedule: its period at step 0
  if isinstance(number, jax.core.Tracer):
    return
  number = concrete(number)
  if number is None or isinstance(number, bool) or int(number) != number or number < 1:
    raise ValueError(f"{method}: {name} must be an integer >= 1 or a schedule of integers "
                     f">= 1, got {value!r}")


def check_decay(method: str, value: Any, *, allow_none: bool = False) -> None:
  """`stats_decay` in `[0, 1)` (`None` where the method sums its statistics)."""
  if value is None and allow_none:
    return
  number = concrete(value)
  if number is None:
    if value is None:
      raise ValueError(f"{method}: stats_decay must be a number in [0, 1), got None")
    return
  if not 0 <= number < 1:
    raise ValueError(f"{method}: stats_decay must be in [0, 1), got {number}")


def check_unit_interval(method: str, name: str, value: Any) -> None:
  """A decay such as Adam's `b1`, `b2` in `[0, 1)` (or traced, or a schedule)."""
  number = concrete(value)
  if number is None:
    if value is None:
      raise ValueError(f"{method}: {name} must be a number in [0, 1), got None")
    return
  if not 0 <= number < 1:
    raise ValueError(f"{method}: {name} must be in [0, 1), got {number}")


def check_fisher(method: str, value: Any) -> None:
  if value not in FISHER_KINDS:
    raise ValueError(f"{method}: fisher must be one of {FISHER_KINDS}, got {value!r}")


def check_structural_int(method: str, name: str, value: Any, minimum: int = 1) -> Optional[int]:
  """An integer that fixes state shapes (block sizes, factor limits, example counts).

  Returns the integer, or `None` when it is traced (`optax.inject_hyperparams` inside
  `jit`): the method then reads the structure from its state, which `init` built from the
  concrete value.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  number = concrete(value)
  if number is None or isinstance(number, bool) or int(number) != number or number < minimum:
    raise ValueError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")
  return int(number)


def check_at_least(method: str, name: str, value: Any, minimum: float) -> None:
  """A number `>= minimum` (or traced: `optax.inject_hyperparams` inside `jit`)."""
  if isinstance(value, jax.core.Tracer):
    return
  number = concrete(value)
  if number is None or isinstance(number, bool) or not number >= minimum:
    raise ValueError(f"{method}: {name} must be a number >= {minimum}, got {value!r}")


def check_flag(method: str, name: str, value: Any) -> bool:
  """A Python-level switch (e.g. `pi_correction`); concrete arrays are accepted."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{method}: {name} switches code paths and cannot be traced; with "
                     f"optax.inject_hyperparams pass static_args=('{name}',)")
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  number = concrete(value)
  if number is None or number not in (0, 1):
    raise ValueError(f"{method}: {name} must be True or False, got {value!r}")
  return bool(number)


def check_preconditioner_dtype(method: str, dtype: Any) -> Any:
  """`None` or a floating dtype."""
  if dtype is None:
    return None
  try:
    checked = jnp.dtype(dtype)
  except TypeError:
    checked = None
  if checked is None or not jnp.issubdtype(checked, jnp.floating):
    raise ValueError(f"{method}: preconditioner_dtype must be a floating dtype such as "
                     f"jnp.bfloat16 or jnp.float32, got {dtype!r}")
  return checked


def check_schedule(method: str, *, damping: Any, stats_decay: Any, stats_every: Any,
                   inverse_every: Any, positive_damping: bool = False,
                   summed_statistics: bool = False) -> None:
  """The arguments every method shares: damping, statistics decay and refresh periods."""
  check_damping(method, damping, positive=positive_damping)
  check_decay(method, stats_decay, allow_none=summed_statistics)
  check_period(method, "stats_every", stats_every)
  check_period(method, "inverse_every", inverse_every)
