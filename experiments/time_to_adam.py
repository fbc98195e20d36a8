"""Wall-clock time to Adam's loss, one process per method: `python -m experiments.time_to_adam`.

Runs `python -m experiments.compare` once per method, each in a fresh Python process (no
method's compiled code, memory or thread pools slow another's steps), then merges the runs
into one summary in `--output-dir` (`summary.md`, `results.json`, `curves.csv`, plots): final
loss, seconds per step, and the epochs and seconds each method needs to reach Adam's final
training loss. Adam always runs first (it sets the target).

Its defaults are the accelerator check of issue 16: the papers' MNIST autoencoder (full
training set, batch 1000, 10 epochs, losses 4 times per epoch) for Adam, KFAC, TNT, TEKFAC,
MBF and SENG at the library's defaults, on whatever device JAX finds (a few minutes on one
GPU; about 40 minutes on 2 CPU cores):

    python -m experiments.time_to_adam --data-dir ../shared/data --output-dir results/gpu

Arguments it does not know are passed on to every `experiments.compare` run, e.g.
`--set kl_clip=0.01` or `--batch-size 500`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

from experiments import compare

DEFAULT_METHODS = "adam,kfac,tnt,tekfac,mbf,seng"


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
  p = argparse.ArgumentParser(prog="python -m experiments.time_to_adam",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default=DEFAULT_METHODS,
                 help=f"comma-separated names (default {DEFAULT_METHODS}); adam is added "
                      "first if missing")
  p.add_argument("--dataset", default="mnist")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--evals-per-epoch", type=int, default=4)
  p.add_argument("--output-dir", required=True)
  p.add_argument("--timeout", type=float, default=3600.0,
                 help="seconds allowed to each method's process")
  return p.parse_known_args(argv)


def method_names(text: str) -> List[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  return ["adam"] + [n for n in names if n != "adam"]


def run_one(name: str, args: argparse.Namespace, passed_on: Sequence[str]) -> str:
  """Runs `experiments.compare` for `name` in its own process; returns its results.json."""
  out = os.path.join(args.output_dir, name)
  command = [sys.executable, "-m", "experiments.compare", "--task", "autoencoder",
             "--dataset", args.dataset, "--epochs", str(args.epochs), "--methods", name,
             "--evals-per-epoch", str(args.evals_per_epoch), "--no-progress", "--no-plots",
             "--output-dir", out, *passed_on]
  if args.data_dir:
    command += ["--data-dir", args.data_dir]
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                        check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{name}: experiments.compare failed (exit {done.returncode}):\n"
                       f"{done.stderr[-2000:]}")
  print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
  return os.path.join(out, "results.json")


def main(argv: Optional[Sequence[str]] = None):
  args, passed_on = parse_args(argv)
  os.makedirs(args.output_dir, exist_ok=True)
  results = [run_one(name, args, passed_on) for name in method_names(args.methods)]
  return compare.merge_results(results, args.output_dir, plots="--no-plots" not in passed_on)


if __name__ == "__main__":
  main()
