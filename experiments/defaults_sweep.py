"""The procedure that chose the library's defaults: `python -m experiments.defaults_sweep`.

Every method (Adam included) runs the same short training on three tasks, from the same
initial parameters and batch order, at every point of one shared grid; each run appends a
JSON line (task, method, settings, training loss per epoch, seconds per step) to `--out`.
`docs/defaults.md` says how the defaults were read off the lines.

Tasks (`TASKS`): the papers' MNIST autoencoder on the first 10,000 training images (batch
1000), a small conv classifier on the first 5,000 Fashion-MNIST images (batch 128), and an
MLP classifier on the embedded 8x8 digits (batch 100). The first two read `--data-dir`.

Example (one point of the grid, digits only):
  python -m experiments.defaults_sweep --tasks digits_mlp --methods kfac \
      --grid learning_rate=0.1 --grid damping=0.1 --out /tmp/sweep.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from typing import Any, Dict, List, Optional, Sequence

from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import training

# name -> (task, dataset, train subset, batch size, epochs)
TASKS = {
    "mnist_ae": ("autoencoder", "mnist", 10000, 1000, 5),
    "fmnist_cnn": ("cnn", "fashion_mnist", 5000, 128, 2),
    "digits_mlp": ("mlp", "digits", None, 100, 5),
}


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
  """`["learning_rate=0.1,1", "damping=0.1"]` -> `{"learning_rate": [0.1, 1], ...}`."""
  grid = {}
  for item in items:
    key, _, values = item.partition("=")
    grid[key] = [methods_lib.parse_value(v) for v in values.split(",")]
  return grid


def load_task(name: str, data_dir: Optional[str]):
  task_name, dataset_name, subset, batch, epochs = TASKS[name]
  dataset = data_lib.load_dataset(dataset_name, data_dir=data_dir)
  if subset:
    dataset = dataset._replace(x_train=dataset.x_train[:subset],
                               y_train=dataset.y_train[:subset])
  return training.make_task(task_name, dataset), dataset, batch, epochs


def run_one(task, dataset, method, *, batch, epochs, settings, seed):
  settings = dict(settings)
  lr = settings.pop("learning_rate", None)
  run = training.train(task, dataset, method, epochs=epochs, batch_size=batch,
                       learning_rate=lr, seed=seed, progress=False, overrides=settings)
  return {"learning_rate": lr, "train_loss": run["train_loss"],
          "seconds_per_step": run["seconds_per_step"], "diverged": run["diverged"]}


def main(argv: Optional[Sequence[str]] = None) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.defaults_sweep")
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--methods", default=",".join(methods_lib.available_names()))
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                 help="a hyperparameter and its values (repeatable; product of all)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sweep-baselines", action="store_true",
                 help="run the baselines on the grid too (default: once, at their presets)")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  grid = parse_grid(args.grid)
  keys = sorted(grid)
  for task_name in args.tasks.split(","):
    task, dataset, batch, epochs = load_task(task_name, args.data_dir)
    for name in args.methods.split(","):
      method = methods_lib.library_defaults(name)
      points = [dict(zip(keys, values)) for values in itertools.product(
          *(grid[k] for k in keys))] or [{}]
      if name in methods_lib.BASELINES and not args.sweep_baselines:
        points = [{}]  # the baselines run once, at their presets (Adam: lr 1e-3)
      for point in points:
        start = time.perf_counter()
        try:
          result = run_one(task, dataset, method, batch=batch, epochs=epochs,
                           settings=point, seed=args.seed)
        except (TypeError, ValueError) as e:  # a setting the method does not take
          result = {"error": str(e)[:200]}
        line = {"task": task_name, "method": name, "settings": point, **result,
                "wall_seconds": time.perf_counter() - start}
        final = result.get("train_loss", [math.nan])[-1]
        print(f"{task_name:10s} {name:8s} {point} -> {final:.4g}", flush=True)
        with open(args.out, "a") as f:
          f.write(json.dumps(line, default=str) + "\n")


if __name__ == "__main__":
  main()
