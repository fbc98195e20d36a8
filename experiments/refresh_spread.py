"""Per-device refresh cost and step time with the refreshes spread over the mesh.

A deep MLP of equal-width layers (so that the refreshes form large buckets of same-shape
blocks) trained data parallel on `--devices` simulated CPU devices, refreshing at every step
(`inverse_every=1`), in two settings:

* `replicated`: the step jitted with the batch sharded but no ambient mesh: every device
  refreshes every block (the plain data-parallel program);
* `spread`: the same step under `jax.set_mesh(mesh)`: each bucket is sharded along its stack
  axis and every device refreshes its share.

It reports the matrix factorizations one device runs per step (LAPACK calls in the compiled
HLO times their batch) and the median step time. Simulated devices share the host's cores,
so the replicated program really runs every refresh once per device.

    python -m experiments.refresh_spread
    python -m experiments.refresh_spread --method shampoo --width 256 --depth 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", default="kfac")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--settings", default="replicated,spread")
  parser.add_argument("--output", default=None, help="write the results as JSON here")
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import secondorder_optax as soo

_FACTORIZATION = re.compile(
    r"= \(?\w+\[([\d,]*)\].*custom_call_target=\"lapack_\w(potrf|syevd|getrf|geqrf|gesdd|"
    r"gesvd|syev)\w*\"")


def factorizations(compiled) -> int:
  """Factorizations one device runs per execution (both branches of every `lax.cond`)."""
  count = 0
  for match in _FACTORIZATION.finditer(compiled.as_text()):
    dims = [int(d) for d in match.group(1).split(",") if d]
    count += int(np.prod(dims[:-2])) if len(dims) > 2 else 1
  return count


class DeepMLP(nn.Module):
  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.tanh(nn.Dense(self.width, use_bias=False)(x))
    return nn.Dense(10, use_bias=False)(x)


def measure(args):
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  model = DeepMLP(args.width, args.depth)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch_size, args.width)).astype(np.float32)
  y = rng.integers(0, 10, args.batch_size).astype(np.int32)
  params = model.init(jax.random.key(0), x[:1])["params"]
  curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)
  hyper = {"inverse_every": 1}
  if args.method == "seng":
    hyper["batch_size"] = args.batch_size
  tx = getattr(soo, args.method)(**hyper)

  def step(params, state, x, y, rng):
    _, grads, curvature = curv_fn(params, x, y, rng)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  params, state = jax.device_put((params, tx.init(params)), replicated)
  x, y = jax.device_put((x, y), batch)
  results = {"method": args.method, "devices": len(devices), "width": args.width,
             "depth": args.depth, "batch_size": args.batch_size}
  for setting in args.settings.split(","):
    jitted = jax.jit(step, out_shardings=(replicated, replicated))
    if setting == "spread":
      with jax.set_mesh(mesh):
        compiled = jitted.lower(params, state, x, y, jax.random.key(0)).compile()
    else:
      compiled = jitted.lower(params, state, x, y, jax.random.key(0)).compile()
    print(setting, "compiled", flush=True)
    p, s = params, state
    times = []
    for i in range(args.steps + 1):
      start = time.perf_counter()
      if setting == "spread":
        with jax.set_mesh(mesh):
          p, s = compiled(p, s, x, y, jax.random.key(i))
      else:
        p, s = compiled(p, s, x, y, jax.random.key(i))
      jax.block_until_ready(p)
      times.append(time.perf_counter() - start)
    results[setting] = {"factorizations_per_device": factorizations(compiled),
                        "median_step_ms": round(1e3 * float(np.median(times[1:])), 1)}
    results[setting + "_params"] = p
  finals = [results.pop(key) for key in ("replicated_params", "spread_params")
            if key in results]
  if len(finals) == 2:
    results["max_abs_param_diff"] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])))
  return results


def main(args):
  results = measure(args)
  print(json.dumps(results, indent=1))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(ARGS)
