"""SENG against dense solves built from vmap(grad) per-example gradients (DESIGN §5, §7).

Every direction is compared with `(λI + U_cᵀU_c)⁻¹ ∇` (or the sketched / low-rank system the
plan defines) solved densely in float64, with `U` rows `vec(D_n)/√k` from
`tests.models.per_example_grads` at the empirical targets, and `U_c` those rows minus their
mean (the default `centered=True`; `U_c = U` with `centered=False`, the paper's Fisher).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import secondorder_optax as soo
from secondorder_optax._src import patches
from tests import contract, models

# float32 solves at relative damping 0.02–0.1 (damped condition numbers up to ~10/λ).
TOL = 1e-4  # float32 against float64; the last digits move between CPUs (FMA, vector width)
# Sketched vs exact: the explicit column sketch below keeps 64 of 72 / 76 coordinates
# (>= 85% of each layer's gradient energy); the sketched Gram is then within 10% of U Uᵀ and,
# with relative damping λ = 1, the direction within 5% of the exact one (8% centred: the
# centred Gram lacks the common direction that the sketch estimates best).
# The Gram's error reaches the direction amplified by about ‖UUᵀ‖/λ (see seng.py).
SKETCH_TOL = {False: 0.05, True: 0.1}
SKETCH_DAMPING = 1.0


def _capture(model, params, x, y, family):
  curv_fn = jax.jit(soo.linen_curvature(model, family, fisher="empirical"))
  return curv_fn(params, x, y, jax.random.key(0))


def _per_example(model, params, x, y, family):
  """vmap(grad) per-example gradients (computed once per parameter point)."""
  return models.per_example_grads(model, params, x, y, family)


def _rows(pex, path, has_bias, examples=None):
  """`U`: rows `vec(D_n)/√k` of the first `examples` (default all) examples."""
  vectors = models.layer_vectors(pex, path, has_bias)
  vectors = vectors[:examples] if examples else vectors
  return vectors / np.sqrt(vectors.shape[0])


def _centered(rows, centered):
  """`P U` with `P = I − 11ᵀ/N` (the rows minus their mean), or `U`."""
  return rows - rows.mean(axis=0) if centered else rows


def _shift(damping, gram, rows, centered):
  """`λ tr K / min(N [− 1], d)`: the relative damping `λ` times the mean nonzero eigenvalue
  of the `N`-example (centred) Gram in `d` dimensions (DESIGN §6)."""
  return damping * np.trace(gram) / min(len(rows) - int(centered), rows.shape[1])


def _smw(rows, grad, damping, gram=None, centered=True):
  """`(1/μ)(∇ − U_cᵀ(μI + K)⁻¹U_c∇)`, K the (possibly sketched) Gram of `U` centred as
  `U_c` is (`P K P`); `= (μI + U_cᵀU_c)⁻¹∇` for the exact Gram."""
  center = _centered(np.eye(len(rows)), centered)
  rows = center @ rows
  gram = rows @ rows.T if gram is None else center @ gram @ center
  shift = _shift(damping, gram, rows, centered)
  weights = np.linalg.solve(shift * np.eye(len(rows)) + gram, rows @ grad)
  return (grad - rows.T @ weights) / shift


def _dense(rows, grad, damping, centered=True, shift=None):
  """`(μI + U_cᵀU_c)⁻¹∇` by a d×d solve: the covariance (or second moment) itself."""
  rows = _centered(rows, centered)
  fisher = rows.T @ rows
  shift = _shift(damping, rows @ rows.T, rows, centered) if shift is None else shift
  return np.linalg.solve(shift * np.eye(len(grad)) + fisher, grad)


def _direction(updates, path, has_bias):
  return models.grad_matrix(updates, path, has_bias).reshape(-1)


def _layers(params):
  return [(info.path, info.has_bias) for info in
          soo._src.layerwise.find_layers(params).values()]


def _step(tx):
  return jax.jit(lambda g, s, p, c: tx.update(g, s, p, curvature=c))


@pytest.mark.parametrize("centered", [True, False])
def test_dense_exact_with_schedule_and_stale_factors(centered):
  """Centred (the default) and the paper's empirical Fisher, against d×d dense solves."""
  model, params, x, y, family = models.mlp_problem(batch=12, seed=1)
  schedule = lambda count: 0.05 * (1.0 + count)
  tx = soo.scale_by_seng(damping=schedule, batch_size=12, inverse_every=2, centered=centered)
  state = tx.init(params)
  step = _step(tx)
  pex = {}
  for count in range(3):
    _, grads, curvature = _capture(model, params, x, y, family)
    updates, state = step(grads, state, params, curvature)
    refreshed_at = count - count % 2  # factors and damping from the last refresh
    if refreshed_at == count:
      pex[count] = _per_example(model, params, x, y, family)
    damping = schedule(refreshed_at)
    for path, has_bias in _layers(params):
      plan = state.preconditioner["/".join(path)].plan
      assert plan.kind == "hadamard"
      rows = _rows(pex[refreshed_at], path, has_bias)
      expected = _dense(rows, models.grad_matrix(grads, path, has_bias).reshape(-1), damping,
                        centered)
      assert models.relative_error(_direction(updates, path, has_bias), expected) < TOL
    params = jax.tree.map(lambda p, u: p - 0.3 * u, params, updates)
  assert step._cache_size() == 1


