"""Batched linear algebra and schedules (DESIGN §6)."""

import jax
import jax.numpy as jnp
import numpy as np

from secondorder_optax._src import base, engine, linalg


def _spd(key, n, d):
  x = jax.random.normal(key, (n, d, d + 2))
  return x @ jnp.swapaxes(x, -1, -2) / d


def test_damped_inverse_solve_and_roots_match_numpy():
  mats = _spd(jax.random.key(0), 3, 5)
  rhs = jax.random.normal(jax.random.key(1), (3, 5, 2))
  inv = jax.vmap(linalg.damped_inverse, in_axes=(0, None))(mats, 0.1)
  sol = jax.vmap(linalg.damped_solve, in_axes=(0, 0, None))(mats, rhs, 0.1)
  root = jax.vmap(linalg.inverse_root, in_axes=(0, None, None))(mats, 4.0, 0.1)
  for m, i, s, r, b in zip(np.asarray(mats, np.float64), inv, sol, root, np.asarray(rhs)):
    damped = m + 0.1 * np.eye(5)
    np.testing.assert_allclose(i, np.linalg.inv(damped), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s, np.linalg.solve(damped, b), rtol=1e-4, atol=1e-5)
    w, q = np.linalg.eigh(damped)
    np.testing.assert_allclose(r, (q * w**-0.25) @ q.T, rtol=1e-4, atol=1e-5)
  values, vectors = linalg.eigh(-jnp.eye(3), min_eigenvalue=0.0)
  np.testing.assert_array_equal(values, np.zeros(3))


def test_solve_blocks_groups_by_block_shape():
  calls = []

  def solve(m):
    calls.append(m.shape)
    return linalg.damped_inverse(m, 1.0)

  blocks = {"a": jnp.eye(2), "b": 2 * jnp.eye(2), "c": jnp.eye(3),
            "stack": engine.Stacked(jnp.stack([3 * jnp.eye(2)] * 4))}
  out = engine.solve_blocks(solve, blocks)
  assert len(calls) == 2  # one traced (vmapped) call per block shape, stacks joined in
  np.testing.assert_allclose(out["b"], np.eye(2) / 3, rtol=1e-6)
  np.testing.assert_allclose(out["c"], np.eye(3) / 2, rtol=1e-6)
  assert out["stack"].shape == (4, 2, 2)
  np.testing.assert_allclose(out["stack"], np.stack([np.eye(2) / 4] * 4), rtol=1e-6)


def test_checked_inverse_rejects_near_singular_results():
  singular = jnp.asarray([[1.0, 1.0], [1.0, 1.0 + 1e-7]])
  assert not np.all(np.isfinite(np.asarray(linalg.checked_damped_inverse(singular, 0.0))))
  np.testing.assert_allclose(linalg.checked_damped_inverse(singular, 1.0),
                             np.linalg.inv(np.asarray(singular, np.float64) + np.eye(2)),
                             rtol=1e-5)


def test_schedules():
  count = jnp.asarray(0)
  assert bool(engine.is_due(count, 5)) and not bool(engine.is_due(jnp.asarray(3), 5))
  first = base.running_average(jnp.ones(2), 3 * jnp.ones(2), 0.9, first=jnp.asarray(True))
  np.testing.assert_allclose(first, [3.0, 3.0])
  later = base.running_average(jnp.ones(2), 3 * jnp.ones(2), 0.9, first=jnp.asarray(False))
  np.testing.assert_allclose(later, [1.2, 1.2], rtol=1e-6)
  assert float(base.hyperparameter_value(lambda c: c * 2.0, jnp.asarray(3))) == 6.0


def test_symmetric_gram_matches_dense_contraction():
  """Blocked (wide) and plain (narrow) Grams equal the full contraction, exactly symmetric."""
  rows = np.asarray(jax.random.normal(jax.random.key(2), (6, 700)), np.float64)
  gram = np.asarray(linalg.symmetric_gram(jnp.asarray(rows, jnp.float32)))
  assert linalg._gram_block_bounds(700) != (0, 700)  # the blocked path runs
  np.testing.assert_allclose(gram, rows.T @ rows, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(gram, gram.T)
  tensor = np.asarray(jax.random.normal(jax.random.key(3), (3, 330, 2)), np.float64)
  for axis, size in ((1, 330), (0, 3), (-1, 2)):
    others = tuple(i for i in range(3) if i != axis % 3)
    expected = np.tensordot(tensor, tensor, axes=(others, others))
    got = linalg.symmetric_gram(jnp.asarray(tensor, jnp.float32), axis=axis)
    assert got.shape == (size, size)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
