"""Diagnose K-BFGS(L)'s conv extension on the Fashion-MNIST CNN: per layer and step, the
secant curvature of the newest pair against m_G (the mean eigenvalue of KFAC's G)."""
import sys, math
import jax, jax.numpy as jnp, numpy as np
from secondorder_optax._src import kbfgs as kb
from secondorder_optax._src.damping import per_factor
from experiments import defaults_sweep as ds, methods, training

layers = None if len(sys.argv) < 2 or sys.argv[1] == "all" else sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 80
task, dataset, batch, epochs = ds.load_task("fmnist_cnn", None)  # reads $SOO_DATA_DIR
m = methods.library_defaults("kbfgs")
tx = m.build(m.learning_rate, batch_size=batch, layers=layers)
fisher = m.capture_fisher({})
x_train = task.inputs(dataset.x_train); t_train = task.targets(dataset.x_train, dataset.y_train)
params, model_state = training.init_model(task, x_train[:1], 0)
opt_state = tx.init(params)
step = jax.jit(training.train_step_fn(task, tx, fisher, True))
inputs, targets = jnp.asarray(x_train), jnp.asarray(t_train)
key = jax.random.key(0)
gamma = float(per_factor(jnp.asarray(1.0), 2))

def find(tree, cls):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, cls))[0]
  return [(jax.tree_util.keystr(p), l) for p, l in flat if isinstance(l, cls)]

n = 0
for epoch in range(epochs):
  for idx in training.epoch_batches(len(x_train), batch, 0, epoch):
    old = params
    params, model_state, opt_state, loss = step(params, model_state, opt_state, inputs, targets, idx, jax.random.fold_in(key, n))
    n += 1
    precs = find(opt_state, kb.KbfgsPreconditioner)
    stats = find(opt_state, kb.KbfgsStatistics)
    row = [f"{n:3d} loss {float(loss):7.3f}"]
    rel = {k: float(jnp.linalg.norm(params[k]["kernel"] - old[k]["kernel"]) / jnp.linalg.norm(old[k]["kernel"])) for k in params}
    row.append(" ".join(f"{k}:{v:.3g}" for k, v in rel.items()))
    for (pp, p), (sp, s) in zip(precs, stats):
      name = pp.split("'")[-2] if "'" in pp else pp
      mG = float(s.output_scale)
      newest = (int(p.next_slot) - 1) % p.filled.shape[0]
      sv, yv = np.asarray(p.pairs.s[newest]), np.asarray(p.pairs.y[newest])
      mu2 = gamma * mG
      sy, ss, yy = sv @ yv, sv @ sv, yv @ yv
      raw = (sy - mu2 * ss) / max(ss, 1e-30)
      h0 = sy / max(yy, 1e-30)
      row.append(f"{name}: raw/mG {raw/mG:8.3g} h0*mG {h0*mG:7.3g} pairs {int(p.filled.sum())}")
    if n % 4 == 0 or n < 8 or not math.isfinite(float(loss)):
      print(" | ".join(row), flush=True)
    if n >= steps: break
  if n >= steps: break
