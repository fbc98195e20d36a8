"""Compares optimizers on one task: `python -m experiments.compare`.

With no arguments: the deep autoencoder on scikit-learn's embedded 8x8 digits, every method
available in the installed `secondorder_optax` at the library's defaults (`soo.<m>()`), plus
the baselines users pick today (`optax.adam(1e-3)`, `optax.adamw(1e-3)`, SGD-momentum,
`optax.contrib.muon`), same initial parameters and batch order for all. About two minutes
on 2 CPU cores, no network, no data files. `--presets` runs the second-order methods at the
tuned presets of `experiments/methods.py` instead.

The papers' benchmark (MNIST autoencoder, 10 epochs, batch 1000):

    python -m experiments.compare --dataset mnist --data-dir ../shared/data --epochs 10

Writes to `--output-dir`: `results.json` (configuration, every run's curves, the summary),
`curves.csv`, `loss_vs_epoch.png`, `loss_vs_seconds.png` (and `accuracy_vs_epoch.png` for
classifiers), `summary.md`; prints the summary table: final and best training loss, seconds
per step and its ratio to Adam's, epochs and seconds to reach Adam's final training loss.
With `--lr-grid 0.3,1,3` every method (Adam included) is also run at those multiples of its
preset learning rate and the run with the lowest final training loss is the one summarised.
`--damping-grid 1,10,100` does the same for each method's damping (`Method.damping_key`:
`damping` of the second-order methods, Adam's `eps`; SGD has none and runs once per learning
rate); with both grids every (learning rate, damping) pair is run. This is how the presets
were chosen (`experiments/methods.py`). `--lrs` and `--dampings` give absolute values
instead of multiples (the same values for every method). `--set kl_clip=0.01` (repeatable)
sets a hyperparameter on every method that takes it and leaves the others as they are.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence

from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import training

DEFAULT_EPOCHS = {"digits": 20}
DEFAULT_BATCH = {"digits": 100}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.compare",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--task", default="autoencoder", choices=training.TASK_NAMES)
  p.add_argument("--dataset", default="digits", choices=data_lib.DATASET_NAMES)
  p.add_argument("--data-dir", default=None,
                 help=f"folder with mnist.npz / fashion_mnist.npz (default ${data_lib.DATA_DIR_ENV})")
  p.add_argument("--download", action="store_true",
                 help="download the dataset (checksum verified, cached) if not found locally")
  p.add_argument("--epochs", type=int, default=None, help="default: 20 on digits, else 10")
  p.add_argument("--batch-size", type=int, default=None,
                 help="default: 100 on digits, else 1000")
  p.add_argument("--presets", action="store_true",
                 help="second-order methods at the presets of experiments/methods.py, tuned "
                      "for 0.2's absolute damping (default: the library's defaults)")
  p.add_argument("--methods", default=None,
                 help="comma-separated names (default: every available one): "
                      + ",".join(methods_lib.ALL_NAMES))
  p.add_argument("--lr-grid", default="1",
                 help="comma-separated multipliers of each preset learning rate, e.g. 0.3,1,3")
  p.add_argument("--damping-grid", default="1",
                 help="comma-separated multipliers of each preset damping (Adam: eps; "
                      "SGD: none), e.g. 1,10,100")
  p.add_argument("--lrs", default=None,
                 help="comma-separated absolute learning rates, the same for every method "
                      "(instead of --lr-grid)")
  p.add_argument("--dampings", default=None,
                 help="comma-separated absolute dampings for every method that has one "
                      "(instead of --damping-grid)")
  p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                 help="hyperparameter for every method that accepts it, e.g. kl_clip=0.01 "
                      "(repeatable; numbers, true/false or none)")
  p.add_argument("--hidden", default=None,
                 help="autoencoder encoder sizes, e.g. 256,128,64,16")
  p.add_argument("--train-subset", type=int, default=None,
                 help="use only the first N training examples (quick checks)")
  p.add_argument("--evals-per-epoch", type=int, default=1,
                 help="measure the losses this many times per epoch (finer time to target)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output-dir", default=None,
                 help="default: results/compare_<task>_<dataset>")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS",
                 help="instead of training: merge these results.json files (or folders) "
                      "of separate runs into --output-dir")
  return p.parse_args(argv)


def _csv_numbers(text: Optional[str], kind=float) -> Optional[List]:
  if text is None:
    return None
  return [kind(v) for v in text.split(",") if v.strip()]


# Settings the learning-rate and damping grids own (Adam's damping is its eps).
_GRID_KEYS = {"learning_rate": "--lrs", "damping": "--dampings", "eps": "--dampings"}


def parse_settings(items: Sequence[str]) -> Dict[str, Any]:
  """`["kl_clip=0.01", "momentum=0.5"]` -> `{"kl_clip": 0.01, "momentum": 0.5}`."""
  settings = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    key = key.strip()
    if key in _GRID_KEYS:
      raise ValueError(f"--set {key}=... would be overridden by the grid: pass "
                       f"{_GRID_KEYS[key]} {text} instead")
    settings[key] = methods_lib.parse_value(text)
  return settings


def method_grid(method: methods_lib.Method, args: argparse.Namespace):
  """`(learning rates, dampings)` this method runs at (`[None]`: it has no damping)."""
  if args.lrs:
    lrs = _csv_numbers(args.lrs)
  else:
    lrs = [method.learning_rate * m for m in (_csv_numbers(args.lr_grid) or [1.0])]
  if method.damping_key is None:
    return lrs, [None]
  if args.dampings:
    return lrs, _csv_numbers(args.dampings)
  return lrs, [method.damping * m for m in (_csv_numbers(args.damping_grid) or [1.0])]


def select_methods(names: Optional[str], presets: bool = False) -> List[methods_lib.Method]:
  """The named methods (default: every available one), at the library's defaults or, with
  `presets`, at the tuned presets."""
  if names is None:
    names = ",".join(methods_lib.available_names())
  pick = methods_lib.get_method if presets else methods_lib.library_defaults
  return [pick(n.strip()) for n in names.split(",") if n.strip()]


def best_run(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The run with the lowest final training loss (diverged runs last)."""
  def key(run):
    final = run["train_loss"][-1]
    return (run["diverged"] or not math.isfinite(final), final if math.isfinite(final) else 0)
  return min(runs, key=key)


