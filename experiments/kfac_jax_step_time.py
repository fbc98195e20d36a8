"""kfac-jax's KFAC step time vs its own Adam, for `experiments.step_time --kfac-jax-python`.

Runs in a separate environment with kfac-jax (0.0.8 needs jax 0.9.1, flax 0.12.6), so it
imports neither `secondorder_optax` nor `experiments`; it rebuilds the same autoencoder.
kfac-jax is used with fixed learning rate, momentum and damping (no adaptive rules, no
burn-in), `curvature_update_period` = our `stats_every`, `inverse_update_period` = our
`inverse_every`, curvature EMA 0.95. Convention (DESIGN §4): kfac-jax's output factor is
1/N of ours, so its direction at damping λ is N times ours at damping N·λ; the damping here
only affects timing. `--block tnt` uses kfac-jax's `DenseTNT` blocks for every dense layer
instead of its Kronecker-factored ones (their factors weight each example's input and
output gradient by the other's norm, as our TKFAC does). Prints one
`STEP_TIME_RESULT {json}` line.
"""

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import optax


BLOCKS = {"kfac": kfac_jax.DenseTwoKroneckerFactored, "tnt": kfac_jax.DenseTNT}


class Autoencoder(nn.Module):
  sizes: tuple
  output_dim: int

  @nn.compact
  def __call__(self, x):
    for size in self.sizes[:-1]:
      x = nn.relu(nn.Dense(size)(x))
    x = nn.Dense(self.sizes[-1])(x)
    for size in self.sizes[-2::-1]:
      x = nn.relu(nn.Dense(size)(x))
    return nn.Dense(self.output_dim)(x)


def _timed(step, warmup, steps):
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    jax.block_until_ready(step(i))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times), float(np.mean(times))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--input-dim", type=int, default=784)
  p.add_argument("--hidden", default="1000,500,250,30")
  p.add_argument("--stats-every", type=int, default=1)
  p.add_argument("--inverse-every", type=int, default=20)
  p.add_argument("--damping", type=float, default=1e-3)
  p.add_argument("--block", choices=("kfac", "tnt"), default="kfac",
                 help="kfac-jax curvature block for dense layers")
  args = p.parse_args()

  sizes = tuple(int(v) for v in args.hidden.split(","))
  model = Autoencoder(sizes, args.input_dim)
  x = jnp.asarray(np.random.default_rng(0).random((args.batch_size, args.input_dim),
                                                  dtype=np.float32))
  params = model.init(jax.random.key(0), x[:1])["params"]
  param_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params))

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, batch), axis=-1))

  adam = optax.adam(1e-3)
  adam_state = adam.init(params)

  @jax.jit
  def adam_step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  start = time.perf_counter()
  adam_step = adam_step.lower(params, adam_state, x).compile()
  adam_compile = time.perf_counter() - start
  holder = {"p": params, "s": adam_state}

  def run_adam(_):
    holder["p"], holder["s"], loss = adam_step(holder["p"], holder["s"], x)
    return loss

  adam_median, adam_mean = _timed(run_adam, args.warmup, args.steps)

  optimizer = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
      use_adaptive_learning_rate=False, learning_rate_schedule=lambda step: 1e-3,
      use_adaptive_momentum=False, momentum_schedule=lambda step: 0.9,
      use_adaptive_damping=False, damping_schedule=lambda step: args.damping,
      curvature_ema=0.95, curvature_update_period=args.stats_every,
      inverse_update_period=args.inverse_every, num_burnin_steps=0, multi_device=False,
      layer_tag_to_block_ctor={"dense": BLOCKS[args.block]})
  rng = jax.random.key(1)
  start = time.perf_counter()
  kfac_params = jax.tree.map(jnp.copy, params)  # kfac-jax donates its inputs.
  state = optimizer.init(kfac_params, rng, x)
  holder = {"p": kfac_params, "s": state}

  def run_kfac(i):
    holder["p"], holder["s"], stats = optimizer.step(
        holder["p"], holder["s"], jax.random.fold_in(rng, i), batch=x, global_step_int=i)
    return stats["loss"]

  jax.block_until_ready(run_kfac(0))  # kfac-jax compiles inside its first steps.
  kfac_compile = time.perf_counter() - start
  median, mean = _timed(lambda i: run_kfac(i + 1), args.warmup, args.steps)
  state_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(holder["s"])
                    if hasattr(a, "dtype"))
  result = {
      "method": f"kfac-jax {args.block.upper()}", "setting": None,
      "overrides": {"stats_every": args.stats_every, "inverse_every": args.inverse_every},
      "compile_seconds": kfac_compile, "median_step_seconds": median,
      "mean_step_seconds": mean, "steps": args.steps, "state_bytes": int(state_bytes),
      "param_bytes": int(param_bytes), "kfac_jax_version": kfac_jax.__version__,
      "jax": jax.__version__,
      "adam": {"method": "adam", "compile_seconds": adam_compile,
               "median_step_seconds": adam_median, "mean_step_seconds": adam_mean},
      "ratio_median": median / adam_median, "ratio_amortized": mean / adam_mean,
  }
  print("STEP_TIME_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
