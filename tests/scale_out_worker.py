"""Scale-out checks run in a subprocess (tests/test_scale_out.py; DESIGN §8).

`python tests/scale_out_worker.py OUT.json [sections]` with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` runs the single-process sections on 8
simulated CPU devices and writes their results to OUT.json:

* `methods`: every method, 10 jitted steps of a 4-8-3 MLP on a batch of 32 sharded over the
  8 devices (under `jax.set_mesh`, so refreshes are spread), against the same steps on one
  device; also saves the one-device KFAC and TNT parameters for the two-process check.
* `spread`: factorizations per device of the engine's batched refresh with and without a
  mesh (the `methods` section also counts them in every method's compiled step).
* `state`: KFAC with its state sharded by `soo.state_shardings` against replicated state.
* `orbax`: save a sharded state with orbax-checkpoint, restore it onto 4 devices and onto
  the same 8, resume.

`python tests/scale_out_worker.py OUT.json gloo PROCESS_ID PORT` is one of two processes
(one CPU device each, `jax.distributed` over gloo) training KFAC and TNT on the global batch
split between them; they save their final parameters next to OUT.json.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import sys
import time

import jax

if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[2] == "gloo":
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[4]}",
                             num_processes=2, process_id=int(sys.argv[3]))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import secondorder_optax as soo  # pylint: disable=g-import-not-at-top

jax.config.update("jax_default_matmul_precision", "highest")

STEPS = 10
BATCH = 32
# Hyperparameters pinned here (not the defaults, which may change); a refresh every 3 steps
# so that 10 steps refresh 4 times.
METHODS = {
    "kfac": dict(learning_rate=0.1, damping=1e-2, inverse_every=3),
    "ekfac": dict(learning_rate=0.1, damping=1e-2, inverse_every=3),
    "tkfac": dict(learning_rate=0.1, damping=1e-2, inverse_every=3),
    "tekfac": dict(learning_rate=0.1, damping=1e-2, inverse_every=3),
    "tnt": dict(learning_rate=0.1, damping=1e-1, inverse_every=3),
    "shampoo": dict(learning_rate=0.05, damping=1e-4, inverse_every=3),
    "mbf": dict(learning_rate=0.1, damping=1e-2, inverse_every=3),
    "seng": dict(learning_rate=0.1, damping=1e-1, batch_size=BATCH, inverse_every=3),
    # eps 1e-3: at 1e-8 Adam's division in the eigenbasis amplifies the reduction-order
    # differences of near-zero second moments (docs/scale_out.md). The absolute step, on
    # which the tolerance was measured.
    "soap": dict(learning_rate=3e-3, damping=1e-3, inverse_every=3,
                 multiply_by_parameter_scale=False),
}
# Fisher of the capture per method: sampled where the method reads sampled targets.
FISHER = {"mbf": "empirical", "seng": "empirical", "shampoo": "empirical",
          "soap": "empirical"}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    hidden = nn.tanh(nn.Dense(8)(x))  # Dense_0: 4 -> 8
    return nn.Dense(3)(hidden)  # Dense_1: 8 -> 3


def problem(batch=BATCH):
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (batch, 4))
  y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (4, 3)), axis=-1)
  params = model.init(jax.random.key(2), x)["params"]
  return model, params, np.asarray(x), np.asarray(y)


def make_step(method, model):
  """`(tx, step)`: the method and its step `(params, state, x, y, i) -> (params, state)`,
  the capture's sampling key made from the step index `i` inside the step."""
  curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy,
                                fisher=FISHER.get(method, "sampled"))
  tx = getattr(soo, method)(**METHODS[method])

  def step(params, state, x, y, i):
    _, grads, curvature = curv_fn(params, x, y, jax.random.fold_in(jax.random.key(0), i))
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  return tx, step


def train(compiled, params, state, x, y, steps=STEPS, start=0):
  for i in range(start, start + steps):
    params, state = compiled(params, state, x, y, np.int32(i))
  return params, state


def max_rel(a, b):
  """Largest |a - b| / max|b| over the leaves."""
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))) /
                   max(float(np.max(np.abs(np.asarray(v)))), 1e-12))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def data_mesh(devices=None):
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


_FACTORIZATION = re.compile(
    r"= \(?(\w+)\[([\d,]*)\].*custom_call_target=\"lapack_\w(potrf|syevd|getrf|geqrf|gesdd|"
    r"gesvd|syev)\w*\"")


def factorizations(compiled) -> int:
  """Matrix factorizations (Cholesky, eigh, LU, QR, SVD) one device runs per execution of a
  compiled step (LAPACK calls in its HLO, times their batch; both `lax.cond` branches)."""
  count = 0
  for match in _FACTORIZATION.finditer(compiled.as_text()):
    dims = [int(d) for d in match.group(2).split(",") if d]
    count += int(np.prod(dims[:-2])) if len(dims) > 2 else 1
  return count