def summarize(best: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One row per method: final/best loss, s/step vs Adam, epochs/seconds to Adam's final."""
  adam = best.get("adam")
  target = adam["train_loss"][-1] if adam else None
  rows = []
  for name, run in best.items():
    finite = [l for l in run["train_loss"] if math.isfinite(l)]
    epochs_to, seconds_to = (training.reach_target(run, target) if target is not None
                             else (None, None))
    rows.append({
        "method": name,
        "learning_rate": run["learning_rate"],
        "damping": run.get("damping"),
        "final_train_loss": run["train_loss"][-1],
        "best_train_loss": min(finite) if finite else math.nan,
        "final_test_loss": run["test_loss"][-1],
        "final_test_accuracy": run["test_accuracy"][-1],
        "seconds_per_step": run["seconds_per_step"],
        "step_time_vs_adam": (run["seconds_per_step"] / adam["seconds_per_step"]
                              if adam else math.nan),
        "compile_seconds": run["compile_seconds"],
        "epochs_to_adam_final": epochs_to,
        "seconds_to_adam_final": seconds_to,
        "diverged": run["diverged"],
    })
  return rows


def format_table(rows: List[Dict[str, Any]], classifier: bool) -> str:
  """A Markdown table of the summary rows."""
  head = ["method", "lr", "damping", "final loss", "best loss", "s/step", "x Adam",
          "epochs to Adam final", "s to Adam final"]
  if classifier:
    head.insert(5, "test acc")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda v, f: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f % v
  for r in rows:
    cells = [r["method"] + (" (diverged)" if r["diverged"] else ""),
             fmt(r["learning_rate"], "%g"), fmt(r.get("damping"), "%g"),
             fmt(r["final_train_loss"], "%.4f"),
             fmt(r["best_train_loss"], "%.4f"), fmt(r["seconds_per_step"], "%.4f"),
             fmt(r["step_time_vs_adam"], "%.2f"), fmt(r["epochs_to_adam_final"], "%.3g"),
             fmt(r["seconds_to_adam_final"], "%.2f")]
    if classifier:
      cells.insert(5, fmt(r["final_test_accuracy"], "%.3f"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_csv(path: str, runs: List[Dict[str, Any]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "learning_rate", "damping", "epoch", "seconds", "train_loss",
                     "test_loss", "test_accuracy"])
    for run in runs:
      for i, epoch in enumerate(run["epoch"]):
        writer.writerow([run["method"], run["learning_rate"], run.get("damping"), epoch,
                         run["seconds"][i], run["train_loss"][i], run["test_loss"][i],
                         run["test_accuracy"][i]])


def plot(output_dir: str, best: Dict[str, Dict[str, Any]], title: str,
         classifier: bool) -> List[str]:
  """Training loss vs epoch and vs seconds (and test accuracy); returns the PNG paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figures = [("loss_vs_epoch.png", "epoch", "train_loss", "epoch", "training loss"),
             ("loss_vs_seconds.png", "seconds", "train_loss", "training seconds",
              "training loss")]
  if classifier:
    figures.append(("accuracy_vs_epoch.png", "epoch", "test_accuracy", "epoch",
                    "test accuracy"))
  paths = []
  for filename, x_key, y_key, x_label, y_label in figures:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, run in best.items():
      ax.plot(run[x_key], run[y_key], label=f"{name} (lr {run['learning_rate']:g})",
              marker="." if len(run[x_key]) < 30 else None)
    if y_key == "train_loss":
      ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(output_dir, filename)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def run_comparison(args: argparse.Namespace) -> Dict[str, Any]:
  """Runs every method (and learning-rate multiple) and writes all outputs."""
  dataset = data_lib.load_dataset(args.dataset, data_dir=args.data_dir,
                                  allow_download=args.download)
  if args.train_subset:
    dataset = dataset._replace(x_train=dataset.x_train[:args.train_subset],
                               y_train=dataset.y_train[:args.train_subset])
  epochs = args.epochs or DEFAULT_EPOCHS.get(args.dataset, 10)
  batch_size = args.batch_size or DEFAULT_BATCH.get(args.dataset, 1000)
  task = training.make_task(args.task, dataset, hidden=_csv_numbers(args.hidden, int))
  grid = _csv_numbers(args.lr_grid) or [1.0]
  damping_grid = _csv_numbers(args.damping_grid) or [1.0]
  selected = select_methods(args.methods, presets=args.presets)
  output_dir = args.output_dir or os.path.join("results", f"compare_{args.task}_{args.dataset}")
  os.makedirs(output_dir, exist_ok=True)

  settings = parse_settings(args.settings)
  runs, best = [], {}
  for method in selected:
    method_runs = []
    taken = {k: v for k, v in settings.items() if methods_lib.accepts(method.factory, k)}
    lrs, dampings = method_grid(method, args)
    for lr in lrs:
      for damping in dampings:
        overrides = dict(taken)
        if damping is not None:
          overrides[method.damping_key] = damping
        run = training.train(task, dataset, method, epochs=epochs, batch_size=batch_size,
                             learning_rate=lr, seed=args.seed,
                             progress=not args.no_progress, overrides=overrides,
                             evals_per_epoch=args.evals_per_epoch)
        run["lr_multiplier"] = lr / method.learning_rate
        run["damping_multiplier"] = None if damping is None else damping / method.damping
        run["damping"] = damping
        run["settings"] = taken
        method_runs.append(run)
    runs.extend(method_runs)
    best[method.name] = best_run(method_runs)

  config = {"task": args.task, "dataset": dataset.name, "epochs": epochs,
            "batch_size": batch_size, "train_examples": int(len(dataset.x_train)),
            "lr_grid": grid, "damping_grid": damping_grid,
            "lrs": _csv_numbers(args.lrs), "dampings": _csv_numbers(args.dampings),
            "settings": settings, "seed": args.seed, "presets": args.presets,
            "evals_per_epoch": args.evals_per_epoch,
            "methods": [m.name for m in selected],
            "machine": _machine()}
  return write_outputs(output_dir, config, runs, best, classifier=task.is_classifier,
                       plots=not args.no_plots)


def write_outputs(output_dir: str, config: Dict[str, Any], runs: List[Dict[str, Any]],
                  best: Dict[str, Dict[str, Any]], *, classifier: bool,
                  plots: bool = True) -> Dict[str, Any]:
  """Writes results.json, curves.csv, summary.md (and plots); prints the summary table."""
  rows = summarize(best)
  table = format_table(rows, classifier)
  results = {"config": config, "summary": rows, "runs": runs}
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=_json_default)
  write_csv(os.path.join(output_dir, "curves.csv"), runs)
  with open(os.path.join(output_dir, "summary.md"), "w") as f:
    f.write(_heading(config) + "\n\n" + table + "\n")
  if plots:
    plot(output_dir, best, f"{config['task']} on {config['dataset']}, batch "
         f"{config['batch_size']}", classifier)
  print(_heading(config))
  print(table)
  print(f"outputs in {output_dir}")
  return results


def merge_results(paths: Sequence[str], output_dir: str, *,
                  plots: bool = True) -> Dict[str, Any]:
  """Merges `results.json` files of separate runs (e.g. one process per method).

  Every file must come from the same task, dataset, batch size, training-set size and
  seed; the numbers of epochs may differ (a short run of a fast method next to Adam's full
  run still answers "how long to Adam's final loss"). The runs are concatenated in the
  order given (a method that appears in several files keeps the runs of the last one) and
  each method's best run is summarised as in a single comparison.
  """
  loaded = [json.load(open(p if p.endswith(".json") else os.path.join(p, "results.json")))
            for p in paths]
  if not loaded:
    raise ValueError("merge_results: no results given")
  keys = ("task", "dataset", "batch_size", "train_examples", "seed")
  first = loaded[0]["config"]
  for path, results in zip(paths, loaded):
    differing = [k for k in keys if results["config"].get(k) != first.get(k)]
    if differing:
      raise ValueError(f"merge_results: {path} differs from {paths[0]} in "
                       f"{', '.join(differing)}")
  by_method: Dict[str, List[Dict[str, Any]]] = {}
  for results in loaded:
    fresh: Dict[str, List[Dict[str, Any]]] = {}
    for run in results["runs"]:
      fresh.setdefault(run["method"], []).append(run)
    by_method.update(fresh)
  runs = [run for method_runs in by_method.values() for run in method_runs]
  best = {name: best_run(method_runs) for name, method_runs in by_method.items()}
  config = dict(first, methods=list(by_method),
                epochs=max(r["config"]["epochs"] for r in loaded),
                merged_from=[r["config"] for r in loaded])
  classifier = any(math.isfinite(a) for run in runs for a in run["test_accuracy"]
                   if isinstance(a, (int, float)))
  os.makedirs(output_dir, exist_ok=True)
  return write_outputs(output_dir, config, runs, best, classifier=classifier, plots=plots)


def _heading(config: Dict[str, Any]) -> str:
  lrs = (f"lrs {config['lrs']}" if config.get("lrs")
         else f"lr grid {config['lr_grid']}")
  dampings = (f"dampings {config['dampings']}" if config.get("dampings")
              else f"damping grid {config.get('damping_grid', [1.0])}")
  settings = "".join(f", {k}={v}" for k, v in config.get("settings", {}).items())
  return (f"{config['task']} on {config['dataset']} ({config['train_examples']} examples), "
          f"{config['epochs']} epochs, batch {config['batch_size']}, {lrs}, {dampings}"
          f"{settings}, seed {config['seed']}; {config['machine']['summary']}")


def _machine() -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  summary = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"jax {jax.__version__} on {device.platform}")
  return {"summary": summary, "python": sys.version.split()[0], "jax": jax.__version__,
          "device": str(device), "cpu_count": os.cpu_count()}


def _json_default(value):
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  if args.merge:
    if not args.output_dir:
      raise SystemExit("--merge needs --output-dir")
    return merge_results(args.merge, args.output_dir, plots=not args.no_plots)
  return run_comparison(args)


if __name__ == "__main__":
  main()
