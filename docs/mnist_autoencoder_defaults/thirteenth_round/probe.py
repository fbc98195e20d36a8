"""Per-step probe of the thirteenth round: a method on the digits MLP (75 steps).

  python probe.py METHOD SEED on|off [KEY=VALUE ...]

Each step's batch loss (before the step), the full training set's loss after it, the exact
empirical-Fisher quadratic E_n (grad l_n . u)^2 of the step u taken (per layer and in
total), -<u, g>, and each kernel's relative change. `off` replaces the exact model cap by
infinity (the KL estimate alone, as before this round).
"""
import sys

import jax
import jax.numpy as jnp

from experiments import defaults_sweep as ds, methods, training
from secondorder_optax._src import kl_clip, patches


def main(name, seed, cap, settings):
  if not cap:
    kl_clip.exact_model_cap_scale = lambda *args: jnp.asarray(jnp.inf, jnp.float32)
  over = {k: methods.parse_value(v) for k, v in (kv.split("=") for kv in settings)}
  task, dataset, batch, epochs = ds.load_task("digits_mlp", None)
  method = methods.library_defaults(name)
  tx = method.build(method.learning_rate, batch_size=batch, **over)
  x = jnp.asarray(task.inputs(dataset.x_train))
  t = jnp.asarray(task.targets(dataset.x_train, dataset.y_train))
  params, model_state = training.init_model(task, x[:1], seed)
  step = jax.jit(training.train_step_fn(task, tx, method.capture_fisher(over),
                                        method.second_pass))
  loss_and_grads = training.loss_and_grads_fn(task, "empirical")
  full_loss = jax.jit(lambda p: loss_and_grads(p, model_state, x, t, jax.random.key(0))[0])

  @jax.jit
  def quadratic(params, u, idx, rng):
    _, grads, curvature, _ = loss_and_grads(params, model_state, x[idx], t[idx], rng)
    total, per_layer = 0.0, {}
    for path, stats in curvature.layers.items():
      d = patches.directional_derivatives(stats, patches.tree_get(u, path))
      per_layer[path[-1]] = jnp.mean(d ** 2)
      total = total + d
    pairing = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(grads)))
    return jnp.mean(total ** 2), per_layer, pairing

  state, n = tx.init(params), 0
  for epoch in range(epochs):
    for idx in training.epoch_batches(len(x), batch, seed, epoch):
      old, rng = params, jax.random.fold_in(jax.random.key(seed), n)
      params, model_state, state, loss = step(params, model_state, state, x, t, idx, rng)
      u = jax.tree.map(lambda a, b: a - b, params, old)
      q, per_layer, pairing = quadratic(old, u, idx, rng)
      moves = {k: float(jnp.linalg.norm(u[k]["kernel"]) / jnp.linalg.norm(old[k]["kernel"]))
               for k in params}
      print(n, f"batch {float(loss):.3f} full {float(full_loss(params)):.3f}",
            f"exact {float(q):.3g} -<u,g> {-float(pairing):.3g}",
            "| moves", " ".join(f"{k}:{v:.3g}" for k, v in moves.items()),
            "| exact per layer", " ".join(f"{k}:{float(v):.3g}" for k, v in per_layer.items()),
            flush=True)
      n += 1


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on", sys.argv[4:])
