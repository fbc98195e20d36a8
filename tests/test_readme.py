"""The README's quickstart runs as written (with fewer steps)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
  text = README.read_text()
  code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
  assert "range(100)" in code
  namespace = {}
  exec(compile(code.replace("range(100)", "range(3)"), "README-quickstart", "exec"), namespace)
  assert float(namespace["loss"]) > 0


def test_nnx_example_runs():
  text = README.read_text()
  code = re.search(r"optimizer.update`:\n\n```python\n(.*?)```", text, re.S).group(1)
  assert "range(100)" in code
  namespace = {}
  exec(compile(code.replace("range(100)", "range(3)"), "README-nnx", "exec"), namespace)
  assert float(namespace["loss"]) > 0