def lower_step(step, args, mesh=None, shardings=None):
  """`step` lowered (under `jax.set_mesh(mesh)` when given) for `args`."""
  if mesh is None:
    return jax.jit(step).lower(*args)
  with jax.set_mesh(mesh):
    return jax.jit(step, out_shardings=shardings).lower(*args)


def compile_step(step, args, mesh=None, shardings=None):
  """AOT-compiled `step` (under `jax.set_mesh(mesh)` when given)."""
  return lower_step(step, args, mesh, shardings).compile()


def methods_section(results, out_dir):
  """Every method on 8 devices and on one. The compilations (this test's cost) run on two
  threads while the next methods are traced (XLA compiles without holding the GIL)."""
  model, params, x, y = problem()
  mesh = data_mesh()
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  xs, ys = jax.device_put((x, y), batch)
  pool = concurrent.futures.ThreadPoolExecutor(2)
  jobs = {}
  for method in METHODS:
    tx, step = make_step(method, model)
    state = tx.init(params)
    args = jax.device_put((params, state), replicated)
    one = lower_step(step, (params, state, x, y, np.int32(0)))
    eight = lower_step(step, args + (xs, ys, np.int32(0)), mesh, (replicated, replicated))
    jobs[method] = (tx, step, state, args, pool.submit(one.compile), pool.submit(eight.compile))
  # Nothing runs before every compilation is done: the 8 simulated devices' collectives
  # must not wait on a core busy compiling.
  jobs = {method: job[:4] + (job[4].result(), job[5].result()) for method, job in jobs.items()}
  pool.shutdown()
  rel, per_device = {}, {}
  for method, (tx, step, state, args, one, eight) in jobs.items():
    p1, _ = train(one, params, state, x, y)
    with jax.set_mesh(mesh):
      p8, _ = train(eight, *args, xs, ys)
    assert jax.tree.leaves(p8)[0].sharding.mesh.size == 8
    rel[method] = max_rel(p8, p1)
    per_device[method] = [factorizations(one), factorizations(eight)]
    if method in ("kfac", "tnt"):
      np.savez(os.path.join(out_dir, f"{method}_one_device.npz"),
               *[np.asarray(l) for l in jax.tree.leaves(p1)])
      COMPILED[method] = (tx, step, eight, p8)
  results["methods"] = {"max_rel_diff": rel,
                        "factorizations_per_device_1_vs_8": per_device}


COMPILED = {}


def _factorizations_by_shape(compiled):
  counts = {}
  for match in _FACTORIZATION.finditer(compiled.as_text()):
    dims = [int(d) for d in match.group(2).split(",") if d]
    key = "x".join(map(str, dims[-2:]))
    counts[key] = counts.get(key, 0) + int(np.prod(dims[:-2]))
  return counts


def spread_section(results, out_dir):
  """Factorizations per device of `engine.solve_blocks` (the engine's batched refresh) on
  8 devices and on one: 32 blocks of 16x16, 32 of 32x32 and 5 of 8x8."""
  from secondorder_optax._src import engine, linalg  # pylint: disable=g-import-not-at-top
  mesh = data_mesh()
  solve = lambda block: linalg.checked_damped_inverse(block, jnp.float32(0.1))
  blocks = {"a": engine.Stacked(jnp.eye(16) * jnp.arange(1.0, 33.0)[:, None, None]),
            "b": engine.Stacked(jnp.eye(32) * jnp.arange(1.0, 33.0)[:, None, None]),
            **{f"c{i}": jnp.eye(8) * (i + 1) for i in range(5)}}
  fn = lambda b: engine.solve_blocks(solve, b)
  plain = jax.jit(fn).lower(blocks).compile()
  with jax.set_mesh(mesh):
    spread = jax.jit(fn).lower(blocks).compile()
    got = spread(blocks)
  assert max_rel(got, plain(blocks)) == 0.0
  one, eight = _factorizations_by_shape(plain), _factorizations_by_shape(spread)
  results["spread"] = {"factorizations_per_device_1_vs_8": {
      shape: [one[shape], eight.get(shape, 0)] for shape in one}}


RULES = [(r"/(statistics|preconditioner)/", P("data")), (r"/ema/", P(None, "data"))]


