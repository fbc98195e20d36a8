"""Tests of `experiments/`: data loaders (checksums, download against a local server),
the method registry, and one tiny `compare` run with the files it writes."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import json
import os
import threading

import numpy as np
import pytest

from experiments import compare, data, methods, training


def _write_npz(path, n_train=6, n_test=3, seed=0):
  rng = np.random.default_rng(seed)
  np.savez(path, x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
           y_train=rng.integers(0, 10, n_train).astype(np.uint8),
           x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
           y_test=np.arange(n_test, dtype=np.uint8))
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_load_npz_checks_sha256_and_scales(tmp_path):
  path = str(tmp_path / "small.npz")
  sha = _write_npz(path)
  ds = data.load_npz(path, sha256=sha)
  assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_train.dtype == np.float32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  np.testing.assert_array_equal(ds.y_test, [0, 1, 2])
  with pytest.raises(data.ChecksumError, match="checksum mismatch.*small.npz"):
    data.load_npz(path, sha256="0" * 64)


def test_known_file_name_with_wrong_content_is_a_clear_error(tmp_path, monkeypatch):
  _write_npz(str(tmp_path / "mnist.npz"))  # Not the real MNIST: its checksum differs.
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(data.ChecksumError, match="mnist.npz.*expected 06af5dfe"):
    data.load_dataset("mnist")


def test_missing_dataset_and_unknown_names(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match="fashion_mnist.npz"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
    data.load_dataset("cifar")
  with pytest.raises(ValueError, match="no known checksum"):
    _write_npz(str(tmp_path / "other.npz"))
    data.load_npz(str(tmp_path / "other.npz"))


@pytest.fixture()
def local_server(tmp_path):
  served = tmp_path / "served"
  served.mkdir()
  handler = functools.partial(_QuietHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield served, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  requests = 0

  def do_GET(self):  # pylint: disable=invalid-name
    type(self).requests += 1
    super().do_GET()

  def log_message(self, *args):
    pass


def test_download_verifies_and_caches(local_server, tmp_path):
  served, url = local_server
  sha = _write_npz(str(served / "small.npz"))
  cache = str(tmp_path / "cache")
  before = _QuietHandler.requests
  path = data.download(f"{url}/small.npz", sha256=sha, cache_dir=cache)
  assert data.sha256_of(path) == sha and _QuietHandler.requests == before + 1
  again = data.download(f"{url}/small.npz", sha256=sha, cache_dir=cache)
  assert again == path and _QuietHandler.requests == before + 1  # Served from the cache.
  ds = data.load_npz(path, sha256=sha)
  assert ds.x_test.shape == (3, 28, 28, 1)
  # A wrong checksum fails clearly and leaves nothing behind in a fresh cache.
  bad_cache = str(tmp_path / "bad")
  with pytest.raises(data.ChecksumError, match="checksum mismatch"):
    data.download(f"{url}/small.npz", sha256="f" * 64, cache_dir=bad_cache)
  assert os.listdir(bad_cache) == []


def test_load_dataset_downloads_when_allowed(local_server, tmp_path, monkeypatch):
  served, url = local_server
  sha = _write_npz(str(served / "mnist.npz"), seed=1)
  monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  ds = data.load_dataset("mnist", allow_download=True, url=f"{url}/mnist.npz", sha256=sha)
  assert ds.name == "mnist" and ds.x_train.shape == (6, 28, 28, 1)


def test_embedded_digits():
  ds = data.load_digits()
  assert ds.x_train.shape == (1500, 8, 8, 1) and ds.x_test.shape == (297, 8, 8, 1)
  assert ds.x_train.max() == 1.0 and set(np.unique(ds.y_train)) == set(range(10))


def test_registry_lists_baselines_and_available_methods():
  names = methods.available_names()
  assert names[:4] == methods.BASELINES == ("adam", "adamw", "muon", "sgd")
  for name in methods.ALL_NAMES[4:]:
    assert (name in names) == hasattr(methods.soo, name)
  for method in methods.available_methods():
    assert method.reference and method.learning_rate > 0
  # At the library's defaults: the factory's own learning rate and nothing set.
  kfac = methods.library_defaults("kfac")
  assert kfac.hparams == {} and kfac.learning_rate == 0.1 and kfac.damping == 0.3
  assert methods.library_defaults("adam") == methods.get_method("adam")
  # Training and step timing both capture what a `fisher=` override names.
  mbf = methods.get_method("mbf")
  assert mbf.capture_fisher({"fisher": "sampled"}) == "sampled" != mbf.capture_fisher({})
  with pytest.raises(ValueError, match="unknown method 'lbfgs'"):
    methods.get_method("lbfgs")
  with pytest.raises(TypeError, match=r"\['not_a_knob'\].*not accepted"):
    methods.get_method("adam").build(not_a_knob=1)


def test_same_batches_for_every_method():
  a = training.epoch_batches(50, 8, seed=3, epoch=2)
  b = training.epoch_batches(50, 8, seed=3, epoch=2)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (6, 8) and len(np.unique(a)) == 48
  assert not np.array_equal(a, training.epoch_batches(50, 8, seed=3, epoch=3))


def test_reach_target():
  run = {"epoch": [0, 1, 2, 3], "train_loss": [5.0, 3.0, 2.0, 1.0],
         "seconds": [0.0, 1.0, 2.0, 3.0]}
  assert training.reach_target(run, 2.5) == (2, 2.0)
  assert training.reach_target(run, 0.5) == (None, None)


def test_second_pass_method_trains():
  """K-BFGS's training step passes `curvature_fn=` (its second pass) and the loss falls."""
  if not methods.is_available("kbfgs"):
    pytest.skip("no soo.kbfgs")
  method = methods.get_method("kbfgs")
  assert method.second_pass and not methods.get_method("kfac").second_pass
  ds = data.load_digits()
  task = training.make_task("autoencoder", ds, hidden=(16, 4))
  run = training.train(task, ds, method, epochs=1, batch_size=100, progress=False,
                       overrides={"memory": 5})
  assert not run["diverged"] and run["train_loss"][1] < run["train_loss"][0]


