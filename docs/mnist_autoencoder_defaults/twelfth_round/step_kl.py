# Usage: SOO_DATA_DIR=DIR python step_kl.py fmnist_cnn|mnist_ae METHOD [KEY=VALUE ...]
import sys, jax, jax.numpy as jnp
from experiments import defaults_sweep as ds, methods, training
from secondorder_optax._src import patches
taskname, name = sys.argv[1], sys.argv[2]; over = dict(kv.split("=") for kv in sys.argv[3:])
over = {k: methods.parse_value(v) for k, v in over.items()}
task, dataset, batch, epochs = ds.load_task(taskname, None)
m = methods.library_defaults(name)
tx = m.build(m.learning_rate, batch_size=batch, **over)
x_train = task.inputs(dataset.x_train); t_train = task.targets(dataset.x_train, dataset.y_train)
params, ms = training.init_model(task, x_train[:1], 0)
st = tx.init(params)
fisher = m.capture_fisher(over)
step = jax.jit(training.train_step_fn(task, tx, fisher, m.second_pass))
lg = training.loss_and_grads_fn(task, fisher)
@jax.jit
def exact_q(params, u, inputs, targets, rng):
  loss, grads, curv, _ = lg(params, ms, inputs, targets, rng)
  layers, _ = curv.materialize()
  d = 0.
  per = {}
  for path, s in layers.items():
    a = patches.layer_inputs(s); g = patches.layer_output_grads(s)
    w = patches.params_to_matrix(patches.tree_get(u, path), s.has_bias)
    dn = jnp.einsum("nti,io,nto->n", a, w, g)
    per[path[-1]] = jnp.mean(dn**2)
    d = d + dn
  gu = sum(jnp.vdot(a_, b_) for a_, b_ in zip(jax.tree.leaves(u), jax.tree.leaves(grads)))
  return jnp.mean(d**2), per, gu
inputs, targets = jnp.asarray(x_train), jnp.asarray(t_train)
idxs = training.epoch_batches(len(x_train), batch, 0, 0)
for n in range(min(14, len(idxs))):
  old = params
  rng = jax.random.fold_in(jax.random.key(0), n)
  params, ms, st, loss = step(params, ms, st, inputs, targets, idxs[n], rng)
  u = jax.tree.map(lambda a, b: a - b, params, old)
  q, per, gu = exact_q(old, u, inputs[idxs[n]], targets[idxs[n]], rng)
  print(n, f"loss {float(loss):.3f} exactKL(u)={float(q):.4g} -<u,g>={-float(gu):.4g}", " ".join(f"{k}:{float(v):.3g}" for k, v in per.items()), flush=True)
