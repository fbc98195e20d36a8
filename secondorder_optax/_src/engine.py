"""The refresh engine: the one loop under every method (DESIGN §2a, §6).

Every second-order method here is the same loop with different math. A method is an
`Algorithm`, a frozen dataclass that supplies, for one *unit* (a captured layer, or a
parameter leaf):

* `statistics(unit, data)`: the batch statistics (KFAC's `A`, `G`; MBF's mini-block Grams);
* `refresh(unit, statistics, damping, data)`: the blocks to refresh (inversions,
  eigendecompositions, roots), and how the solved blocks form the preconditioner;
* `solve(block)`: one block's refresh (the engine runs it batched);
* `apply(unit, preconditioner, statistics, grad, damping)`: the direction (every step);
* optionally `track(...)`: cheap preconditioner statistics re-estimated at every
  statistics step in the current preconditioner (EKFAC's eigenvalue corrections);
* optionally `step(...)`: per-step state kept in the preconditioner and advanced with every
  finite gradient, before `apply` (SOAP's Adam moments in its eigenbasis); with
  `step_reads_data` the step also reads the unit's captured data, then read at every step
  (K-BFGS's secant pairs).

The engine owns everything else, once: the step `count`; the finite-gradient gate (a step
with non-finite gradients leaves the state as it is); the `stats_every` / `inverse_every`
schedule under `lax.cond`, so steps without a refresh do no refresh work; running averages
whose first *finite* statistic initialises them (a non-finite one is dropped and leaves them
unset); reading the captured data exactly once per statistics step (the deferred
sampled-target backward pass runs there and nowhere else); bucketing the blocks of every
unit by shape into one batched call per shape; and the reliability floor: the initial
preconditioner is a valid one (identity), a unit whose refresh is non-finite, or unusable
(a method's `solve` marks it non-finite), or made with a negative damping, keeps its
previous preconditioner and counts a failure.

Which units a method has, how gradients are viewed per unit and where the data comes from
is a `Coverage` (`layerwise.LayerCoverage`, `tensor_modes.LeafCoverage`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable, ClassVar, Dict, Hashable, NamedTuple, Optional, Tuple

import flax.serialization
import jax
import jax.numpy as jnp
import optax
from jax import lax

from secondorder_optax._src import linalg, spread
from secondorder_optax._src.base import (ScalarOrSchedule, all_finite, hyperparameter_value,
                                         running_average, select_tree)

Array = jax.Array
Assemble = Callable[[Dict[str, Any]], Any]


# ---------------------------------------------------------------------------------------
# What a method supplies.


class Stacked(NamedTuple):
  """A refresh block that is itself a stack of same-shape blocks (leading axis), e.g. all
  mini-blocks of one MBF layer: the engine concatenates it with other stacks of the same
  block shape instead of stacking it as one block."""

  blocks: Any


@dataclasses.dataclass(frozen=True)
class Algorithm(abc.ABC):
  """A method's algorithm box; subclasses are frozen dataclasses of static settings.

  Class attributes:
    name: the method's name (errors, `describe`).
    positive_damping: the method divides by the damping (a refresh needs `damping > 0`).
    refresh_reads_data: `refresh` reads the captured data (SENG), so it runs where the data
      is read.
    step_reads_data: `step` reads the captured data (K-BFGS's secant pairs), so the data is
      read at every step, and `step` gets `data=` and `statistics=`; a unit whose stepped
      state is not finite keeps its previous one.
  """

  name: ClassVar[str] = ""
  positive_damping: ClassVar[bool] = False
  refresh_reads_data: ClassVar[bool] = False
  step_reads_data: ClassVar[bool] = False

  def init_statistics(self, unit: Any) -> Any:
    """Initial (unset) statistics of a unit; `()` for a method without statistics."""
    return ()

  @abc.abstractmethod
  def init_preconditioner(self, unit: Any) -> Any:
    """A valid initial preconditioner (the identity: a plain gradient step)."""

  def statistics(self, unit: Any, data: Any) -> Any:
    """The batch statistics of a unit from its captured data."""
    return ()

  @abc.abstractmethod
  def refresh(self, unit: Any, statistics: Any, previous: Any, damping: Array,
              data: Any) -> Tuple[Dict[str, Any], Assemble]:
    """`(blocks, assemble)`: the blocks to `solve` (each a pytree, or a `Stacked` one) and a
    function from the solved blocks (same names) to the new preconditioner. `previous` is
    the unit's current preconditioner; `data` its captured data where
    `refresh_reads_data`, else `None`."""

  @abc.abstractmethod
  def solve(self, block: Any) -> Any:
    """The refresh of one block (inverse, eigenbasis, root); non-finite where unusable."""

  def track(self, unit: Any, preconditioner: Any, data: Any, decay: Array,
            first: Array) -> Any:
    """Cheap statistics of the current preconditioner, re-estimated at every statistics step
    and after every refresh; the default tracks nothing."""
    return preconditioner

  @property
  def tracks(self) -> bool:
    return type(self).track is not Algorithm.track

  def step(self, unit: Any, preconditioner: Any, grad: Array,
           hyperparameters: Dict[str, Array]) -> Any:
    """The preconditioner with its per-step state advanced by this step's gradient (every
    step with finite gradients, after this step's refresh and before `apply`, which sees the
    advanced state); `hyperparameters` are the transformation's `step_hyperparameters`,
    read at this step. A refresh's `assemble` carries the per-step state into the new
    preconditioner (it gets it in `previous`). With `step_reads_data`, also called with
    `data=` (the unit's captured data) and `statistics=` (this step's running averages).
    The default keeps no per-step state."""
    return preconditioner

  @property
  def steps(self) -> bool:
    return type(self).step is not Algorithm.step

  @abc.abstractmethod
  def apply(self, unit: Any, preconditioner: Any, statistics: Any, grad: Array,
            damping: Array) -> Array:
    """The preconditioned direction of a unit (every step)."""

  def describe(self, unit: Any) -> str:
    return self.name


class Settings(NamedTuple):
  """The step's hyperparameters as arrays (any may be traced by `inject_hyperparams`).

  `stats_decay=None` sums the statistics instead of averaging them (Shampoo's original);
  `step` holds the hyperparameters of `Algorithm.step` (e.g. SOAP's Adam decays).
  """

  damping: Array
  stats_decay: Optional[Array]
  stats_every: Array
  inverse_every: Array
  step: Dict[str, Array]


def period_value(every: Any, count: Array) -> Array:
  """A refresh period at step `count`: an integer, or a schedule such as
  `soo.growing_period` (never below 1)."""
  return jnp.maximum(hyperparameter_value(every, count, jnp.int32), 1)


def settings(count: Array, *, damping: ScalarOrSchedule, stats_decay: Any, stats_every: Any,
             inverse_every: Any, step_hyperparameters: Optional[Dict[str, Any]] = None
             ) -> Settings:
  """Reads hyperparameters that may be numbers, arrays or optax schedules of `count`."""
  return Settings(
      damping=hyperparameter_value(damping, count),
      stats_decay=None if stats_decay is None else hyperparameter_value(stats_decay, count),
      stats_every=period_value(stats_every, count),
      inverse_every=period_value(inverse_every, count),
      step={name: hyperparameter_value(value, count)
            for name, value in (step_hyperparameters or {}).items()})


# ---------------------------------------------------------------------------------------
# State.


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What a state was built for (static: part of the state's tree structure, no arrays).

  Attributes:
    leaf_shapes: `((leaf path key, shape), ...)` of the parameters `init` saw.
    algorithm: the method (`soo.describe` reads it, through any optax wrapper).
    coverage: which units it preconditions.
    fallback_name: the fallback transformation's name.
  """

  leaf_shapes: Tuple[Tuple[str, Tuple[int, ...]], ...]
  algorithm: Algorithm
  coverage: "Coverage"
  fallback_name: str

  def leaf_rules(self, params: Any, captured: Optional[Any] = None) -> Dict[Tuple[Any, ...], str]:
    """`{leaf path: rule}` for `soo.describe` (`captured`: layer paths a curvature records)."""
    units = self.coverage.units(self.algorithm.name, params, None)
    return self.coverage.leaf_rules(self.algorithm, params, units, self.fallback_name,
                                    captured)


# Static structure: checkpoints (flax.serialization) store nothing for it and restoring keeps
# the target state's.
flax.serialization.register_serialization_state(
    StateSpec, ty_to_state_dict=lambda spec: {}, ty_from_state_dict=lambda spec, _: spec)


class PreconditionerState(NamedTuple):
  """State of every method of this library.

  Attributes:
    count: steps taken with finite gradients (the refresh schedule's step).
    statistics_count: statistics updates accepted so far (0: the running averages are
      unset; the first finite statistic initialises them).
    statistics: per unit (`"Dense_0"` for a layer, `"Dense_0/kernel"` for a leaf), the
      running averages of the method's statistics.
    preconditioner: per unit, the preconditioner of the last successful refresh (the
      identity before the first); for a method with per-step state (`Algorithm.step`:
      SOAP's Adam moments) that state too, advanced at every finite step.
    failures: refreshes that failed (non-finite or unusable result, or a negative damping);
      each kept the unit's previous preconditioner.
    fallback: state of the fallback transformation on the leaves no unit covers.
    spec: what the state was built for (static: the parameter shapes, for clear errors, and
      the method, for `soo.describe`).

  Example:
    >>> import jax.numpy as jnp, secondorder_optax as soo
    >>> state = soo.scale_by_kfac(damping=1e-3).init({"Dense_0": {"kernel": jnp.ones((4, 3))}})
    >>> int(state.count), int(state.failures), sorted(state.preconditioner)
    (0, 0, ['Dense_0'])
    >>> state.preconditioner["Dense_0"].input_inverse  # the identity until the first refresh
    Array([[1., 0., 0., 0.],
           [0., 1., 0., 0.],
           [0., 0., 1., 0.],
           [0., 0., 0., 1.]], dtype=float32)
  """

  count: Array
  statistics_count: Array
  statistics: Dict[str, Any]
  preconditioner: Dict[str, Any]
  failures: Array
  fallback: Any
  spec: StateSpec


def check_leaf_shapes(method: str, expected: Tuple[Tuple[str, Tuple[int, ...]], ...],
                      updates: Any) -> None:
  """`ValueError` naming the first leaf whose shape differs from what `init` saw."""
  from secondorder_optax._src import layerwise  # pylint: disable=g-import-not-at-top
  got = tuple((layerwise.path_to_str(p), tuple(jnp.shape(x)))
              for p, x in layerwise.leaf_paths(updates).items())
  if got == expected:
    return
  held = dict(expected)
  for key, shape in got:
    if key not in held:
      raise ValueError(f"{method}: {key} is not in the optimizer state (init saw "
                       f"{sorted(held)}); was the state initialised for other parameters?")
    if held[key] != shape:
      raise ValueError(f"{method}: {key}: state holds {held[key]}, updates have {shape}; "
                       f"was the state initialised for other parameters?")
  missing = sorted(set(held) - {key for key, _ in got})
  raise ValueError(f"{method}: the updates lack {missing}, which init saw; was the state "
                   f"initialised for other parameters?")


# ---------------------------------------------------------------------------------------
# Batched refresh with keep-previous-on-failure.


def _stack_signature(stack: Any) -> Hashable:
  """What must agree for stacks to be joined: structure, and each leaf's block shape/dtype."""
  leaves, treedef = jax.tree.flatten(stack)
  return (treedef, tuple((tuple(x.shape[1:]), x.dtype.name) for x in leaves))


def solve_blocks(solve: Callable[[Any], Any], blocks: Dict[Hashable, Any]) -> Dict[Hashable, Any]:
  """`solve` on every block, one `vmap`ped call per block shape.

  Plain blocks of one shape are stacked; `Stacked` blocks are concatenated with the others
  of their block shape. The calls of different shapes run one after another
  (`linalg.after`): concurrent batched LAPACK calls can deadlock a small XLA:CPU pool.
  Under an ambient mesh (`jax.set_mesh`) each call is split over the devices along the stack
  axis (`spread.map_stack`).
  """
  stacks = {key: (b.blocks if isinstance(b, Stacked) else jax.tree.map(lambda x: x[None], b))
            for key, b in blocks.items()}
  groups: Dict[Hashable, list] = {}
  for key, stack in stacks.items():
    groups.setdefault(_stack_signature(stack), []).append(key)
  batched = jax.vmap(solve)
  results, previous = {}, None
  for keys in groups.values():
    sizes = [jax.tree.leaves(stacks[k])[0].shape[0] for k in keys]
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[stacks[k] for k in keys])
    previous = spread.map_stack(batched, linalg.after(joined, previous))
    start = 0
    for key, size in zip(keys, sizes):
      part = jax.tree.map(lambda x, a=start, b=start + size: x[a:b], previous)
      results[key] = part if isinstance(blocks[key], Stacked) else jax.tree.map(
          lambda x: x[0], part)
      start += size
  return results


def refresh_units(algorithm: Algorithm, units: Dict[str, Any], statistics: Dict[str, Any],
                  previous: Dict[str, Any], damping: Array,
                  data: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], Array]:
  """New preconditioners of every unit; a unit whose new one is not finite (or whose damping
  is invalid) keeps its previous one, in the previous dtypes, and counts one failure."""
  blocks, assemblers, names = {}, {}, {}
  for key, unit in units.items():
    unit_blocks, assemblers[key] = algorithm.refresh(
        unit, statistics[key], previous[key], damping, None if data is None else data[key])
    names[key] = tuple(unit_blocks)
    blocks.update({(key, name): block for name, block in unit_blocks.items()})
  solved = solve_blocks(algorithm.solve, blocks)
  valid_damping = damping > 0 if algorithm.positive_damping else damping >= 0
  new, failures = {}, jnp.zeros((), jnp.int32)
  for key in units:
    fresh = assemblers[key]({name: solved[(key, name)] for name in names[key]})
    ok = _changed_leaves_finite(fresh, previous[key]) & valid_damping
    new[key] = _keep_unless(ok, fresh, previous[key])
    failures = failures + (~ok).astype(jnp.int32)
  return new, failures