def _scaled(curvature, factor):
  """The empirical Fisher times `factor²` (every output gradient times `factor`)."""
  layers = {p: v.replace(output_grads=v.output_grads * factor)
            for p, v in curvature.layers.items()}
  return soo.Curvature(layers, curvature.fisher_grads, curvature.fisher)


def test_damping_scale_falls_by_at_most_max_damping_drop():
  """A refresh whose Fisher collapses 1e4-fold is damped at the previous scale / 4; one
  whose Fisher grows 100-fold at its own scale (dense solves)."""
  model, params, x, y, family = models.mlp_problem(batch=12, seed=1)
  tx = soo.scale_by_seng(damping=0.1, batch_size=12, inverse_every=1, max_damping_drop=4.0)
  state = tx.init(params)
  step = _step(tx)
  _, grads, curvature = _capture(model, params, x, y, family)
  pex = _per_example(model, params, x, y, family)
  layers = _layers(params)
  rows = {path: _rows(pex, path, has_bias) for path, has_bias in layers}
  mean = {path: np.trace(_centered(r, True) @ _centered(r, True).T) / (len(r) - 1)
          for path, r in rows.items()}
  # (output-gradient factor, scale / first mean): falls by 4 twice, then rises at once.
  scales = [(1.0, 1.0), (1e-2, 0.25), (1e-2, 0.0625), (10.0, 100.0)]
  for factor, expected_scale in scales:
    updates, state = step(grads, state, params, _scaled(curvature, factor))
    for path, has_bias in layers:
      layer = state.preconditioner["/".join(path)]
      np.testing.assert_allclose(float(layer.scale), expected_scale * mean[path], rtol=1e-4)
      grad = models.grad_matrix(grads, path, has_bias).reshape(-1)
      expected = _dense(rows[path] * factor, grad, 0.1,
                        shift=0.1 * expected_scale * mean[path])
      assert models.relative_error(_direction(updates, path, has_bias), expected) < TOL


