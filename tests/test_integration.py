"""Cross-method integration: checkpoint round trip (data parallel, sharded state, orbax and
multi-process runs: tests/test_scale_out.py)."""


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
