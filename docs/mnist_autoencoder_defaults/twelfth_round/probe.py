"""Per-step probes of the twelfth round (read the data from $SOO_DATA_DIR; seed 0).

  python probe.py moves METHOD [KEY=VALUE ...]
      Fashion-MNIST CNN, two epochs: each step's loss and each kernel's relative change.
  python probe.py kl fmnist_cnn|mnist_ae METHOD [KEY=VALUE ...]
      the first 14 steps: the exact (sampled) Fisher quadratic E_n (grad l~_n . u)^2 of the
      step u taken, per layer and in total (cross-layer terms included), and -<u, g>.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import defaults_sweep as ds, methods, training
from secondorder_optax._src import patches


def setup(task_name, name, settings):
  over = {k: methods.parse_value(v) for k, v in (kv.split("=") for kv in settings)}
  task, dataset, batch, _ = ds.load_task(task_name, None)
  method = methods.library_defaults(name)
  tx = method.build(method.learning_rate, batch_size=batch, **over)
  x_train = task.inputs(dataset.x_train)
  t_train = task.targets(dataset.x_train, dataset.y_train)
  params, model_state = training.init_model(task, x_train[:1], 0)
  fisher = method.capture_fisher(over)
  step = jax.jit(training.train_step_fn(task, tx, fisher, method.second_pass))
  return (task, fisher, step, params, model_state, tx.init(params), batch,
          jnp.asarray(x_train), jnp.asarray(t_train))


def moves(name, settings):
  _, _, step, params, model_state, state, batch, inputs, targets = setup(
      "fmnist_cnn", name, settings)
  losses, n = [], 0
  for epoch in range(2):
    for idx in training.epoch_batches(len(inputs), batch, 0, epoch):
      old = params
      params, model_state, state, loss = step(params, model_state, state, inputs, targets,
                                              idx, jax.random.fold_in(jax.random.key(0), n))
      rel = {k: float(jnp.linalg.norm(params[k]["kernel"] - old[k]["kernel"])
                      / jnp.linalg.norm(old[k]["kernel"])) for k in params}
      if n < 16 or n % 8 == 0:
        print(n, f"{float(loss):.3f}", " ".join(f"{k}:{v:.3g}" for k, v in rel.items()),
              flush=True)
      losses.append(float(loss))
      n += 1
  print("last-epoch mean", np.mean(losses[len(losses) // 2:]))


def kl(task_name, name, settings):
  task, fisher, step, params, model_state, state, batch, inputs, targets = setup(
      task_name, name, settings)
  loss_and_grads = training.loss_and_grads_fn(task, fisher)

  @jax.jit
  def quadratic(params, u, inputs, targets, rng):
    _, grads, curvature, _ = loss_and_grads(params, model_state, inputs, targets, rng)
    layers, _ = curvature.materialize()
    total, per_layer = 0.0, {}
    for path, stats in layers.items():
      a, g = patches.layer_inputs(stats), patches.layer_output_grads(stats)
      w = patches.params_to_matrix(patches.tree_get(u, path), stats.has_bias)
      derivative = jnp.einsum("nti,io,nto->n", a, w, g)
      per_layer[path[-1]] = jnp.mean(derivative ** 2)
      total = total + derivative
    pairing = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(grads)))
    return jnp.mean(total ** 2), per_layer, pairing

  idxs = training.epoch_batches(len(inputs), batch, 0, 0)
  for n in range(min(14, len(idxs))):
    old, rng = params, jax.random.fold_in(jax.random.key(0), n)
    params, model_state, state, loss = step(params, model_state, state, inputs, targets,
                                            idxs[n], rng)
    u = jax.tree.map(lambda x, y: x - y, params, old)
    q, per_layer, pairing = quadratic(old, u, inputs[idxs[n]], targets[idxs[n]], rng)
    print(n, f"loss {float(loss):.3f} exactKL(u)={float(q):.4g} -<u,g>={-float(pairing):.4g}",
          " ".join(f"{k}:{float(v):.3g}" for k, v in per_layer.items()), flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "moves":
    moves(sys.argv[2], sys.argv[3:])
  else:
    kl(sys.argv[2], sys.argv[3], sys.argv[4:])