@pytest.mark.parametrize("threshold,svd_rank", [(10**6, 16), (0, 4)])
def test_conv_exact_explicit_and_low_rank(threshold, svd_rank):
  """Explicit per-example gradients; low-rank path with svd_rank >= min(T, d_out): exact."""
  model, params, x, y, family = models.cnn_problem(batch=6, seed=2)
  tx = soo.scale_by_seng(damping=0.02, batch_size=6, sketch_size=None,
                         explicit_threshold=threshold, svd_rank=svd_rank)
  state = tx.init(params)
  _, grads, curvature = _capture(model, params, x, y, family)
  pex = _per_example(model, params, x, y, family)
  updates, state = _step(tx)(grads, state, params, curvature)
  kinds = {k: s.plan.kind for k, s in state.preconditioner.items()}
  conv_kind = "explicit" if threshold else "low_rank"
  assert kinds == {"Conv_0": conv_kind, "Conv_1": conv_kind, "Conv_2": conv_kind,
                   "Dense_0": "hadamard"}
  for path, has_bias in _layers(params):
    rows = _rows(pex, path, has_bias)
    expected = _smw(rows, models.grad_matrix(grads, path, has_bias).reshape(-1), 0.02)
    assert models.relative_error(_direction(updates, path, has_bias), expected) < TOL


def test_low_rank_truncated_matches_its_system():
  """svd_rank=1 < rank of each Γ_n: the dense solve with D_n ≈ Ā_nᵀ P_1 P_1ᵀ Γ_n."""
  model, params, x, y, family = models.cnn_problem(batch=6, seed=3)
  tx = soo.scale_by_seng(damping=0.02, batch_size=6, sketch_size=None,
                         explicit_threshold=0, svd_rank=1)
  state = tx.init(params)
  _, grads, curvature = _capture(model, params, x, y, family)
  pex = _per_example(model, params, x, y, family)
  updates, state = _step(tx)(grads, state, params, curvature)
  for path, has_bias in _layers(params)[:3]:
    stats = curvature.layers[path]
    inputs = np.asarray(patches.layer_inputs(stats), np.float64)
    out_grads = np.asarray(patches.layer_output_grads(stats), np.float64)
    left, _, _ = np.linalg.svd(out_grads, full_matrices=False)
    projector = left[:, :, :1] @ np.swapaxes(left[:, :, :1], 1, 2)
    approx = np.einsum("ntd,nts,nse->nde", inputs, projector, out_grads)
    rows = approx.reshape(6, -1) / np.sqrt(6)
    exact_rows = _rows(pex, path, has_bias)
    grad = models.grad_matrix(grads, path, has_bias).reshape(-1)
    direction = _direction(updates, path, has_bias)
    assert models.relative_error(direction, _smw(rows, grad, 0.02)) < TOL
    assert models.relative_error(direction, _smw(exact_rows, grad, 0.02)) > 1e-3


@pytest.mark.parametrize("centered", [True, False])
def test_explicit_column_sketch(centered):
  model, params, x, y, family = models.cnn_problem(batch=6, seed=4)
  tx = soo.scale_by_seng(damping=SKETCH_DAMPING, batch_size=6, sketch_size=8,  # 64 columns
                         centered=centered)
  state = tx.init(params)
  _, grads, curvature = _capture(model, params, x, y, family)
  pex = _per_example(model, params, x, y, family)
  updates, state = _step(tx)(grads, state, params, curvature)
  for path, has_bias in _layers(params)[:3]:
    layer = state.preconditioner["/".join(path)]
    kept = np.asarray(layer.factors.kept_columns)
    rows = _rows(pex, path, has_bias)
    grad = models.grad_matrix(grads, path, has_bias).reshape(-1)
    direction = _direction(updates, path, has_bias)
    if rows.shape[1] <= 64:  # Conv_0 (57 parameters) is not sketched.
      assert layer.plan.sketch == (0,) and kept.shape == (1,)  # a placeholder
      assert models.relative_error(direction, _smw(rows, grad, SKETCH_DAMPING,
                                                   centered=centered)) < TOL
      continue
    assert layer.plan.sketch == (64,) and len(np.unique(kept)) == 64
    energy = np.sum(rows[:, kept] ** 2) / np.sum(rows ** 2)
    sketched = rows[:, kept] * np.sqrt(rows.shape[1] / 64)
    gram = sketched @ sketched.T
    expected = _smw(rows, grad, SKETCH_DAMPING, gram, centered=centered)
    assert models.relative_error(direction, expected) < TOL
    assert energy > 0.85 and models.relative_error(gram, rows @ rows.T) < 0.1
    exact = _smw(rows, grad, SKETCH_DAMPING, centered=centered)
    assert models.relative_error(direction, exact) < SKETCH_TOL[centered]


