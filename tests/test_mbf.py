"""MBF: exact mini-block checks against dense solves built from vmap(grad), and the contract."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import secondorder_optax as soo
from tests import contract, models

DAMPING = 1e-2


# ---------------------------------------------------------------------------------------
# The test's own partition, written independently of the library: lists of (row, col)
# entries of the matrix view [kernel; bias] (row-major vec index row * d_out + col).


def dense_chunk_blocks(d_in, d_out, block_size, has_bias):
  blocks = []
  for j in range(d_out):
    for start in range(0, d_in, block_size):
      blocks.append([(i, j) for i in range(start, min(start + block_size, d_in))])
    if has_bias:
      blocks.append([(d_in, j)])
  return blocks


def conv_blocks(kernel_shape, has_bias):
  *spatial, c_in, c_out = kernel_shape
  k = int(np.prod(spatial))
  blocks = [[(s * c_in + i, o) for s in range(k)] for i in range(c_in) for o in range(c_out)]
  if has_bias:
    blocks += [[(k * c_in, o)] for o in range(c_out)]
  return blocks


def row_blocks(kernel_shape, has_bias):
  rows = int(np.prod(kernel_shape[:-1])) + int(has_bias)
  return [[(i, j) for i in range(rows)] for j in range(kernel_shape[-1])]


def block_diagonal_direction(vectors, grad_matrix, blocks, damping):
  """Dense solve `(F_bd + λ m I)⁻¹ vec(∇)`: F_bd the Fisher restricted to the blocks, `m`
  its mean eigenvalue (relative damping, DESIGN §6)."""
  d_out = grad_matrix.shape[1]
  fisher = models.fisher_block(vectors)
  block_of = np.full(fisher.shape[0], -1)
  for b, entries in enumerate(blocks):
    for row, col in entries:
      assert block_of[row * d_out + col] == -1, "test partition overlaps"
      block_of[row * d_out + col] = b
  assert np.all(block_of >= 0), "test partition misses entries"
  mask = block_of[:, None] == block_of[None, :]
  mean_eigenvalue = np.trace(fisher) / fisher.shape[0]
  matrix = np.where(mask, fisher, 0.0) + damping * mean_eigenvalue * np.eye(fisher.shape[0])
  return np.linalg.solve(matrix, grad_matrix.reshape(-1)).reshape(grad_matrix.shape)


def layer_info(params, path):
  node = params
  for p in path:
    node = node[p]
  return tuple(node["kernel"].shape), "bias" in node


def capture(model, family, params, x, y, fisher="empirical"):
  """`(grads, curvature)` from the jitted linen capture (eager capture is slow)."""
  curv_fn = jax.jit(soo.linen_curvature(model, family, fisher=fisher))
  _, grads, curvature = curv_fn(params, x, y, jax.random.key(0))
  return grads, curvature


def per_example_grads(model, params, x, y, family):
  return jax.jit(lambda p, xs, ys: models.per_example_grads(model, p, xs, ys, family))(
      params, x, y)


def expected_directions(model, params, x, y, family, blocks_of, damping=DAMPING, grads=None):
  pex = per_example_grads(model, params, x, y, family)
  out = {}
  for path in blocks_of:
    kernel_shape, has_bias = layer_info(params, path)
    vectors = models.layer_vectors(pex, path, has_bias)
    grad = models.grad_matrix(grads, path, has_bias)
    out[path] = block_diagonal_direction(vectors, grad, blocks_of[path], damping)
  return out


def assert_directions(updates, expected):
  for path, want in expected.items():
    node = updates
    for p in path:
      node = node[p]
    got = models.grad_matrix(updates, path, "bias" in node)
    err = models.relative_error(got, want)
    assert err < 5e-5, f"{path}: relative error {err}"


def mlp_blocks(params, block_size, overrides=None):
  overrides = overrides or {}
  out = {}
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    shape, has_bias = layer_info(params, (name,))
    out[(name,)] = (overrides[name](shape, has_bias) if name in overrides
                    else dense_chunk_blocks(shape[0], shape[1], block_size, has_bias))
  return out


def one_step(tx, params, curvature, grads):
  state = tx.init(params)
  return jax.jit(lambda g, s, p, c: tx.update(g, s, p, curvature=c))(
      grads, state, params, curvature)


# ---------------------------------------------------------------------------------------
# Exactness.


def test_dense_direction_equals_block_diagonal_solve_with_override():
  """block_size=4 on d_in 4/6/5 (full and shorter last chunks), RowBlocks on Dense_2."""
  model, params, x, y, family = models.mlp_problem(batch=12, d_in=4, classes=3)
  grads, curvature = capture(model, family, params, x, y)
  tx = soo.scale_by_mbf(damping=DAMPING, block_size=4, partitions={"Dense_2": soo.RowBlocks()})
  updates, state = one_step(tx, params, curvature, grads)
  expected = expected_directions(model, params, x, y, family,
                                 mlp_blocks(params, 4, {"Dense_2": row_blocks}), grads=grads)
  assert_directions(updates, expected)
  groups = {k: {g: v.shape for g, v in s.items()} for k, s in state.preconditioner.items()}
  assert groups == {
      "Dense_0": {"chunks": (6, 4, 4), "bias": (6, 1, 1)},
      "Dense_1": {"chunks": (5, 4, 4), "last_chunk": (5, 2, 2)},
      "Dense_2": {"rows": (3, 6, 6)},
  }
  assert int(state.failures) == 0


def test_large_block_size_gives_one_block_per_unit():
  """block_size >= d_in + 1: each unit's kernel weights are one block (its bias one 1x1)."""
  model, params, x, y, family = models.mlp_problem(batch=10, d_in=4, classes=3, loss="mse")
  grads, curvature = capture(model, family, params, x, y)
  tx = soo.scale_by_mbf(damping=DAMPING, block_size=7)
  updates, state = one_step(tx, params, curvature, grads)
  assert_directions(updates, expected_directions(model, params, x, y, family,
                                                 mlp_blocks(params, 7), grads=grads))
  for key, d_in, d_out, bias in (("Dense_0", 4, 6, True), ("Dense_1", 6, 5, False),
                                 ("Dense_2", 5, 3, True)):
    shapes = {g: v.shape for g, v in state.preconditioner[key].items()}
    want = {"last_chunk": (d_out, d_in, d_in)}
    if bias:
      want["bias"] = (d_out, 1, 1)
    assert shapes == want


