"""Probe: K-BFGS(L) conv extension with the secant y of conv layers divided by T**p.

`y` is the change of the mean output gradient, so it is divided by dividing the output
gradients that `Kbfgs.step` reads (its statistics and the direction are unchanged; a dense
layer has T = 1). Reads the data from `$SOO_DATA_DIR`.
"""
import sys, json
from secondorder_optax._src import kbfgs as kb, kronecker
from experiments import defaults_sweep as ds, methods
p = float(sys.argv[1]); extra = dict(kv.split("=") for kv in sys.argv[2:])
extra = {k: methods.parse_value(v) for k, v in extra.items()}
library_step, layer_view = kb.Kbfgs.step, kronecker.layer_view

def scaled_view(stats, dtype):
  a, g = layer_view(stats, dtype)
  return a, g / a.shape[1] ** p

def step(self, *args, **kwargs):
  kronecker.layer_view = scaled_view  # only while the step is traced
  try:
    return library_step(self, *args, **kwargs)
  finally:
    kronecker.layer_view = layer_view

kb.Kbfgs.step = step
task, dataset, batch, epochs = ds.load_task("fmnist_cnn", None)
m = methods.library_defaults("kbfgs")
r = ds.run_one(task, dataset, m, batch=batch, epochs=epochs, settings={"layers": None, **extra}, seed=0)
print(json.dumps({"p": p, **{k: str(v) for k, v in extra.items()}, "train_loss": r["train_loss"], "diverged": r["diverged"]}), flush=True)