# ---------------------------------------------------------------------------------------
# One step.


def is_due(count: Array, every: Array) -> Array:
  """True at steps where `count % every == 0` (step 0 always; `every` is this step's
  period)."""
  return count % every == 0


def _accumulate(old: Any, new: Any, decay: Optional[Array], first: Array) -> Any:
  if decay is None:
    return jax.tree.map(lambda o, n: jnp.where(first, n, o + n).astype(o.dtype), old, new)
  return running_average(old, new, decay, first)


def _new_statistics(algorithm, units, data, statistics, count, decay):
  """Running averages with this batch's statistics, or the old ones (and no count) where
  any is not finite."""
  batch = {key: algorithm.statistics(unit, data[key]) for key, unit in units.items()}
  averaged = _accumulate(statistics, batch, decay, count == 0)
  ok = all_finite(averaged)
  return select_tree(ok, averaged, statistics), count + ok.astype(count.dtype)


def _keep_unless(ok: Array, new: Any, old: Any) -> Any:
  """`new` where `ok`, else `old` (in `old`'s dtypes); leaves `new` passes through unchanged
  (the same traced value as in `old`) are neither checked nor selected."""
  return jax.tree.map(lambda n, o: o if n is o else jnp.where(ok, n.astype(o.dtype), o),
                      new, old)


