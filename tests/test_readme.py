"""The README's quickstart runs as written (with fewer steps)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _run_block(pattern: str, name: str) -> dict:
  """Executes the README code block matched by `pattern` with 3 steps instead of 100."""
  code = re.search(pattern, README.read_text(), re.S).group(1)
  assert "range(100)" in code
  namespace = {}
  exec(compile(code.replace("range(100)", "range(3)"), name, "exec"), namespace)
  return namespace


def test_quickstart_runs():
  namespace = _run_block(r"## Quickstart\n\n```python\n(.*?)```", "README-quickstart")
  assert float(namespace["loss"]) > 0


def test_nnx_example_runs():
  namespace = _run_block(r"optimizer.update`:\n\n```python\n(.*?)```", "README-nnx")
  assert float(namespace["loss"]) > 0