def test_low_rank_row_sketch():
  """Row sketch = the unbiased sketch of vec(D_n) on kept inputs × kept outputs."""
  model, params, x, y, family = models.cnn_problem(batch=6, seed=5)
  tx = soo.scale_by_seng(damping=0.05, batch_size=6, explicit_threshold=0, svd_rank=4,
                         sketch_size=3)
  state = tx.init(params)
  _, grads, curvature = _capture(model, params, x, y, family)
  pex = _per_example(model, params, x, y, family)
  updates, state = _step(tx)(grads, state, params, curvature)
  for path, has_bias in _layers(params)[:3]:
    layer = state.preconditioner["/".join(path)]
    d_in, d_out = layer.plan.matrix_shape
    kept_in = np.asarray(layer.factors.kept_inputs)
    kept_out = np.asarray(layer.factors.kept_outputs)
    assert len(kept_in) == 3 and layer.plan.sketch[0] == 3
    if layer.plan.sketch[1] == 0:  # not sketched: a placeholder
      assert d_out <= 3 and len(kept_out) == 1
      kept_out = np.arange(d_out)
    else:
      assert len(kept_out) == 3
    rows = _rows(pex, path, has_bias)
    mats = rows.reshape(6, d_in, d_out)[:, kept_in][:, :, kept_out].reshape(6, -1)
    sketched = mats * np.sqrt(d_in * d_out / mats.shape[1])
    grad = models.grad_matrix(grads, path, has_bias).reshape(-1)
    expected = _smw(rows, grad, 0.05, sketched @ sketched.T)
    assert models.relative_error(_direction(updates, path, has_bias), expected) < TOL


def test_subsample_and_sequence_layers():
  """subsample=5 of 12; dense layers on sequences (T=3) through the explicit path."""
  model, params, _, _, family = models.mlp_problem(batch=12, seed=6, loss="squared")
  x = jax.random.normal(jax.random.key(1), (12, 3, 4))
  y = jax.random.normal(jax.random.key(2), (12, 3, 3))
  params = model.init(jax.random.key(3), x)["params"]
  _, grads, curvature = _capture(model, params, x, y, family)
  pex = _per_example(model, params, x, y, family)
  with pytest.raises(ValueError, match="sequence_layers"):
    tx = soo.scale_by_seng(damping=0.1, subsample=5)
    tx.update(grads, tx.init(params), params, curvature=curvature)
  paths = [path for path, _ in _layers(params)]
  tx = soo.scale_by_seng(damping=0.1, subsample=5, batch_size=12, sequence_layers=paths)
  state = tx.init(params)
  updates, state = _step(tx)(grads, state, params, curvature)
  for path, has_bias in _layers(params):
    assert state.preconditioner["/".join(path)].plan.kind == "explicit"
    rows = _rows(pex, path, has_bias, examples=5)
    expected = _smw(rows, models.grad_matrix(grads, path, has_bias).reshape(-1), 0.1)
    assert models.relative_error(_direction(updates, path, has_bias), expected) < TOL