def test_conv_direction_equals_block_diagonal_solve():
  """One kh*kw block per (c_in, c_out) pair, 1x1 bias blocks; the final dense: 16 + 8 + 1."""
  model, params, x, y, family = models.cnn_problem(batch=6)
  grads, curvature = capture(model, family, params, x, y)
  updates, state = one_step(soo.scale_by_mbf(damping=DAMPING), params, curvature, grads)
  blocks_of = {}
  for name in ("Conv_0", "Conv_1", "Conv_2"):
    blocks_of[(name,)] = conv_blocks(*layer_info(params, (name,)))
  shape, has_bias = layer_info(params, ("Dense_0",))
  blocks_of[("Dense_0",)] = dense_chunk_blocks(shape[0], shape[1], 16, has_bias)
  assert_directions(updates, expected_directions(model, params, x, y, family, blocks_of,
                                                 grads=grads))
  assert state.preconditioner["Conv_1"]["spatial"].shape == (3 * 4, 6, 6)
  assert state.preconditioner["Dense_0"]["last_chunk"].shape == (3, 8, 8)


class SequenceMLP(nn.Module):
  """A dense layer applied at 3 locations per example (D_n sums over them)."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(h.mean(axis=1))


def test_dense_at_several_locations_sums_per_example_gradient():
  model, family = SequenceMLP(), soo.losses.softmax_cross_entropy
  x = jax.random.normal(jax.random.key(1), (8, 3, 4))
  y = jax.random.randint(jax.random.key(2), (8,), 0, 3)
  params = model.init(jax.random.key(3), x)["params"]
  grads, curvature = capture(model, family, params, x, y)
  updates, _ = one_step(soo.scale_by_mbf(damping=DAMPING, block_size=3), params, curvature,
                        grads)
  blocks_of = {(n,): dense_chunk_blocks(*layer_info(params, (n,))[0], 3, True)
               for n in ("Dense_0", "Dense_1")}
  assert_directions(updates, expected_directions(model, params, x, y, family, blocks_of,
                                                 grads=grads))


def test_running_average_and_held_inverse():
  """stats every step (EMA, first = batch statistic), inverses every 2 steps."""
  model, params, x, y, family = models.mlp_problem(batch=12, d_in=4, classes=3)
  curv_fn = jax.jit(soo.linen_curvature(model, family, fisher="empirical"))
  pex_fn = jax.jit(lambda xs: models.per_example_grads(model, params, xs, y, family))
  decay, block = 0.7, 3
  tx = soo.scale_by_mbf(damping=DAMPING, block_size=block, stats_decay=decay, inverse_every=2)
  step = jax.jit(lambda g, s, p, c: tx.update(g, s, p, curvature=c))
  state = tx.init(params)
  blocks_of = mlp_blocks(params, block)
  fishers = {path: 0.0 for path in blocks_of}
  used = None
  for i in range(3):
    xi = x + 0.3 * i * jnp.sin(x)
    _, grads, curvature = curv_fn(params, xi, y, jax.random.key(i))
    updates, state = step(grads, state, params, curvature)
    pex = pex_fn(xi)
    for path in blocks_of:
      batch = models.fisher_block(models.layer_vectors(pex, path, layer_info(params, path)[1]))
      fishers[path] = batch if i == 0 else decay * fishers[path] + (1 - decay) * batch
    if i != 1:
      used = dict(fishers)
    for path, blocks in blocks_of.items():
      grad = models.grad_matrix(grads, path, layer_info(params, path)[1])
      d_out = grad.shape[1]
      block_of = np.empty(grad.size, int)
      for b, entries in enumerate(blocks):
        for r, c in entries:
          block_of[r * d_out + c] = b
      mask = block_of[:, None] == block_of[None, :]
      shift = DAMPING * np.trace(used[path]) / grad.size  # relative to the mean eigenvalue
      matrix = np.where(mask, used[path], 0.0) + shift * np.eye(grad.size)
      want = np.linalg.solve(matrix, grad.reshape(-1)).reshape(grad.shape)
      got = models.grad_matrix(updates, path, layer_info(params, path)[1])
      assert models.relative_error(got, want) < 5e-5, (i, path)
  assert step._cache_size() == 1
  assert int(state.count) == 3


def _count_primitive(jaxpr, name):
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_primitive(inner, name)
  return count


def test_one_batched_cholesky_per_block_size():
  """Same-size blocks of all layers share one call: sizes 4, 2, 1 and 6 -> four calls."""
  model, params, x, y, family = models.mlp_problem(batch=12, d_in=4, classes=3)
  grads, curvature = capture(model, family, params, x, y)
  tx = soo.scale_by_mbf(damping=DAMPING, block_size=4, partitions={"Dense_2": soo.RowBlocks()})
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda g, s, c: tx.update(g, s, params, curvature=c))(
      grads, state, curvature)
  assert _count_primitive(jaxpr.jaxpr, "cholesky") == 4
  # Two MLP layers with equal shapes: their 4-blocks go through a single call too.
  model2 = models.MLP(features=(4, 4, 3))
  params2 = model2.init(jax.random.key(0), x)["params"]
  grads2, curvature2 = capture(model2, family, params2, x, y)
  tx2 = soo.scale_by_mbf(damping=DAMPING, block_size=4)
  jaxpr2 = jax.make_jaxpr(lambda g, s, c: tx2.update(g, s, params2, curvature=c))(
      grads2, tx2.init(params2), curvature2)
  assert _count_primitive(jaxpr2.jaxpr, "cholesky") == 2  # sizes 4 and 1


# ---------------------------------------------------------------------------------------
# Errors, guards, describe.


def test_fisher_choice_and_errors():
  model, params, x, y, family = models.mlp_problem(batch=8)
  grads, sampled = capture(model, family, params, x, y, fisher="sampled")
  tx = soo.scale_by_mbf(damping=DAMPING)
  with pytest.raises(ValueError, match="fisher='empirical'.*fisher='sampled'"):
    tx.update(grads, tx.init(params), params, curvature=sampled)
  opt_in = soo.scale_by_mbf(damping=DAMPING, fisher="sampled")
  updates, _ = opt_in.update(grads, opt_in.init(params), params, curvature=sampled)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  with pytest.raises(ValueError, match="fisher must be one of"):
    soo.mbf(0.1, damping=DAMPING, fisher="true")
  with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
    soo.scale_by_mbf(damping=DAMPING, block_size=0)
  with pytest.raises(ValueError, match="inverse_every must be an integer >= 1"):
    soo.scale_by_mbf(damping=DAMPING, inverse_every=0)
  with pytest.raises(ValueError, match="must be an MBFPartition"):
    soo.scale_by_mbf(damping=DAMPING, partitions={"Dense_0": 4})
  with pytest.raises(ValueError, match=r"names layer\(s\) \['Dense_9'\]"):
    soo.scale_by_mbf(damping=DAMPING, partitions={("Dense_9",): soo.RowBlocks()}).init(params)


def test_failed_inversion_keeps_previous_and_counts():
  """A (scheduled) negative damping fails every layer's refresh: the identity is kept."""
  model, params, x, y, family = models.mlp_problem(batch=8)
  grads, curvature = capture(model, family, params, x, y)
  updates, state = one_step(soo.scale_by_mbf(damping=lambda count: -10.0), params, curvature,
                            grads)
  assert int(state.failures) == len(state.preconditioner)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for leaf in jax.tree.leaves((updates, state)):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_describe_lists_blocks_and_fallback():
  params = {"Dense_0": {"kernel": jnp.ones((5, 3)), "bias": jnp.ones(3)}, "scale": jnp.ones(2)}
  rules = soo.describe(soo.mbf(block_size=2), params, print_fn=None)
  assert rules["Dense_0/kernel"] == ("mbf: MiniBlocks(block_size=2) mini-blocks: "
                                     "bias 3×1, chunks 6×2, last_chunk 3×1")
  assert rules["scale"] == "fallback: adam (its own learning rate)"


# ---------------------------------------------------------------------------------------
# optax contract (the contract kit captures sampled statistics: opt in explicitly).

HPARAMS = dict(damping=1e-2, block_size=4, fisher="sampled")


def test_contract_jit_convergence():
  contract.check_jit_convergence(soo.mbf, learning_rate=0.1, inverse_every=5, **HPARAMS)


def test_contract_chain_and_inject():
  contract.check_chain_and_inject(soo.scale_by_mbf, soo.mbf, learning_rate=0.1, **HPARAMS)


def test_contract_multisteps_nonfinite_bf16_missing():
  contract.check_multisteps_and_nonfinite(soo.mbf, learning_rate=0.1, **HPARAMS)
  contract.check_bf16(soo.mbf, learning_rate=0.1, **HPARAMS)
  contract.check_missing_curvature(soo.mbf, "mbf", learning_rate=0.1, **HPARAMS)
