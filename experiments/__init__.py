"""Paper-style benchmarks for secondorder_optax: data, models, method presets and CLIs.

Run `python -m experiments.compare` (optimizer comparison with plots) or
`python -m experiments.step_time` (per-step cost relative to Adam). See
`experiments/README.md`.
"""
