"""Momentum that averages directions of one preconditioner only (DESIGN §6).

A second-order method's momentum is an exponential moving average of its preconditioned
directions. When the preconditioner is refreshed, the directions before and after the refresh
are measured in different metrics; early in training, where `soo.growing_period` refreshes at
steps 0, 1, 2, 4, 8, ..., an average over ten steps mixes up to five preconditioners and lags
behind all of them. `restarting_ema` starts the average afresh at every refresh step: after a
refresh the step is the fresh direction, and between refreshes it is the debiased average of
the directions since.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from secondorder_optax._src import engine


class RestartingEmaState(NamedTuple):
  """State of `restarting_ema`.

  Attributes:
    count: finite steps seen (the preconditioner's step count).
    since_restart: steps averaged since the last restart (for the debiasing).
    ema: the average, not debiased.
  """

  count: jax.Array
  since_restart: jax.Array
  ema: Any


def restarting_ema(decay: float, *, restart_every: Any) -> optax.GradientTransformation:
  """A debiased EMA of the updates that restarts at the steps a refresh period names.

  At steps where `count % period(count) == 0` (the steps at which a method with
  `inverse_every=restart_every` refreshes its preconditioner) the average forgets the past;
  in between it is `optax.ema(decay, debias=True)` of the updates since the restart.

  Args:
    decay: β of the average, in [0, 1).
    restart_every: a refresh period: an integer or a schedule `count -> period` such as
      `soo.growing_period(50)`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> tx = soo.restarting_ema(0.5, restart_every=2)
    >>> state = tx.init(jnp.zeros(()))
    >>> outs = []
    >>> for g in (1.0, 3.0, 5.0):
    ...   out, state = tx.update(jnp.asarray(g), state)
    ...   outs.append(round(float(out), 3))
    >>> outs  # restart at steps 0 and 2; step 1 averages 1 and 3 with weights 1/3, 2/3
    [1.0, 2.333, 5.0]
  """
  if isinstance(decay, (int, float)) and not 0 <= decay < 1:  # (traced under inject_hyperparams)
    raise ValueError(f"restarting_ema: decay must be in [0, 1), got {decay!r}")

  def init_fn(params):
    # Two buffers, not one array twice: a state passed to a `jit` with donated arguments
    # must not hold the same buffer in two leaves.
    return RestartingEmaState(count=jnp.zeros((), jnp.int32),
                              since_restart=jnp.zeros((), jnp.int32),
                              ema=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    restart = engine.is_due(state.count, engine.period_value(restart_every, state.count))
    since_restart = jnp.where(restart, 0, state.since_restart) + 1
    ema = jax.tree.map(
        lambda old, new: (jnp.where(restart, 0, decay * old) + (1 - decay) * new
                          ).astype(old.dtype), state.ema, updates)
    debias = 1 - decay ** since_restart.astype(jnp.float32)
    out = jax.tree.map(lambda average: (average / debias).astype(average.dtype), ema)
    return out, RestartingEmaState(count=state.count + 1, since_restart=since_restart, ema=ema)

  return optax.GradientTransformation(init_fn, update_fn)
