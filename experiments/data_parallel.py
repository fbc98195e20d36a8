"""Data-parallel training with a second-order optimizer: a template to copy.

An MNIST classifier (784-256-128-10 MLP) trained by KFAC (or any `--method`) with the batch
sharded over every device, parameters replicated and the optimizer state replicated or, with
`--shard-state`, sharded by `soo.state_shardings` rules. Under `jax.set_mesh(mesh)` the
optimizer spreads each bucket of same-shape refreshes over the devices. Without a GPU/TPU,
`--simulate-devices 8` makes 8 CPU devices (it must be set before jax starts, so this script
re-reads it first thing).

    python -m experiments.data_parallel --simulate-devices 8
    python -m experiments.data_parallel --data-dir ../shared/data --shard-state --steps 300
    python -m experiments.data_parallel --method tnt --batch-size 512

With `--data-dir` it reads `mnist.npz` (Keras layout: `x_train`, `y_train`, `x_test`,
`y_test`) from that folder; without one it trains on synthetic data of the same shapes
(a fixed random teacher labels random images), so it runs anywhere.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", default="kfac",
                      help="kfac, ekfac, tkfac, tekfac, tnt, shampoo, mbf, seng or soap")
  parser.add_argument("--learning-rate", type=float, default=None,
                      help="default: the method's default")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=256,
                      help="global batch size (a multiple of the device count)")
  parser.add_argument("--data-dir", default=None,
                      help="folder with mnist.npz; synthetic data when not given")
  parser.add_argument("--shard-state", action="store_true",
                      help="shard the optimizer state's factors over the devices")
  parser.add_argument("--simulate-devices", type=int, default=None,
                      help="run on this many simulated CPU devices")
  parser.add_argument("--log-every", type=int, default=50)
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.simulate_devices:  # before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.simulate_devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import secondorder_optax as soo


class Classifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(256)(x))
    x = nn.tanh(nn.Dense(128)(x))
    return nn.Dense(10)(x)


def load_data(data_dir):
  """`(x_train, y_train, x_test, y_test)`: float32 images in [0, 1] (flattened), int labels."""
  if data_dir:
    with np.load(os.path.join(data_dir, "mnist.npz")) as f:
      xs = [f[k].reshape(len(f[k]), -1).astype(np.float32) / 255.0 for k in ("x_train", "x_test")]
      return xs[0], f["y_train"].astype(np.int32), xs[1], f["y_test"].astype(np.int32)
  rng = np.random.default_rng(0)
  x = rng.random((12000, 784), dtype=np.float32)
  teacher = rng.standard_normal((784, 10)).astype(np.float32)
  y = np.argmax((x - 0.5) @ teacher, axis=-1).astype(np.int32)
  return x[:10000], y[:10000], x[10000:], y[10000:]


def main(args):
  devices = jax.devices()
  if args.batch_size % len(devices):
    raise ValueError(f"--batch-size {args.batch_size} is not a multiple of the "
                     f"{len(devices)} devices")
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  x_train, y_train, x_test, y_test = load_data(args.data_dir)

  model = Classifier()
  params = model.init(jax.random.key(0), x_train[:1])["params"]
  curv_fn = soo.linen_curvature(model, soo.losses.softmax_cross_entropy)
  hyper = {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
  if args.method == "seng":
    hyper["batch_size"] = args.batch_size
  tx = getattr(soo, args.method)(**hyper)
  state = tx.init(params)

  if args.shard_state:
    # Every factor, inverse and eigenbasis split along its first axis; what the device count
    # does not divide stays replicated.
    state_sharding = soo.state_shardings(
        state, mesh, [(r"/(statistics|preconditioner)/", P("data"))], replicate_unfit=True)
  else:
    state_sharding = jax.tree.map(lambda _: replicated, state)
  params = jax.device_put(params, replicated)
  state = jax.device_put(state, state_sharding)

  def train_step(params, state, x, y, rng):
    loss, grads, curvature = curv_fn(params, x, y, rng)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state, loss

  train_step = jax.jit(train_step, out_shardings=(replicated, state_sharding, replicated))

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  rng = np.random.default_rng(1)
  start = None
  with jax.set_mesh(mesh):  # the optimizer spreads its refreshes over this mesh
    for step in range(args.steps):
      index = rng.choice(len(x_train), args.batch_size, replace=False)
      x, y = jax.device_put((x_train[index], y_train[index]), batch_sharding)
      params, state, loss = train_step(params, state, x, y, jax.random.key(step))
      if step == 0:
        jax.block_until_ready(loss)
        start = time.perf_counter()  # after compilation
      if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
        print(f"step {step + 1:5d}  loss {float(loss):.4f}", flush=True)
    jax.block_until_ready(params)
    seconds = (time.perf_counter() - start) / max(args.steps - 1, 1)
    test = jax.device_put((x_test, y_test), replicated)
    print(f"{args.method} on {len(devices)} devices (state "
          f"{'sharded' if args.shard_state else 'replicated'}): test accuracy "
          f"{float(accuracy(params, *test)):.4f}, {seconds * 1e3:.1f} ms/step")


if __name__ == "__main__":
  main(ARGS)
