"""Per-step cost of every method relative to Adam: `python -m experiments.step_time`.

The benchmark of the method issues: the papers' MNIST autoencoder
(784-1000-500-250-30-250-500-1000-784, sigmoid cross-entropy) at batch 1000 on random
images (timing only). Each method x refresh setting runs in its own subprocess, which also
times Adam, so that every ratio compares two measurements taken in the same process (Adam
measured about a third slower when interleaved with factor-heavy configurations). A
measurement is: compile (timed separately, ahead of time), a few warm-up steps, then
`--steps` steps each waited for; the report gives the median step (a typical step without
refresh) and the mean step (amortized: with `--steps` a multiple of `inverse_every`, it
holds exactly the share of refreshes of a long run). The whole step is timed: curvature
capture (the extra backward pass for sampled targets), the update and `apply_updates`.

Refresh settings: `stats_every=10, inverse_every=100` and `stats_every=1, inverse_every=20`
(KFAC family, TNT, Shampoo, MBF); SENG: `inverse_every=100` on the full batch and with
`subsample=256`.

`--preconditioner-dtype bfloat16` adds a row for every method x setting whose optimizer has
`preconditioner_dtype`: the refreshed preconditioner (inverses, eigenbases, roots) stored
and applied in bfloat16, with float32 sums.

`--kfac-jax-python PATH` also runs `experiments/kfac_jax_step_time.py` with another Python
that has kfac-jax (0.0.8 needs jax 0.9.1 and flax 0.12.6, so keep it in its own virtual
environment); that script times kfac-jax's KFAC against its own Adam in the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from experiments import methods as methods_lib
from experiments import models
from experiments import training

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT_PREFIX = "STEP_TIME_RESULT "


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.step_time",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default=None,
                 help="comma-separated second-order methods (default: all available)")
  p.add_argument("--settings", default=None,
                 help="comma-separated refresh settings (default: each method's own), e.g. "
                      + ",".join(methods_lib.KRONECKER_REFRESH))
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--steps", type=int, default=100,
                 help="timed steps per measurement (>= 20; a multiple of inverse_every)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--hidden", default=None,
                 help="autoencoder encoder sizes (default the paper's 1000,500,250,30)")
  p.add_argument("--input-dim", type=int, default=784)
  p.add_argument("--output", default=os.path.join("results", "step_time.json"))
  p.add_argument("--kfac-jax-blocks", default="kfac",
                 help="comma-separated kfac-jax dense blocks to time: kfac (its "
                      "Kronecker-factored default) and/or tnt (its DenseTNT)")
  p.add_argument("--preconditioner-dtype", default=None, choices=("float32", "bfloat16"),
                 help="also time each method that has `preconditioner_dtype` with its "
                      "refreshed preconditioner in this dtype (an extra row per setting)")
  p.add_argument("--kfac-jax-python", default=None,
                 help="python of an environment with kfac-jax, to time its KFAC too")
  p.add_argument("--repeats", type=int, default=1,
                 help="measure every row this many times (each its own process) and keep "
                      "the run with the median amortized ratio (timing noise)")
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--method", default=None, help=argparse.SUPPRESS)
  p.add_argument("--setting", default=None, help=argparse.SUPPRESS)
  return p


def _task(args) -> training.Task:
  sizes = (tuple(int(v) for v in args.hidden.split(",")) if args.hidden
           else (1000, 500, 250, 30))
  model = models.Autoencoder(encoder_sizes=sizes, output_dim=args.input_dim)
  import secondorder_optax as soo  # pylint: disable=g-import-not-at-top
  return training.Task("autoencoder", model, soo.losses.sigmoid_binary_cross_entropy,
                       is_classifier=False)


def _tree_bytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def measure(task: training.Task, method: methods_lib.Method, overrides: Dict[str, Any], *,
            batch_size: int, steps: int, warmup: int, seed: int = 0) -> Dict[str, Any]:
  """Times `steps` training steps of `method` (each waited for) after compile and warm-up."""
  rng = np.random.default_rng(seed)
  x = rng.random((batch_size, task.model.output_dim), dtype=np.float32)
  inputs = jax.numpy.asarray(x)
  tx = method.build(batch_size=batch_size, **overrides)
  params, model_state = training.init_model(task, x[:1], seed)
  opt_state = tx.init(params)
  step = jax.jit(training.train_step_fn(task, tx, method.capture_fisher(overrides),
                                        method.second_pass))
  idx = np.arange(batch_size, dtype=np.int32)
  key = jax.random.key(seed)
  start = time.perf_counter()
  compiled = step.lower(params, model_state, opt_state, inputs, inputs, idx, key).compile()
  compile_seconds = time.perf_counter() - start
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    params, model_state, opt_state, loss = compiled(
        params, model_state, opt_state, inputs, inputs, idx, jax.random.fold_in(key, i))
    jax.block_until_ready((params, opt_state, loss))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return {"method": method.name, "overrides": overrides, "compile_seconds": compile_seconds,
          "median_step_seconds": statistics.median(times),
          "mean_step_seconds": float(np.mean(times)), "steps": steps,
          "final_loss": float(loss), "state_bytes": _tree_bytes(opt_state),
          "param_bytes": _tree_bytes(params)}


def worker(args) -> Dict[str, Any]:
  """One subprocess: Adam and one method x setting, measured in the same process."""
  task = _task(args)
  method = methods_lib.get_method(args.method)
  overrides = dict(method.refresh_settings.get(args.setting, {}))
  if args.setting and args.setting not in method.refresh_settings:
    raise ValueError(f"{args.method} has no refresh setting {args.setting!r}; it has "
                     f"{sorted(method.refresh_settings)}")
  setting = args.setting
  if args.preconditioner_dtype:
    overrides["preconditioner_dtype"] = args.preconditioner_dtype
    setting = f"{setting}, {args.preconditioner_dtype} preconditioner"
  kw = dict(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
  adam = measure(task, methods_lib.get_method("adam"), {}, **kw)
  result = measure(task, method, overrides, **kw)
  result.update(setting=setting, adam=adam,
                ratio_median=result["median_step_seconds"] / adam["median_step_seconds"],
                ratio_amortized=result["mean_step_seconds"] / adam["mean_step_seconds"])
  return result


def _run_subprocess(cmd: List[str], timeout: float) -> Dict[str, Any]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f"measurement {' '.join(cmd)} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-3000:]}")


def _repeated(cmd: List[str], args) -> Dict[str, Any]:
  """`--repeats` runs of one measurement; the one with the median amortized ratio, with
  every run's ratio under `ratio_amortized_runs`."""
  runs = [_run_subprocess(cmd, args.timeout) for _ in range(max(1, args.repeats))]
  runs.sort(key=lambda r: r["ratio_amortized"])
  result = dict(runs[(len(runs) - 1) // 2])
  result["ratio_amortized_runs"] = [r["ratio_amortized"] for r in runs]
  return result


def _worker_cmd(args, method: str, setting: str) -> List[str]:
  cmd = [sys.executable, "-m", "experiments.step_time", "--worker", "--method", method,
         "--setting", setting, "--batch-size", str(args.batch_size), "--steps",
         str(args.steps), "--warmup", str(args.warmup), "--input-dim", str(args.input_dim)]
  if args.hidden:
    cmd += ["--hidden", args.hidden]
  return cmd


def kfac_jax_cmd(args, python: str, setting: Dict[str, int], block: str = "kfac") -> List[str]:
  cmd = [python, os.path.join(HERE, "kfac_jax_step_time.py"), "--block", block, "--batch-size",
         str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--input-dim", str(args.input_dim), "--stats-every", str(setting["stats_every"]),
         "--inverse-every", str(setting["inverse_every"])]
  if args.hidden:
    cmd += ["--hidden", args.hidden]
  return cmd


def format_table(results: List[Dict[str, Any]]) -> str:
  head = ["method", "setting", "Adam ms", "median ms", "amortized ms", "x Adam (median)",
          "x Adam (amortized)", "compile s", "state/params"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    lines.append("| " + " | ".join([
        r["method"], r["setting"] or "-", f"{1e3 * r['adam']['median_step_seconds']:.1f}",
        f"{1e3 * r['median_step_seconds']:.1f}", f"{1e3 * r['mean_step_seconds']:.1f}",
        f"{r['ratio_median']:.2f}", f"{r['ratio_amortized']:.2f}",
        f"{r['compile_seconds']:.1f}",
        f"{r['state_bytes'] / max(r['param_bytes'], 1):.2f}"]) + " |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = _parser().parse_args(argv)
  if args.worker:
    print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
    return []
  if args.steps < 20:
    raise ValueError(f"--steps must be at least 20 for a stable median, got {args.steps}")
  names = ([n.strip() for n in args.methods.split(",") if n.strip()] if args.methods
           else [n for n in methods_lib.available_names() if n not in methods_lib.BASELINES])
  wanted = args.settings.split(",") if args.settings else None
  results = []
  for name in names:
    method = methods_lib.get_method(name)
    for setting in method.refresh_settings:
      if wanted and setting not in wanted:
        continue
      print(f"timing {name} {setting} ...", flush=True)
      results.append(_repeated(_worker_cmd(args, name, setting), args))
      if args.preconditioner_dtype and methods_lib.accepts(method.factory,
                                                           "preconditioner_dtype"):
        print(f"timing {name} {setting}, {args.preconditioner_dtype} preconditioner ...",
              flush=True)
        cmd = _worker_cmd(args, name, setting)
        cmd += ["--preconditioner-dtype", args.preconditioner_dtype]
        results.append(_repeated(cmd, args))
  if args.kfac_jax_python:
    for setting_name, setting in methods_lib.KRONECKER_REFRESH.items():
      if wanted and setting_name not in wanted:
        continue
      for block in args.kfac_jax_blocks.split(","):
        print(f"timing kfac-jax {block} {setting_name} ...", flush=True)
        result = _repeated(kfac_jax_cmd(args, args.kfac_jax_python, setting, block), args)
        result["setting"] = setting_name
        results.append(result)
  table = format_table(results)
  print(f"MNIST autoencoder step time, batch {args.batch_size}, {args.steps} timed steps, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}")
  print(table)
  if args.output:
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
      json.dump({"batch_size": args.batch_size, "steps": args.steps,
                 "cpu_count": os.cpu_count(), "jax": jax.__version__, "results": results},
                f, indent=1)
    print(f"written {args.output}")
  return results


if __name__ == "__main__":
  main()
