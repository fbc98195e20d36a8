"""`preconditioner_dtype`: refreshed preconditioners stored and applied in bfloat16.

For every method that offers it the bfloat16 direction is checked against a float64
reproduction of the documented rule (operands rounded to the preconditioner's dtype,
products summed in float32 or better) and against the float32 direction; the refreshed
state stays in bfloat16 across jitted steps and refreshes, the statistics stay float32.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import secondorder_optax as soo
from secondorder_optax._src import linalg, patches
from tests import models

BF16 = jnp.bfloat16
# Which state fields hold the refreshed preconditioner, per method.
# Which state fields hold the refreshed preconditioner, per method ("*": all of it).
REFRESHED = {
    "kfac": ("input_inverse", "output_inverse"),
    "ekfac": ("input_basis", "output_basis"),
    "mbf": ("*",),
    "tnt": ("*",),
    "shampoo": ("*",),
}
STATISTICS = {"kfac": ("input_factor", "output_factor"),
              "ekfac": ("input_factor", "output_factor", "scalings"),
              "mbf": ("*",), "tnt": ("*",), "shampoo": ("*",)}


def _transformation(method, dtype, damping=1.0):
  # The default relative damping: at 1e-2 the damped factors' condition numbers amplify
  # bfloat16's rounding of the stored inverses to 10-40% on this tiny model.
  extra = {"block_size": 3} if method == "mbf" else {}
  return getattr(soo, f"scale_by_{method}")(damping=damping, inverse_every=2,
                                            preconditioner_dtype=dtype, **extra)


@functools.lru_cache(maxsize=None)
def _three_steps(method, dtype_name):
  """Directions and states of three jitted steps (refreshes at steps 0 and 2)."""
  dtype = None if dtype_name == "none" else jnp.dtype(dtype_name)
  model, params, x, y, family = models.mlp_problem(batch=12, loss="softmax", seed=3)
  fisher = "empirical" if method == "mbf" else "sampled"
  capture = jax.jit(soo.linen_curvature(model, family, fisher=fisher, defer=False))
  tx = _transformation(method, dtype)
  step = jax.jit(lambda g, s, p, c: tx.update(g, s, p, curvature=c))
  state, out = tx.init(params), []
  for i in range(3):
    _, grads, curvature = capture(params, x, y, jax.random.key(i))
    direction, state = step(grads, state, params, curvature)
    out.append((direction, state, grads))
  return out


def _fields(state, names, part):
  """The named fields of every unit, looked up in the statistics, then the preconditioner
  (`"*"`: the whole `part` of the state, "statistics" or "preconditioner")."""
  if names == ("*",):
    return getattr(state, part)
  out = []
  for key in state.statistics:
    for name in names:
      unit = state.statistics[key]
      out.append(getattr(unit, name) if name in unit._fields
                 else getattr(state.preconditioner[key], name))
  return out


@pytest.mark.parametrize("method", sorted(REFRESHED))
def test_bfloat16_state_and_direction(method):
  ref = _three_steps(method, "none")
  low = _three_steps(method, "bfloat16")
  for (d_ref, s_ref, _), (d_low, s_low, _) in zip(ref, low):
    for leaf in jax.tree.leaves(_fields(s_low, REFRESHED[method], "preconditioner")):
      assert leaf.dtype == BF16, f"{method}: refreshed state in {leaf.dtype}"
    for leaf in jax.tree.leaves(_fields(s_low, STATISTICS[method], "statistics")):
      assert leaf.dtype == jnp.float32, f"{method}: statistics in {leaf.dtype}"
    for leaf in jax.tree.leaves(_fields(s_ref, REFRESHED[method], "preconditioner")):
      assert leaf.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(d_low), jax.tree.leaves(d_ref)):
      assert a.dtype == b.dtype == jnp.float32
      err = models.relative_error(np.asarray(a, np.float64), np.asarray(b, np.float64))
      # bfloat16 keeps about 3 significant digits (errors here 0.2–1.5%); EKFAC's division
      # by the scalings amplifies the rounding of small projected entries (3.4% on one
      # leaf of this tiny model).
      assert err < 5e-2, f"{method}: bfloat16 direction off by {err}"
    assert int(s_low.failures) == 0


def _round(x, dtype):
  return np.asarray(np.asarray(x, np.float32).astype(dtype), np.float64)


def test_kfac_bfloat16_direction_reproduces_the_rule():
  """`A⁻¹ ∇ G⁻¹` with bf16 operands and float32 sums, reproduced in float64."""
  direction, state, grads = _three_steps("kfac", "bfloat16")[-1]
  bf16 = ml_dtypes.bfloat16
  for key, layer in state.preconditioner.items():
    path = tuple(key.split("/"))
    has_bias = "bias" in patches.tree_get(grads, path)
    grad = models.grad_matrix(grads, path, has_bias)
    inner = _round(layer.input_inverse, bf16) @ _round(grad, bf16)
    expected = _round(np.float32(inner), bf16) @ _round(layer.output_inverse, bf16)
    got = models.grad_matrix(direction, path, has_bias)
    assert models.relative_error(got, expected) < 1e-3


def test_bad_preconditioner_dtype_is_a_clear_error():
  for make in (lambda: soo.kfac(0.1, damping=1e-2, preconditioner_dtype=jnp.int32),
               lambda: soo.scale_by_tnt(preconditioner_dtype="not a dtype"),
               lambda: soo.shampoo(0.1, preconditioner_dtype=bool),
               lambda: soo.mbf(0.1, damping=1e-2, preconditioner_dtype=jnp.int8)):
    with pytest.raises(ValueError, match="preconditioner_dtype must be a floating dtype"):
      make()


def test_products_follow_the_narrower_operand():
  a = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3) / 7
  b = jnp.ones((3, 2), BF16)
  out = linalg.matmul(a, b)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.asarray(a.astype(BF16), np.float32) @ np.ones((3, 2)))
  assert linalg.matmul(a, a.T).dtype == jnp.float32
  assert linalg.compute_dtype(a, b) == BF16


def test_ekfac_keeps_row_major_transposes_of_bfloat16_bases_only():
  for (_, s_low, _), (_, s_ref, _) in zip(_three_steps("ekfac", "bfloat16"),
                                          _three_steps("ekfac", "none")):
    for layer in s_low.preconditioner.values():
      np.testing.assert_array_equal(np.asarray(layer.input_basis_t, np.float32),
                                    np.asarray(layer.input_basis, np.float32).T)
      np.testing.assert_array_equal(np.asarray(layer.output_basis_t, np.float32),
                                    np.asarray(layer.output_basis, np.float32).T)
      assert layer.input_basis_t.dtype == BF16
    for layer in s_ref.preconditioner.values():
      assert layer.input_basis_t.shape == layer.output_basis_t.shape == (1,)


@pytest.mark.parametrize("method", sorted(REFRESHED))
def test_bfloat16_preconditioner_on_a_cnn(method):
  """Conv kernels (patch factors, spatial mini-blocks, 4-D mode products) in bfloat16 too.

  Guards the products that XLA:CPU lowers differently per layout: a bfloat16 dot whose
  result is transposed inside the same computation fails on XLA:CPU (`UNIMPLEMENTED:
  Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32`, jax 0.10.2), so
  every conv path is run and compared with its float32 direction here.
  """
  model, params, x, y, family = models.cnn_problem(batch=6, seed=1)
  fisher = "empirical" if method == "mbf" else "sampled"
  _, grads, curvature = jax.jit(soo.linen_curvature(model, family, fisher=fisher,
                                                    defer=False))(params, x, y,
                                                                  jax.random.key(0))
  directions = []
  for dtype in (BF16, None):
    # The default relative damping (1): the dense head's factors are singular at batch 6
    # (condition ~1e11 undamped); at relative damping 0.1 the damped condition number
    # (~1e3) amplifies bfloat16's rounding of their inverses to 5-30%.
    tx = _transformation(method, dtype)
    direction, state = jax.jit(lambda g, s, p, c, tx=tx: tx.update(g, s, p, curvature=c))(
        grads, tx.init(params), params, curvature)
    assert int(state.failures) == 0
    directions.append(direction)
  low, ref = directions
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(low), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype == jnp.float32
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    name = jax.tree_util.keystr(path)
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine > 0.99, f"{method}: bfloat16 direction of {name} turned, cosine {cosine}"
    if "Conv" in name:  # the dense head is singular at batch 6: only its angle is checked
      err = models.relative_error(a, b)
      assert err < 5e-2, f"{method}: bfloat16 direction of {name} off by {err}"
