"""Test-session settings.

The suite's cost is compiling many small jitted programs, so XLA's backend optimisations
are turned down (`--xla_backend_optimization_level=0`, no expensive LLVM passes; about 20%
less compile time, same results to float tolerance), and the concurrency-optimized CPU
scheduler is off as in `experiments/__init__.py` (a jaxlib 0.10.2 deadlock on 2 cores). A
user's own `XLA_FLAGS` win: nothing is added when they already set these flags.
"""

import os

_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
          "--xla_cpu_enable_concurrency_optimized_scheduler=false")
_current = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_current] + [f for f in _FLAGS if f.split("=")[0] not in _current]).strip()
