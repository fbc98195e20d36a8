"""Paper-style benchmarks for secondorder_optax: data, models, method presets and CLIs.

Run `python -m experiments.compare` (optimizer comparison with plots) or
`python -m experiments.step_time` (per-step cost relative to Adam). See
`experiments/README.md`.

Importing this package (before JAX starts its CPU backend) turns off XLA:CPU's
concurrency-optimized thunk scheduler: with jaxlib 0.10.2 a jitted training step that runs
batched Cholesky solves (`cho_solve` -> LAPACK trsm on XLA's intra-op pool) next to other
work can deadlock (all threads idle, reproducible with TNT on the digits autoencoder at the
second inverse refresh). Set `XLA_FLAGS` yourself to override.
"""

import os as _os

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " " + _SCHEDULER_FLAG).strip()
