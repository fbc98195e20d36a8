"""Scale-out (DESIGN §8): data parallel on 8 simulated devices, refreshes spread over the
mesh, sharded optimizer state, orbax checkpoints restored onto another mesh, two processes.

The multi-device checks run in subprocesses (the device count is fixed when jax starts):
one worker on 8 simulated CPU devices for every single-process section
(`tests/scale_out_worker.py`), and, at the same time, two `jax.distributed` processes over
gloo. They are started once for the module and their results read by the tests below.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import secondorder_optax as soo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "scale_out_worker.py")
# Optimisation level 0: these programs are tiny, their compile time is the test's cost. The
# scheduler flag as in experiments/__init__.py (a jaxlib 0.10.2 CPU deadlock).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_enable_concurrency_optimized_scheduler=false")
TIMEOUT = 900

# Largest relative parameter difference, 8 devices vs 1, after 10 steps (float32). In
# float64 KFAC and TNT agree to 1e-13: the float32 differences are reduction order amplified
# by the damped inverses. SOAP's Adam in an eigenbasis that is arbitrary inside the
# degenerate eigenspaces of its rank-deficient first factors differs even in float64
# (1e-3), and more in float32 (docs/scale_out.md).
# TNT: 1.1e-3 and 3.7e-3 (two runs) between two gloo processes and one device once its
# momentum restarts at every refresh (the step after a refresh is the fresh direction, not
# an average, so reduction-order noise is damped less).
TOLERANCE = {"kfac": 1e-3, "ekfac": 1e-3, "tkfac": 1e-3, "tekfac": 3e-3, "tnt": 1e-2,
             "shampoo": 3e-3, "mbf": 1e-3, "seng": 1e-3, "soap": 3e-2}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("scale_out")
  base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  eight = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  single = dict(base, XLA_FLAGS=FAST_COMPILE)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, WORKER, str(out / "worker.json")], env=eight,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)]
  procs += [subprocess.Popen([sys.executable, WORKER, str(out / f"gloo_{i}.json"), "gloo",
                              str(i), port], env=single, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
  logs = []
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      proc.kill()
      _, err = proc.communicate()
    logs.append((proc.returncode, err[-3000:]))
  if not (out / "worker.json").exists():
    raise AssertionError(f"the 8-device worker failed:\n{logs[0][1]}")
  with open(out / "worker.json") as f:
    results = json.load(f)
  results["gloo_logs"] = logs[1:]
  results["dir"] = out
  return results


def test_every_method_on_eight_devices_matches_one(runs):
  rel = runs["methods"]["max_rel_diff"]
  assert set(rel) == set(TOLERANCE)
  for method, diff in rel.items():
    assert diff < TOLERANCE[method], (method, diff)


def test_refresh_spread_divides_factorizations_per_device(runs):
  counts = runs["spread"]["factorizations_per_device_1_vs_8"]
  assert counts == {"16x16": [32, 4], "32x32": [32, 4], "8x8": [5, 1]}
  # In the optimizers' steps: the methods with buckets of several blocks spread them.
  per_method = runs["methods"]["factorizations_per_device_1_vs_8"]
  for method in ("tnt", "shampoo", "mbf", "seng", "soap"):
    one, eight = per_method[method]
    assert eight < one, (method, one, eight)
  for method, (one, eight) in per_method.items():
    assert eight <= one, (method, one, eight)


def test_sharded_state_matches_replicated(runs):
  state = runs["state"]
  assert any("preconditioner/Dense_0/output_inverse" in p for p in state["sharded_leaves"])
  assert state["max_rel_diff_vs_replicated"] < 1e-4  # reduction order only


def test_orbax_checkpoint_restores_onto_another_mesh(runs):
  diffs = runs["orbax"]["resume_max_rel_diff_by_devices"]
  assert diffs["8"] == 0.0  # the same mesh: bit-identical resume
  assert diffs["4"] < 1e-4  # 8 -> 4 devices: reduction order only


def test_two_processes_match_one(runs):
  for i, (code, err) in enumerate(runs["gloo_logs"]):
    assert code == 0, f"process {i} failed:\n{err}"
  out = runs["dir"]
  for method in ("kfac", "tnt"):
    want = np.load(out / f"{method}_one_device.npz")
    for i in range(2):
      got = np.load(out / f"{method}_process_{i}.npz")
      for name in want.files:
        scale = np.max(np.abs(want[name]))
        rel = np.max(np.abs(got[name] - want[name])) / scale
        assert rel < TOLERANCE[method], (method, i, name, rel)


# In-process checks of soo.state_shardings' errors (one device).


def _state():
  tx = soo.kfac(learning_rate=0.1)
  return tx.init({"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}})


def test_state_shardings_errors_name_what_is_wrong():
  mesh = jax.make_mesh((1,), ("data",))
  state = _state()
  with pytest.raises(ValueError, match=r"rules\[0\] has an invalid regex"):
    soo.state_shardings(state, mesh, [("(", P("data"))])
  with pytest.raises(ValueError, match=r"rules\[0\] has 'data' where a PartitionSpec"):
    soo.state_shardings(state, mesh, [("x", "data")])
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    soo.state_shardings(state, mesh, [("preconditioner", P("model"))])
  with pytest.raises(ValueError, match=r"Dense_0/input_inverse has shape \(5, 5\) but its "):
    soo.state_shardings(state, mesh, [("preconditioner", P(None, None, "data"))])
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
    soo.state_shardings(state, "data", [])
  shardings = soo.state_shardings(state, mesh, [("preconditioner", P(None, None, "data"))],
                                  replicate_unfit=True)
  assert all(s.spec == P() for s in jax.tree.leaves(shardings))


def test_state_shardings_first_matching_rule_wins():
  mesh = jax.make_mesh((1,), ("data",))
  shardings = soo.state_shardings(
      _state(), mesh, {"output_inverse": P(None, "data"), "preconditioner": P("data")})
  paths = {soo.state_sharding_path(p): s.spec
           for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  assert paths[next(k for k in paths if k.endswith("output_inverse"))] == P(None, "data")
  assert paths[next(k for k in paths if k.endswith("input_inverse"))] == P("data")
  assert paths[next(k for k in paths if k.endswith("input_factor"))] == P()
