"""Probe: K-BFGS(L) conv extension with the secant y of conv layers divided by T**p."""
import sys, json
import jax.numpy as jnp
from secondorder_optax._src import kbfgs as kb, kronecker, linalg
from secondorder_optax._src import quasi_newton as qn
from experiments import defaults_sweep as ds, methods
p = float(sys.argv[1]); extra = dict(kv.split("=") for kv in sys.argv[2:])
extra = {k: methods.parse_value(v) for k, v in extra.items()}
orig_mean_rows = kb._mean_rows
def step(self, info, preconditioner, grad, hyperparameters, *, data, statistics):
  damping = hyperparameters["damping"]
  dtype = preconditioner.input_inverse.dtype
  a, g = kronecker.layer_view(data.current, dtype)
  a_prev, g_prev = kronecker.layer_view(data.previous, dtype)
  locations = a.shape[1]
  mean_input = kb._mean_rows(a)
  factor = statistics.input_factor
  damped = linalg.add_to_diagonal(factor, kb.relative_damping(damping, factor, order=2))
  s_a = linalg.matmul(preconditioner.input_inverse, mean_input)
  y_a = linalg.matmul(damped, s_a)
  input_inverse = jnp.where(jnp.trace(factor) > 0, qn.bfgs_inverse_update(preconditioner.input_inverse, s_a, y_a), preconditioner.input_inverse)
  s = (linalg.matmul(mean_input, data.weights.astype(dtype)) - linalg.matmul(kb._mean_rows(a_prev), data.previous_weights.astype(dtype)))
  y = (kb._mean_rows(g) - kb._mean_rows(g_prev)) / (locations ** p)
  lm_damping, fallback = kb._output_damping(statistics, damping)
  ring = preconditioner.pairs
  hy = qn.two_loop(ring.s, ring.y, preconditioner.filled, preconditioner.next_slot, kb._initial_scale(preconditioner, fallback), y)
  s, y = qn.double_damping(s, y, hy, lm_damping)
  accept = data.has_previous & qn.curvature_ok(s, y)
  s_ring, y_ring, filled, next_slot = qn.push_pair(ring.s, ring.y, preconditioner.filled, preconditioner.next_slot, s, y, accept)
  return kb.KbfgsPreconditioner(input_inverse, kb.SecantPair(s_ring, y_ring), filled, next_slot)
kb.Kbfgs.step = step
task, dataset, batch, epochs = ds.load_task("fmnist_cnn", "/work/shared/data")
m = methods.library_defaults("kbfgs")
r = ds.run_one(task, dataset, m, batch=batch, epochs=epochs, settings={"layers": None, **extra}, seed=0)
print(json.dumps({"p": p, **{k: str(v) for k, v in extra.items()}, "train_loss": r["train_loss"], "diverged": r["diverged"]}), flush=True)
