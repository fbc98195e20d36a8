"""optax contract checks shared by every method's tests (DESIGN §7).

`check_optax_contract(soo.kfac, learning_rate=..., damping=...)` runs, on the tiny MLP:
jit (donating params and state) with no recompilation over 30 steps, stable state structure/shapes/dtypes,
convergence, `optax.chain`, `inject_hyperparams` (learning rate and damping changed
between steps without recompiling), `MultiSteps`, `apply_if_finite` with a non-finite
gradient, and bf16 parameters. Each check asserts; a failing method fails its test.
`second_pass=True` (K-BFGS) also passes `curvature_fn=lambda p: curv_fn(p, x, y, rng)`
to every `update`, as a training loop of such a method does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import secondorder_optax as soo
from tests import models


def _problem(fisher="sampled"):
  model, params, x, y, family = models.mlp_problem(batch=32, d_in=4, classes=3, seed=3)
  # Learnable labels: a fixed random teacher.
  teacher = jax.random.normal(jax.random.key(7), (4, 3))
  y = jnp.argmax(x @ teacher, axis=-1)
  curv_fn = soo.linen_curvature(model, family, fisher=fisher)
  return params, x, y, curv_fn


def _structure(tree):
  return jax.tree.map(lambda a: (jnp.shape(a), jnp.asarray(a).dtype), tree)


def _second_pass(curv_fn, x, y, rng, second_pass):
  """`{"curvature_fn": ...}` for a method that needs the second pass, else `{}`."""
  return {"curvature_fn": lambda p: curv_fn(p, x, y, rng)} if second_pass else {}


def _make_step(tx, curv_fn, pass_curvature, donate=False, second_pass=False):
  def step(params, state, x, y, rng):
    loss, grads, curvature = curv_fn(params, x, y, rng)
    extra = {"curvature": curvature} if pass_curvature else {}
    extra.update(_second_pass(curv_fn, x, y, rng, second_pass))
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def check_jit_convergence(factory, *, steps=30, pass_curvature=True, capture_fisher="sampled",
                          second_pass=False, **hparams):
  params, x, y, curv_fn = _problem(capture_fisher)
  tx = factory(**hparams)
  state = tx.init(params)  # Eager init, then a step that donates params and state (the
  step = _make_step(tx, curv_fn, pass_curvature, donate=True,  # usual training loop).
                    second_pass=second_pass)
  first_structure = _structure(state)
  losses = []
  for i in range(steps):
    params, state, loss = step(params, state, x, y, jax.random.key(i))
    losses.append(float(loss))
  assert step._cache_size() == 1, "the step recompiled"
  assert _structure(state) == first_structure, "state structure/shapes/dtypes changed"
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], f"did not converge: {losses[0]} -> {losses[-1]}"
  return losses


def check_chain_and_inject(scale_by, full_factory, *, learning_rate, damping,
                           capture_fisher="sampled", second_pass=False, **hparams):
  """`optax.chain(clip, scale_by_<m>, scale)` and `inject_hyperparams(<m>)` both train."""
  params, x, y, curv_fn = _problem(capture_fisher)
  chained = optax.chain(optax.clip_by_global_norm(10.0), scale_by(damping=damping, **hparams),
                        optax.scale(-learning_rate))
  state = chained.init(params)
  step = _make_step(chained, curv_fn, True, second_pass=second_pass)
  p = params
  for i in range(3):
    p, state, _ = step(p, state, x, y, jax.random.key(i))
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(p))

  # The same way for every method: no static_args (structural integers are read from the
  # state where they are traced).
  injected = optax.inject_hyperparams(full_factory)(
      learning_rate=learning_rate, damping=damping, **hparams)
  state = injected.init(params)
  step = _make_step(injected, curv_fn, True, second_pass=second_pass)
  p = params
  p, state, _ = step(p, state, x, y, jax.random.key(0))
  _set_hyperparam(state, "learning_rate", learning_rate / 2)
  _set_hyperparam(state, "damping", damping * 2)
  p, state, _ = step(p, state, x, y, jax.random.key(1))
  assert step._cache_size() == 1, "changing injected hyperparameters recompiled"
  # Zero learning rate must give no movement.
  _set_hyperparam(state, "learning_rate", 0.0)
  p2, state, _ = step(p, state, x, y, jax.random.key(2))
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _set_hyperparam(state, name, value):
  old = state.hyperparams[name]
  state.hyperparams[name] = jnp.asarray(value, dtype=old.dtype)


def check_multisteps_and_nonfinite(factory, capture_fisher="sampled", second_pass=False,
                                   **hparams):
  """`MultiSteps` accumulates; a NaN gradient leaves params and state untouched."""
  params, x, y, curv_fn = _problem(capture_fisher)
  multi = optax.MultiSteps(factory(**hparams), every_k_schedule=2)
  state = multi.init(params)
  step = _make_step(multi, curv_fn, True, second_pass=second_pass)
  p1, state, _ = step(params, state, x, y, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # accumulating
  p2, state, _ = step(p1, state, x, y, jax.random.key(1))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)))

  tx = optax.apply_if_finite(factory(**hparams), max_consecutive_errors=5)
  state = tx.init(params)
  loss, grads, curvature = curv_fn(params, x, y, jax.random.key(0))
  extra = _second_pass(curv_fn, x, y, jax.random.key(0), second_pass)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, new_state = tx.update(bad, state, params, curvature=curvature, **extra)
  assert int(new_state.notfinite_count) == 1
  for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Without apply_if_finite, the method's own state is untouched by a NaN gradient.
  raw = factory(**hparams)
  raw_state = raw.init(params)
  _, raw_new = raw.update(bad, raw_state, params, curvature=curvature, **extra)
  for a, b in zip(jax.tree.leaves(raw_new), jax.tree.leaves(raw_state)):
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.floating):
      assert np.all(np.isfinite(a)), "a NaN gradient leaked into the optimizer state"
  # Non-finite curvature statistics are rejected the same way.
  # (Floating leaves only: a deferred sampled-Fisher curvature also carries its PRNG key.)
  bad_curv = jax.tree.map(
      lambda s: s * jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else s, curvature)
  _, raw_new = raw.update(grads, raw_state, params, curvature=bad_curv, **extra)
  for a in jax.tree.leaves(raw_new):
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.floating):
      assert np.all(np.isfinite(a)), "NaN statistics leaked into the optimizer state"


def check_bf16(factory, capture_fisher="sampled", second_pass=False, **hparams):
  """bf16 parameters: updates come back in bf16 and stay finite."""
  params, x, y, curv_fn = _problem(capture_fisher)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  tx = factory(**hparams)
  state = tx.init(params)
  x = x.astype(jnp.bfloat16)
  loss, grads, curvature = jax.jit(curv_fn)(params, x, y, jax.random.key(0))
  extra = _second_pass(curv_fn, x, y, jax.random.key(0), second_pass)
  updates, state = jax.jit(lambda g, s, p, c: tx.update(g, s, p, curvature=c, **extra))(
      grads, state, params, curvature)
  for u in jax.tree.leaves(updates):
    assert u.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(u, np.float32)))


def check_missing_curvature(factory, method_name, capture_fisher="sampled", second_pass=False,
                            **hparams):
  params, x, y, curv_fn = _problem(capture_fisher)
  tx = factory(**hparams)
  state = tx.init(params)
  _, grads, _ = curv_fn(params, x, y, jax.random.key(0))
  try:
    tx.update(grads, state, params, **_second_pass(curv_fn, x, y, None, second_pass))
  except ValueError as e:
    assert method_name in str(e) and "curvature" in str(e), str(e)
  else:
    raise AssertionError("no error without curvature=")