def _changed_leaves_finite(new: Any, old: Any) -> Array:
  changed = [n for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old)) if n is not o]
  return all_finite(changed)


def _tracked(algorithm, units, data, preconditioner, decay, first):
  tracked = {key: algorithm.track(unit, preconditioner[key], data[key], decay, first)
             for key, unit in units.items()}
  return _keep_unless(_changed_leaves_finite(tracked, preconditioner), tracked,
                      preconditioner)


class _Refreshed(NamedTuple):
  statistics: Dict[str, Any]
  statistics_count: Array
  preconditioner: Dict[str, Any]
  failures: Array


def refresh_state(algorithm: Algorithm, units: Dict[str, Any], read_data: Callable[[], Any],
                  state: PreconditionerState, active: Array, hyper: Settings) -> _Refreshed:
  """Statistics and preconditioners after this step's refreshes, each under `lax.cond`.

  `read_data()` (the captured data per unit) is called once, inside the branch that needs
  it, so a deferred sampled-target backward pass runs only at statistics steps.
  """
  count = state.count
  stats_due = is_due(count, hyper.stats_every) & active
  refresh_due = is_due(count, hyper.inverse_every) & active
  no_failures = jnp.zeros((), jnp.int32)
  has_statistics = bool(jax.tree.leaves(state.statistics))
  decay = hyper.stats_decay

  def statistics_step(data: Callable[[], Any]):
    """This step's statistics; `data()` is traced only in the branch that updates them."""
    keep = lambda: (state.statistics, state.statistics_count)
    if not has_statistics:
      return keep()
    return lax.cond(stats_due,
                    lambda: _new_statistics(algorithm, units, data(), state.statistics,
                                            state.statistics_count, decay), keep)

  def preconditioner_update(statistics, statistics_count, data):
    ready = refresh_due & (statistics_count > 0 if has_statistics else True)
    return lax.cond(ready,
                    lambda: refresh_units(algorithm, units, statistics, state.preconditioner,
                                          hyper.damping, data),
                    lambda: (state.preconditioner, no_failures))

  if not (algorithm.tracks or algorithm.refresh_reads_data):
    # Statistics read the data; the refresh works from the statistics alone.
    statistics, statistics_count = statistics_step(read_data)
    preconditioner, failures = preconditioner_update(statistics, statistics_count, None)
    return _Refreshed(statistics, statistics_count, preconditioner, failures)

  def with_data():
    data = read_data()
    statistics, statistics_count = statistics_step(lambda: data)  # refresh-only steps too
    preconditioner, failures = preconditioner_update(
        statistics, statistics_count, data if algorithm.refresh_reads_data else None)
    if algorithm.tracks:
      preconditioner = _tracked(algorithm, units, data, preconditioner,
                                0.0 if decay is None else decay, state.statistics_count == 0)
    return _Refreshed(statistics, statistics_count, preconditioner, failures)

  data_due = refresh_due | (stats_due & (has_statistics or algorithm.tracks))
  return lax.cond(data_due, with_data,
                  lambda: _Refreshed(state.statistics, state.statistics_count,
                                     state.preconditioner, no_failures))


