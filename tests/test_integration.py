"""Cross-method integration: checkpoint round trip and data-parallel training on 8 devices."""

import os
import subprocess
import sys
import textwrap

import flax.serialization
import jax
import numpy as np
import pytest

import secondorder_optax as soo
from tests import models

METHODS = {
    "kfac": dict(learning_rate=0.1, damping=1e-2),
    "ekfac": dict(learning_rate=0.1, damping=1e-2),
    "tkfac": dict(learning_rate=0.1, damping=1e-2),
    "tekfac": dict(learning_rate=0.1, damping=1e-2),
    "tnt": dict(learning_rate=0.01, damping=0.1),
    "shampoo": dict(learning_rate=0.05, damping=1e-4),
    "mbf": dict(learning_rate=0.1, damping=1e-2),
    "seng": dict(learning_rate=0.1, damping=1e-1, batch_size=8),
}
AVAILABLE = [m for m in METHODS if hasattr(soo, m)]


@pytest.mark.parametrize("method", AVAILABLE)
def test_state_checkpoint_round_trip(method):
  model, params, x, y, family = models.mlp_problem(batch=8)
  fisher = "empirical" if method in ("mbf", "seng") else "sampled"
  curv_fn = soo.linen_curvature(model, family, fisher=fisher)
  tx = getattr(soo, method)(**METHODS[method])
  state = tx.init(params)
  _, grads, curvature = curv_fn(params, x, y, jax.random.key(0))
  _, state = tx.update(grads, state, params, curvature=curvature)
  blob = flax.serialization.to_bytes(state)
  restored = flax.serialization.from_bytes(tx.init(params), blob)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  u1, _ = tx.update(grads, state, params, curvature=curvature)
  u2, _ = tx.update(grads, restored, params, curvature=curvature)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_DATA_PARALLEL = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import secondorder_optax as soo
    from tests import models
    assert jax.device_count() == 8, jax.devices()
    model, params, x, y, family = models.mlp_problem(batch=16)
    curv_fn = soo.linen_curvature(model, family, fisher="empirical")
    results = {}
    for method, hp in METHODS.items():
      tx = getattr(soo, method)(**hp)
      def step(params, state, x, y):
        loss, grads, curvature = curv_fn(params, x, y, jax.random.key(0))
        updates, state = tx.update(grads, state, params, curvature=curvature)
        return optax.apply_updates(params, updates), state
      mesh = Mesh(np.array(jax.devices()), ("data",))
      shard = NamedSharding(mesh, P("data"))
      xs, ys = jax.device_put(x, shard), jax.device_put(y, shard)
      p1, s1 = jax.jit(step)(params, tx.init(params), xs, ys)
      p2, s2 = jax.jit(step)(params, tx.init(params), x, y)
      for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
    print("OK", sorted(METHODS))
""")


@pytest.mark.skipif(not AVAILABLE, reason="no method available")
def test_data_parallel_on_eight_simulated_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  code = f"METHODS = { {m: METHODS[m] for m in AVAILABLE[:3]}!r}\n" + _DATA_PARALLEL
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK" in out.stdout