def test_tiny_compare_run(tmp_path):
  second = "tnt" if methods.is_available("tnt") else "sgd"
  out = str(tmp_path / "out")
  results = compare.main([
      "--methods", f"adam,{second}", "--epochs", "2", "--batch-size", "100",
      "--train-subset", "300", "--hidden", "16,4", "--output-dir", out, "--no-progress",
      "--evals-per-epoch", "2"])
  assert sorted(os.listdir(out)) == ["curves.csv", "loss_vs_epoch.png", "loss_vs_seconds.png",
                                     "results.json", "summary.md"]
  saved = json.load(open(os.path.join(out, "results.json")))
  assert [r["method"] for r in saved["summary"]] == ["adam", second]
  adam, other = saved["runs"]
  # 3 steps per epoch, measured after steps 2 and 3 of each.
  assert adam["epoch"] == pytest.approx([0, 2 / 3, 1, 5 / 3, 2]) and adam["steps"] == 6
  assert adam["seconds"] == sorted(adam["seconds"]) and adam["seconds"][0] == 0
  # Same initial parameters for every method: identical loss before training.
  assert adam["train_loss"][0] == pytest.approx(other["train_loss"][0], rel=1e-6)
  assert adam["train_loss"][-1] < adam["train_loss"][0]
  summary = {r["method"]: r for r in saved["summary"]}
  assert summary["adam"]["step_time_vs_adam"] == pytest.approx(1.0)
  assert summary["adam"]["epochs_to_adam_final"] == 2
  with open(os.path.join(out, "curves.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 10 and {r["method"] for r in rows} == {"adam", second}
  assert results["config"]["train_examples"] == 300


def test_damping_grid_scales_each_methods_damping(tmp_path):
  out = str(tmp_path / "grid")
  results = compare.main([
      "--methods", "adam,sgd", "--epochs", "1", "--batch-size", "100", "--train-subset",
      "200", "--hidden", "8,4", "--lr-grid", "1,3", "--damping-grid", "1,100",
      "--output-dir", out, "--no-progress", "--no-plots"])
  runs = results["runs"]
  # Adam: every (lr, eps) pair; SGD has no damping, so once per learning rate.
  lr, eps = methods.get_method("adam").learning_rate, methods.get_method("adam").damping
  adam = [r for r in runs if r["method"] == "adam"]
  assert [r["learning_rate"] for r in adam] == pytest.approx([lr, lr, 3 * lr, 3 * lr])
  assert [r["hparams"]["eps"] for r in adam] == pytest.approx([eps, 100 * eps] * 2)
  assert [r["damping"] for r in adam] == pytest.approx([eps, 100 * eps] * 2)
  sgd = [r for r in runs if r["method"] == "sgd"]
  sgd_lr = methods.get_method("sgd").learning_rate
  assert [r["learning_rate"] for r in sgd] == pytest.approx([sgd_lr, 3 * sgd_lr])
  assert all(r["damping"] is None for r in sgd)
  assert results["config"]["damping_grid"] == [1.0, 100.0]
  summary = {r["method"]: r for r in results["summary"]}
  best_adam = compare.best_run([r for r in runs if r["method"] == "adam"])
  assert summary["adam"]["damping"] == best_adam["damping"]
  assert "| damping |" in open(os.path.join(out, "summary.md")).read()


def test_every_second_order_method_has_a_damping_to_scale():
  for method in methods.available_methods():
    if method.damping_key is not None:
      assert method.damping > 0, method.name
  assert methods.get_method("sgd").damping_key is None


def test_step_time_worker_times_a_bfloat16_preconditioner():
  from experiments import step_time  # pylint: disable=g-import-not-at-top
  args = step_time._parser().parse_args(
      ["--worker", "--method", "kfac", "--setting", "stats10_inv100", "--hidden", "8,4",
       "--input-dim", "16", "--batch-size", "16", "--steps", "2", "--warmup", "1",
       "--preconditioner-dtype", "bfloat16"])
  result = step_time.worker(args)
  assert result["setting"] == "stats10_inv100, bfloat16 preconditioner"
  assert result["overrides"]["preconditioner_dtype"] == "bfloat16"
  assert result["ratio_amortized"] > 0 and np.isfinite(result["final_loss"])
  # KFAC's state: per layer two float32 factors and their bfloat16 inverses (6 bytes per
  # entry), the momentum (one copy of the parameters) and a few scalars.
  factor_entries = sum(d * d for d in (17, 8, 9, 4, 5, 8, 9, 16))  # 16-8-4-8-16 with biases
  extra = result["state_bytes"] - result["param_bytes"] - 6 * factor_entries
  assert 0 <= extra < 64, extra


def test_step_time_repeats_keep_the_median_run(monkeypatch):
  from experiments import step_time  # pylint: disable=g-import-not-at-top
  ratios = iter([1.9, 1.5, 1.7])
  monkeypatch.setattr(step_time, "_run_subprocess",
                      lambda cmd, timeout: {"ratio_amortized": next(ratios), "cmd": cmd})
  args = step_time._parser().parse_args(["--repeats", "3"])
  result = step_time._repeated(["x"], args)
  assert result["ratio_amortized"] == 1.7
  assert result["ratio_amortized_runs"] == [1.5, 1.7, 1.9]


def test_absolute_grids_and_settings_reach_the_methods_that_take_them(tmp_path):
  second = "kfac" if methods.is_available("kfac") else None
  names = "adam,sgd" + (f",{second}" if second else "")
  results = compare.main([
      "--methods", names, "--epochs", "1", "--batch-size", "100", "--train-subset", "200",
      "--hidden", "8,4", "--lrs", "0.01,0.1", "--dampings", "0.5", "--set", "kl_clip=0.01",
      "--output-dir", str(tmp_path / "abs"), "--no-progress", "--no-plots"])
  runs = results["runs"]
  adam = [r for r in runs if r["method"] == "adam"]
  assert [r["learning_rate"] for r in adam] == pytest.approx([0.01, 0.1])
  assert [r["hparams"]["eps"] for r in adam] == pytest.approx([0.5, 0.5])
  assert all("kl_clip" not in r["hparams"] and r["settings"] == {} for r in adam)
  sgd = [r for r in runs if r["method"] == "sgd"]
  assert [r["damping"] for r in sgd] == [None, None]
  if second:
    kfac = [r for r in runs if r["method"] == second]
    assert [r["hparams"]["kl_clip"] for r in kfac] == [0.01, 0.01]
    assert [r["hparams"]["damping"] for r in kfac] == [0.5, 0.5]
  assert results["config"]["settings"] == {"kl_clip": 0.01}
  assert "kl_clip=0.01" in open(tmp_path / "abs" / "summary.md").read()


def test_parse_settings():
  assert compare.parse_settings(["a=1", "b=0.5", "c=none", "d=true", "e=adam"]) == {
      "a": 1, "b": 0.5, "c": None, "d": True, "e": "adam"}
  with pytest.raises(ValueError, match="KEY=VALUE"):
    compare.parse_settings(["kl_clip"])
  with pytest.raises(ValueError, match="--dampings 0.1"):
    compare.parse_settings(["damping=0.1"])  # the damping grid would override it


def test_merge_joins_separate_runs(tmp_path):
  common = ["--epochs", "1", "--batch-size", "100", "--train-subset", "200", "--hidden",
            "8,4", "--no-progress", "--no-plots"]
  first = compare.main(["--methods", "adam", "--output-dir", str(tmp_path / "a")] + common)
  compare.main(["--methods", "sgd", "--lr-grid", "1,3", "--output-dir", str(tmp_path / "b")]
               + common)
  merged = compare.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b" / "results.json"),
                         "--output-dir", str(tmp_path / "m"), "--no-plots"])
  assert [r["method"] for r in merged["runs"]] == ["adam", "sgd", "sgd"]
  assert [r["method"] for r in merged["summary"]] == ["adam", "sgd"]
  assert merged["summary"][0]["final_train_loss"] == first["summary"][0]["final_train_loss"]
  assert merged["summary"][0]["step_time_vs_adam"] == pytest.approx(1.0)
  assert sorted(os.listdir(tmp_path / "m")) == ["curves.csv", "results.json", "summary.md"]
  compare.main(["--methods", "adam", "--epochs", "2", "--batch-size", "100", "--train-subset",
                "200", "--hidden", "8,4", "--no-progress", "--no-plots", "--output-dir",
                str(tmp_path / "c")])
  # Runs of different lengths merge (a short run of a fast method next to Adam's full one).
  longer = compare.merge_results([str(tmp_path / "a"), str(tmp_path / "c")],
                                 str(tmp_path / "x"), plots=False)
  assert longer["config"]["epochs"] == 2
  other_seed = json.load(open(tmp_path / "a" / "results.json"))
  other_seed["config"]["seed"] = 7
  os.makedirs(tmp_path / "d")
  json.dump(other_seed, open(tmp_path / "d" / "results.json", "w"))
  with pytest.raises(ValueError, match="seed"):
    compare.merge_results([str(tmp_path / "a"), str(tmp_path / "d")], str(tmp_path / "y"))