def state_section(results, out_dir):
  """KFAC with its factors sharded over the 8 devices, against the replicated run."""
  tx, step, _, replicated_params = COMPILED["kfac"]
  model, params, x, y = problem()
  mesh = data_mesh()
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  state = tx.init(params)
  try:
    soo.state_shardings(state, mesh, RULES)
    raise AssertionError("an unfit rule did not raise")
  except ValueError as error:
    assert "Dense_0" in str(error) or "Dense_1" in str(error), error
  shardings = soo.state_shardings(state, mesh, RULES, replicate_unfit=True)
  sharded = [soo.state_sharding_path(p) for p, s in
             jax.tree_util.tree_flatten_with_path(shardings)[0] if s.spec]
  assert sharded, "no state leaf is sharded"
  params, state = jax.device_put(params, replicated), jax.device_put(state, shardings)
  xs, ys = jax.device_put((x, y), batch)
  compiled = compile_step(step, (params, state, xs, ys, np.int32(0)), mesh,
                          (replicated, shardings))
  with jax.set_mesh(mesh):
    p, s = train(compiled, params, state, xs, ys, steps=STEPS - 2)
    saved_params, saved_state = p, s
    p, s = train(compiled, p, s, xs, ys, steps=2, start=STEPS - 2)
  COMPILED["sharded"] = (compiled, saved_params, saved_state, p, shardings)
  results["state"] = {"sharded_leaves": sharded,
                      "max_rel_diff_vs_replicated": max_rel(p, replicated_params)}


def orbax_section(results, out_dir):
  """Save the sharded KFAC state after 8 steps; restore onto the same 8 devices (resume:
  bit-identical) and onto 4 (resume: the same up to reduction order)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tx, step, _, _ = COMPILED["kfac"]
  compiled, saved_params, saved_state, final_params, _ = COMPILED["sharded"]
  model, params, x, y = problem()
  path = os.path.join(out_dir, "checkpoint")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": saved_params, "state": saved_state})
  checkpointer.wait_until_finished()
  diffs = {}
  for devices in (8, 4):
    mesh = data_mesh(jax.devices()[:devices])
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    shardings = soo.state_shardings(saved_state, mesh, RULES, replicate_unfit=True)
    target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                   sharding=replicated),
                                     saved_params),
              "state": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                      sharding=s),
                                    saved_state, shardings)}
    restored = checkpointer.restore(path, target)
    assert jax.tree.structure(restored["state"]) == jax.tree.structure(saved_state)
    leaf = jax.tree.leaves(restored["state"])[4]
    assert leaf.sharding.mesh.size == devices, leaf.sharding
    xs, ys = jax.device_put((x, y), batch)
    if devices == 8:
      for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(
          {"params": saved_params, "state": saved_state})):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      run = compiled
    else:
      run = compile_step(step, (restored["params"], restored["state"], xs, ys, np.int32(0)),
                         mesh, (replicated, shardings))
    with jax.set_mesh(mesh):
      p, _ = train(run, restored["params"], restored["state"], xs, ys, steps=2,
                   start=STEPS - 2)
    diffs[devices] = max_rel(p, final_params)
  assert diffs[8] == 0.0, diffs
  results["orbax"] = {"resume_max_rel_diff_by_devices": diffs}


SECTIONS = {"methods": methods_section, "spread": spread_section, "state": state_section,
            "orbax": orbax_section}


def gloo(out, process_id):
  """One of two processes (one device each): KFAC and TNT on a global batch of 32, each
  process holding its 16 examples; saves the final parameters next to `out`."""
  start = time.perf_counter()
  out_dir = os.path.dirname(os.path.abspath(out))
  assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
  model, params, x, y = problem()
  mesh = data_mesh()
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  local = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)
  xs = jax.make_array_from_process_local_data(batch, x[local], x.shape)
  ys = jax.make_array_from_process_local_data(batch, y[local], y.shape)
  global_ = lambda tree: jax.tree.map(
      lambda a: jax.make_array_from_callback(np.shape(a), replicated,
                                             lambda index, a=np.asarray(a): a[index]), tree)
  for method in ("kfac", "tnt"):
    tx, step = make_step(method, model)
    p, s = global_(params), global_(tx.init(params))
    compiled = compile_step(step, (p, s, xs, ys, np.int32(0)), mesh, (replicated, replicated))
    with jax.set_mesh(mesh):
      p, _ = train(compiled, p, s, xs, ys)
    np.savez(os.path.join(out_dir, f"{method}_process_{process_id}.npz"),
             *[np.asarray(leaf.addressable_data(0)) for leaf in jax.tree.leaves(p)])
  with open(out, "w") as f:
    json.dump({"process": process_id, "seconds": round(time.perf_counter() - start, 2)}, f)


def main():
  out = sys.argv[1]
  if len(sys.argv) > 2 and sys.argv[2] == "gloo":
    return gloo(out, int(sys.argv[3]))
  assert jax.device_count() == 8, jax.devices()
  sections = sys.argv[2:] or list(SECTIONS)
  results = {}
  for name in sections:
    start = time.perf_counter()
    SECTIONS[name](results, os.path.dirname(os.path.abspath(out)))
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
  with open(out, "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