# ---------------------------------------------------------------------------------------
# The transformation.


class Coverage(abc.ABC):
  """Which units a method preconditions and how it sees them (hashable, static)."""

  @abc.abstractmethod
  def units(self, method: str, params: Any, statistics: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The units of `params` (at `init`, `statistics` is None)."""

  @abc.abstractmethod
  def source(self, method: str, updates: Any, units: Dict[str, Any], curvature: Any,
             extra_args: Dict[str, Any]) -> Any:
    """What the data of `units` (this step's `present` ones) is read from (checked now,
    with clear errors)."""

  @abc.abstractmethod
  def read(self, source: Any, units: Dict[str, Any]) -> Dict[str, Any]:
    """The data of every unit (inside the statistics branch; called once per step)."""

  @abc.abstractmethod
  def gather(self, updates: Any, units: Dict[str, Any]) -> Dict[str, Array]:
    """Each unit's gradient in the view its method works in (float32 at least)."""

  @abc.abstractmethod
  def scatter(self, directions: Dict[str, Array], updates: Any, units: Dict[str, Any]) -> Any:
    """`updates` with each unit's leaves replaced by its direction (in the leaves' dtypes)."""

  def present(self, units: Dict[str, Any], curvature: Any) -> Dict[str, Any]:
    """The units this step preconditions (default: all); the others keep their state and
    pass their updates through."""
    del curvature
    return units

  def uncovered(self, params: Any, units: Dict[str, Any]) -> Any:
    """Mask of the leaves no unit covers (they go to the fallback); `None` if none."""
    return None

  @abc.abstractmethod
  def leaf_rules(self, algorithm: Algorithm, params: Any, units: Dict[str, Any],
                 fallback_name: str, captured: Optional[Any] = None
                 ) -> Dict[Tuple[Any, ...], str]:
    """`{leaf path: rule}` for `soo.describe` (`captured`: the layer paths a curvature
    records, when known)."""


@functools.partial(jax.jit, static_argnames=("algorithm", "coverage", "unit_items"))
def _step(updates, source, state: PreconditionerState, hyper: Settings, *,
          algorithm: Algorithm, coverage: Coverage, unit_items):
  """One step of the engine on the covered units; compiled once per model, so eager use
  is fast too."""
  units = dict(unit_items)
  active = all_finite(updates)
  grads = coverage.gather(updates, units)
  if algorithm.step_reads_data:  # the per-step state needs the data at every step
    data = coverage.read(source, units)
    read_data = lambda: data
  else:
    read_data = lambda: coverage.read(source, units)
  refreshed = refresh_state(algorithm, units, read_data, state, active, hyper)
  preconditioner = refreshed.preconditioner
  if algorithm.steps:
    data_args = lambda key: ({"data": data[key], "statistics": refreshed.statistics[key]}
                             if algorithm.step_reads_data else {})
    preconditioner = {key: algorithm.step(unit, preconditioner[key], grads[key], hyper.step,
                                          **data_args(key))
                      for key, unit in units.items()}
    if algorithm.step_reads_data:  # a unit whose stepped state is not finite keeps its own
      preconditioner = {key: _keep_unless(
          _changed_leaves_finite(preconditioner[key], refreshed.preconditioner[key]),
          preconditioner[key], refreshed.preconditioner[key]) for key in units}
    refreshed = refreshed._replace(
        preconditioner=_keep_unless(active, preconditioner, refreshed.preconditioner))
  directions = {key: algorithm.apply(unit, preconditioner[key], refreshed.statistics[key],
                                     grads[key], hyper.damping)
                for key, unit in units.items()}
  out = coverage.scatter(directions, updates, units)
  return out, active, refreshed


def _only(state: PreconditionerState, units: Dict[str, Any]) -> PreconditionerState:
  """`state` with the statistics and preconditioners of `units` only."""
  if len(units) == len(state.preconditioner):
    return state
  pick = lambda tree: {key: value for key, value in tree.items() if key in units}
  return state._replace(statistics=pick(state.statistics),
                        preconditioner=pick(state.preconditioner))


def transformation(algorithm: Algorithm, coverage: Coverage, *, damping: ScalarOrSchedule,
                   stats_decay: Any, stats_every: Any, inverse_every: Any,
                   fallback: Optional[optax.GradientTransformation] = None,
                   step_hyperparameters: Optional[Dict[str, ScalarOrSchedule]] = None,
                   ) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of `algorithm` over `coverage`'s units.

  `update(updates, state, params=None, *, curvature=None, **extra_args)`; leaves outside
  the units go through `fallback` (default `optax.identity()`). `step_hyperparameters`
  (numbers, arrays or schedules, by name) are read at every step for `Algorithm.step`.
  """
  from secondorder_optax._src import layerwise  # pylint: disable=g-import-not-at-top
  fallback = optax.identity() if fallback is None else fallback
  fallback_name = layerwise.transform_name(fallback)
  method = algorithm.name

  def masked_fallback(params, units):
    mask = coverage.uncovered(params, units)
    return None if mask is None else optax.masked(fallback, mask)

  def init_fn(params):
    params = layerwise.to_pure(params)
    units = coverage.units(method, params, None)
    fb = masked_fallback(params, units)
    shapes = tuple((layerwise.path_to_str(p), tuple(jnp.shape(x)))
                   for p, x in layerwise.leaf_paths(params).items())
    return PreconditionerState(
        count=jnp.zeros((), jnp.int32),
        statistics_count=jnp.zeros((), jnp.int32),
        statistics={k: algorithm.init_statistics(u) for k, u in units.items()},
        preconditioner={k: algorithm.init_preconditioner(u) for k, u in units.items()},
        failures=jnp.zeros((), jnp.int32),
        fallback=optax.EmptyState() if fb is None else fb.init(params),
        spec=StateSpec(shapes, algorithm, coverage, fallback_name))

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    original = updates
    updates = layerwise.to_pure(updates)
    check_leaf_shapes(method, state.spec.leaf_shapes, updates)
    params = None if params is None else layerwise.to_pure(params)
    units = coverage.units(method, updates if params is None else params, state.statistics)
    present = coverage.present(units, curvature)
    source = coverage.source(method, updates, present, curvature, extra_args)
    hyper = settings(state.count, damping=damping, stats_decay=stats_decay,
                     stats_every=stats_every, inverse_every=inverse_every,
                     step_hyperparameters=step_hyperparameters)
    out, active, refreshed = _step(updates, source, _only(state, present), hyper,
                                   algorithm=algorithm, coverage=coverage,
                                   unit_items=tuple(present.items()))
    refreshed = refreshed._replace(  # absent units keep their state
        statistics={**state.statistics, **refreshed.statistics},
        preconditioner={**state.preconditioner, **refreshed.preconditioner})
    fb = masked_fallback(updates if params is None else params, units)
    new_fallback = state.fallback
    if fb is not None:
      out, fallback_state = fb.update(out, state.fallback, params)
      new_fallback = select_tree(active, fallback_state, state.fallback)
    new_state = state._replace(
        count=state.count + active.astype(state.count.dtype),
        statistics_count=refreshed.statistics_count, statistics=refreshed.statistics,
        preconditioner=refreshed.preconditioner,
        failures=state.failures + refreshed.failures, fallback=new_fallback)
    return layerwise.restore_like(original, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