def test_data_parallel_example_runs_on_synthetic_data(capsys):
  from experiments import data_parallel  # pylint: disable=g-import-not-at-top
  data_parallel.main(data_parallel.parse_args(
      ["--steps", "2", "--batch-size", "16", "--shard-state", "--log-every", "1"]))
  out = capsys.readouterr().out
  assert "step     2  loss" in out and "test accuracy" in out, out


def test_eval_chunks_split_an_epoch():
  chunks = training._eval_chunks(60, 4)
  assert [(c.start, c.stop) for c in chunks] == [(0, 15), (15, 30), (30, 45), (45, 60)]
  assert [(c.start, c.stop) for c in training._eval_chunks(3, 4)] == [(0, 1), (1, 2), (2, 3)]
  assert [(c.start, c.stop) for c in training._eval_chunks(7, 1)] == [(0, 7)]
  ds = data.load_digits()
  task = training.make_task("autoencoder", ds, hidden=(4,))
  with pytest.raises(ValueError, match="evals_per_epoch"):
    training.train(task, ds, methods.get_method("adam"), epochs=1, batch_size=100,
                   evals_per_epoch=0)


def test_time_to_adam_runs_each_method_in_its_own_process(tmp_path):
  """The accelerator timing script: Adam first, one `experiments.compare` process per
  method, merged into one summary."""
  from experiments import time_to_adam
  results = time_to_adam.main(["--dataset", "digits", "--epochs", "1", "--methods", "kfac",
                               "--evals-per-epoch", "1", "--train-subset", "200",
                               "--output-dir", str(tmp_path), "--no-plots"])
  assert [run["method"] for run in results["runs"]] == ["adam", "kfac"]
  assert [row["method"] for row in results["summary"]] == ["adam", "kfac"]
  assert (tmp_path / "kfac" / "results.json").exists()
  assert "kfac" in (tmp_path / "summary.md").read_text()