def _eqns_outside_cond(jaxpr):
  """Every equation of `jaxpr` and its nested calls, except inside `cond` branches."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name == "cond":
      continue
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _eqns_outside_cond(inner)


def test_subsample_slices_examples_only_inside_refresh():
  """The first `subsample` examples are cut out of the captured activations inside the
  refresh branch: a step without a refresh must not pay for the slices."""
  model, params, x, y, family = models.mlp_problem(batch=12, seed=6, loss="squared")
  _, grads, curvature = _capture(model, params, x, y, family)
  tx = soo.scale_by_seng(damping=0.1, subsample=5)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda g, s, c: tx.update(g, s, params, curvature=c))(
      grads, state, curvature)
  leading = lambda v: getattr(getattr(v, "aval", None), "shape", ())[:1]
  slices = [eqn for eqn in _eqns_outside_cond(jaxpr.jaxpr)
            if eqn.primitive.name in ("slice", "dynamic_slice", "gather")
            and any(leading(v) == (12,) for v in eqn.invars)
            and any(leading(v) == (5,) for v in eqn.outvars)]
  assert not slices, slices


def test_errors_describe_and_failed_refresh():
  model, params, x, y, family = models.mlp_problem(batch=12, seed=7)
  _, grads, curvature = _capture(model, params, x, y, family)
  pex = _per_example(model, params, x, y, family)
  with pytest.raises(ValueError, match="batch_size"):
    soo.seng(0.1, damping=0.1).init(params)
  with pytest.raises(ValueError, match="larger than batch_size"):
    soo.seng(0.1, damping=0.1, batch_size=4, subsample=8).init(params)
  with pytest.raises(ValueError, match="batch_size=10 .* has 12"):
    tx = soo.seng(0.1, damping=0.1, batch_size=10)
    tx.update(grads, tx.init(params), params, curvature=curvature)
  with pytest.raises(ValueError, match="subsample=20 .* only 12"):
    tx = soo.seng(0.1, damping=0.1, subsample=20)
    tx.update(grads, tx.init(params), params, curvature=curvature)
  with pytest.raises(ValueError, match="seng: damping must be > 0"):
    soo.scale_by_seng(damping=0.0, batch_size=12)
  with pytest.raises(ValueError, match="centered=True needs at least 2 .* batch_size=1"):
    soo.seng(batch_size=1).init(params)
  with pytest.raises(ValueError, match="seng: centered must be True or False"):
    soo.seng(batch_size=12, centered="yes")
  soo.seng(batch_size=1, centered=False).init(params)  # the paper's Fisher of one example
  rules = soo.describe(soo.seng(0.1, damping=0.1, batch_size=12), params, print_fn=None)
  assert rules["Dense_0/kernel"].startswith("seng: exact SMW, Hadamard Gram")
  assert rules["Dense_0/kernel"].endswith("12 examples, centred")

  # A refresh whose inverse is not finite keeps the previous factors and counts a failure per layer.
  damping = lambda count: jnp.where(count == 1, -1e3, 0.1)
  tx = soo.scale_by_seng(damping=damping, batch_size=12, inverse_every=1)
  state = tx.init(params)
  step = _step(tx)
  _, state = step(grads, state, params, curvature)
  kept, state = step(grads, state, params, curvature)
  assert int(state.failures) == 3 and int(state.count) == 2  # one per layer
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(state))
  path, has_bias = _layers(params)[0]
  expected = _smw(_rows(pex, path, has_bias),
                  models.grad_matrix(grads, path, has_bias).reshape(-1), 0.1)
  assert models.relative_error(_direction(kept, path, has_bias), expected) < TOL


HPARAMS = dict(damping=0.05, batch_size=32, inverse_every=5, capture_fisher="empirical")


def test_contract_jit_convergence():
  contract.check_jit_convergence(soo.seng, learning_rate=0.1, **HPARAMS)


def test_contract_chain_inject_multisteps_bf16_missing():
  contract.check_chain_and_inject(soo.scale_by_seng, soo.seng, learning_rate=0.1,
                                  damping=0.05, batch_size=32, capture_fisher="empirical")
  contract.check_multisteps_and_nonfinite(soo.seng, learning_rate=0.1, **HPARAMS)
  contract.check_bf16(soo.seng, learning_rate=0.1, **HPARAMS)
  contract.check_missing_curvature(soo.seng, "seng", learning_rate=0.1, **HPARAMS)
