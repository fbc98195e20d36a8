# Usage: SOO_DATA_DIR=DIR python per_step.py METHOD [KEY=VALUE ...]  (Fashion-MNIST CNN, seed 0)
import sys, jax, jax.numpy as jnp
from experiments import defaults_sweep as ds, methods, training
name = sys.argv[1]; over = dict(kv.split("=") for kv in sys.argv[2:])
over = {k: methods.parse_value(v) for k, v in over.items()}
task, dataset, batch, epochs = ds.load_task("fmnist_cnn", None)
m = methods.library_defaults(name)
tx = m.build(m.learning_rate, batch_size=batch, **over)
x_train = task.inputs(dataset.x_train); t_train = task.targets(dataset.x_train, dataset.y_train)
params, ms = training.init_model(task, x_train[:1], 0)
st = tx.init(params)
step = jax.jit(training.train_step_fn(task, tx, m.capture_fisher(over), m.second_pass))
inputs, targets = jnp.asarray(x_train), jnp.asarray(t_train)
out=[]
n=0
for ep in range(2):
  idxs = training.epoch_batches(len(x_train), batch, 0, ep)
  for i in range(len(idxs)):
    old = params
    params, ms, st, loss = step(params, ms, st, inputs, targets, idxs[i], jax.random.fold_in(jax.random.key(0), n))
    rel = {k: float(jnp.linalg.norm(params[k]["kernel"] - old[k]["kernel"]) / jnp.linalg.norm(old[k]["kernel"])) for k in params}
    if n < 16 or n % 8 == 0:
      print(n, f"{float(loss):.3f}", " ".join(f"{k}:{v:.3g}" for k, v in rel.items()), flush=True)
    out.append(float(loss)); n+=1
import numpy as np
print("last-epoch mean", np.mean(out[len(out)//2:]))
