"""The `>>>` examples in the public docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "secondorder_optax.losses",
    "secondorder_optax._src.base",
    "secondorder_optax._src.alias",
    "secondorder_optax._src.describe",
    "secondorder_optax._src.kl_clip",
    "secondorder_optax._src.capture.linen",
    "secondorder_optax._src.capture.nnx",
    "secondorder_optax._src.kfac",
    "secondorder_optax._src.kbfgs",
    "secondorder_optax._src.quasi_newton",
    "secondorder_optax._src.tnt",
    "secondorder_optax._src.shampoo",
    "secondorder_optax._src.soap",
    "secondorder_optax._src.mbf",
    "secondorder_optax._src.seng",
    "secondorder_optax._src.engine",
    "secondorder_optax._src.kronecker",
    "secondorder_optax._src.mini_blocks",
    "secondorder_optax._src.momentum",
    "secondorder_optax._src.periods",
    "secondorder_optax._src.seng_factors",
    "secondorder_optax._src.spread",
    "secondorder_optax._src.state_sharding",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
