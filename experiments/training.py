"""Tasks and the training loop shared by `compare`, `step_time` and the notebook.

A `Task` ties a linen model to a loss family and says how a dataset becomes inputs and
targets. `train_step_fn` builds one jit-able training step for any registry method: a plain
`value_and_grad` for gradient-only methods, `soo.linen_curvature` with the method's Fisher
kind for second-order ones (and, for methods with a second pass such as K-BFGS, the
capture as a function of the parameters, `curvature_fn=`). `train` runs one method with a
fixed data order and seed and records per-epoch training/test loss, accuracy and training
seconds (compilation and evaluation excluded; compile time is reported separately).

Example:
  >>> from experiments import data, methods, training
  >>> ds = data.load_digits()
  >>> task = training.make_task("autoencoder", ds, hidden=(16, 4))
  >>> run = training.train(task, ds, methods.get_method("adam"), epochs=1, batch_size=500,
  ...                      progress=False)
  >>> len(run["train_loss"])  # epoch 0 (initial) and epoch 1
  2
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import secondorder_optax as soo
from experiments import data as data_lib
from experiments import models
from experiments.methods import Method

TASK_NAMES = ("autoencoder", "mlp", "cnn", "resnet20", "resnet32")
BATCH_STATS = "batch_stats"


@dataclasses.dataclass(frozen=True)
class Task:
  """A model, its loss family, and how a dataset maps to model inputs and targets.

  Attributes:
    name: task name.
    model: the linen model (ResNets take `train=` and carry batch statistics).
    loss_family: a `soo.losses` family; the training loss is its batch mean.
    is_classifier: whether accuracy is reported (targets are labels).
    has_batch_stats: whether the model keeps a `batch_stats` collection.
  """
  name: str
  model: nn.Module
  loss_family: soo.losses.LossFamily
  is_classifier: bool
  has_batch_stats: bool = False

  def inputs(self, x: np.ndarray) -> np.ndarray:
    return x.reshape((x.shape[0], -1)) if not self.is_classifier else x

  def targets(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return y if self.is_classifier else x.reshape((x.shape[0], -1))

  def train_kwargs(self) -> Dict[str, Any]:
    return {"train": True} if self.has_batch_stats else {}

  def eval_kwargs(self) -> Dict[str, Any]:
    return {"train": False} if self.has_batch_stats else {}


def make_task(name: str, dataset: data_lib.Dataset, *,
              hidden: Optional[Sequence[int]] = None) -> Task:
  """Builds a task for `dataset`.

  'autoencoder' is the papers' MNIST autoencoder on 28x28 images (other image sizes, e.g.
  the embedded 8x8 digits, get a proportionally smaller one, 256-128-64-16) with sigmoid
  binary cross-entropy; `hidden` overrides the encoder sizes. 'mlp' is `MLPClassifier`
  (hidden sizes 128, 64 unless `hidden`), 'cnn' is `SmallCNN`;
  'resnet20'/'resnet32' the CIFAR-style ResNets; all three with softmax cross-entropy.
  """
  dim = int(np.prod(dataset.image_shape))
  if name == "autoencoder":
    sizes = tuple(hidden) if hidden else (
        (1000, 500, 250, 30) if dim == 784 else (256, 128, 64, 16))
    model = models.Autoencoder(encoder_sizes=sizes, output_dim=dim)
    return Task(name, model, soo.losses.sigmoid_binary_cross_entropy, is_classifier=False)
  if name == "mlp":
    model = models.MLPClassifier(hidden=tuple(hidden) if hidden else (128, 64),
                                 num_classes=dataset.num_classes)
    return Task(name, model, soo.losses.softmax_cross_entropy, is_classifier=True)
  if name == "cnn":
    return Task(name, models.SmallCNN(num_classes=dataset.num_classes),
                soo.losses.softmax_cross_entropy, is_classifier=True)
  if name in ("resnet20", "resnet32"):
    model = models.MODEL_BUILDERS[name](num_classes=dataset.num_classes)
    return Task(name, model, soo.losses.softmax_cross_entropy, is_classifier=True,
                has_batch_stats=True)
  raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")


def init_model(task: Task, example_inputs, seed: int):
  """`(params, model_state)`; the same `seed` gives every method the same start."""
  variables = task.model.init(jax.random.key(seed), example_inputs, **task.eval_kwargs())
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return params, model_state


def _mean_loss_fn(task: Task):
  def loss_fn(params, model_state, inputs, targets):
    variables = {"params": params, **model_state}
    if task.has_batch_stats:
      outputs, new_state = task.model.apply(variables, inputs, mutable=[BATCH_STATS],
                                            **task.train_kwargs())
    else:
      outputs, new_state = task.model.apply(variables, inputs), model_state
    return task.loss_family.per_example_loss(outputs, targets).mean(), dict(new_state)
  return loss_fn


def loss_and_grads_fn(task: Task, fisher: Optional[str]):
  """`fn(params, model_state, inputs, targets, rng) -> (loss, grads, curvature, state)`.

  `curvature` is `None` for gradient-only methods (`fisher=None`).
  """
  if fisher is None:
    value_and_grad = jax.value_and_grad(_mean_loss_fn(task), has_aux=True)

    def plain(params, model_state, inputs, targets, rng):
      del rng
      (loss, new_state), grads = value_and_grad(params, model_state, inputs, targets)
      return loss, grads, None, new_state
    return plain

  mutable = (BATCH_STATS,) if task.has_batch_stats else ()
  curvature_fn = soo.linen_curvature(task.model, task.loss_family, fisher=fisher,
                                     mutable=mutable)

  def with_curvature(params, model_state, inputs, targets, rng):
    if task.has_batch_stats:
      loss, grads, curvature, new_state = curvature_fn(
          params, inputs, targets, rng, model_state=model_state, **task.train_kwargs())
      return loss, grads, curvature, {**model_state, **new_state}
    loss, grads, curvature = curvature_fn(params, inputs, targets, rng)
    return loss, grads, curvature, model_state
  return with_curvature


def train_step_fn(task: Task, tx: optax.GradientTransformation, fisher: Optional[str],
                  second_pass: bool = False):
  """One training step on the batch `idx` of the device-resident data (not jitted).

  `second_pass` (K-BFGS) also passes `curvature_fn=`, the capture on this step's batch as a
  function of the parameters (the optimizer evaluates it at its previous parameters).
  """
  loss_and_grads = loss_and_grads_fn(task, fisher)

  def step(params, model_state, opt_state, inputs, targets, idx, rng):
    batch_inputs, batch_targets = inputs[idx], targets[idx]
    loss, grads, curvature, new_model_state = loss_and_grads(
        params, model_state, batch_inputs, batch_targets, rng)
    extra = {} if curvature is None else {"curvature": curvature}
    if second_pass:
      extra["curvature_fn"] = lambda p: loss_and_grads(p, model_state, batch_inputs,
                                                       batch_targets, rng)[2]
    model_state = new_model_state
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), model_state, opt_state, loss
  return step


def evaluate_fn(task: Task, chunk: int = 1000):
  """`fn(params, model_state, inputs, targets) -> (mean loss, accuracy or nan)` in chunks."""

  @jax.jit
  def chunk_sums(params, model_state, inputs, targets, weights):
    variables = {"params": params, **model_state}
    outputs = task.model.apply(variables, inputs, **task.eval_kwargs())
    losses = task.loss_family.per_example_loss(outputs, targets)
    correct = (jnp.argmax(outputs, -1) == targets) if task.is_classifier else losses * 0
    return jnp.sum(losses * weights), jnp.sum(correct * weights)

  def evaluate(params, model_state, inputs, targets):
    n = inputs.shape[0]
    size = min(chunk, n)
    loss_sum, correct_sum = 0.0, 0.0
    for start in range(0, n, size):
      x, t = inputs[start:start + size], targets[start:start + size]
      weights = np.ones((size,), np.float32)
      if x.shape[0] < size:  # Pad the last chunk to the compiled shape.
        pad = size - x.shape[0]
        weights[x.shape[0]:] = 0.0
        x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
        t = np.concatenate([t, np.repeat(t[:1], pad, 0)])
      l, c = chunk_sums(params, model_state, x, t, weights)
      loss_sum += float(l)
      correct_sum += float(c)
    accuracy = correct_sum / n if task.is_classifier else math.nan
    return loss_sum / n, accuracy
  return evaluate


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """`(steps, batch_size)` indices of one epoch: the same for every method (seeded)."""
  if batch_size > num_examples:
    raise ValueError(f"batch size {batch_size} exceeds the {num_examples} training examples")
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = num_examples // batch_size
  return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def train(task: Task, dataset: data_lib.Dataset, method: Method, *, epochs: int,
          batch_size: int, learning_rate: Optional[float] = None, seed: int = 0,
          progress: bool = True, overrides: Optional[Dict[str, Any]] = None,
          evals_per_epoch: int = 1) -> Dict[str, Any]:
  """Trains `task` with `method`; returns per-epoch curves and timings as a dict.

  Every method sees the same initial parameters and the same batches in the same order
  (both from `seed`). `seconds[i]` is the training wall-clock time at `epoch[i]`,
  compilation and evaluation excluded. The parameters are kept `evals_per_epoch` times per
  epoch (at fractional epochs such as 0.25, 0.5, ... for 4) and evaluated after training,
  so the time to a target loss is resolved finer than an epoch and the timed steps never
  share the process with an evaluation. Training stops early once a batch loss is not
  finite (`diverged` is then True).
  """
  if not isinstance(evals_per_epoch, int) or evals_per_epoch < 1:
    raise ValueError(f"evals_per_epoch must be a positive integer, got {evals_per_epoch!r}")
  lr = method.learning_rate if learning_rate is None else learning_rate
  tx = method.build(lr, batch_size=batch_size, **(overrides or {}))
  fisher = method.capture_fisher(overrides)
  x_train = task.inputs(dataset.x_train)
  t_train = task.targets(dataset.x_train, dataset.y_train)
  x_test = task.inputs(dataset.x_test)
  t_test = task.targets(dataset.x_test, dataset.y_test)
  params, model_state = init_model(task, x_train[:1], seed)
  opt_state = tx.init(params)
  evaluate = evaluate_fn(task)
  inputs, targets = jnp.asarray(x_train), jnp.asarray(t_train)
  step = jax.jit(train_step_fn(task, tx, fisher, method.second_pass))
  base_key = jax.random.key(seed)

  idx0 = epoch_batches(len(x_train), batch_size, seed, 0)
  start = time.perf_counter()
  compiled = step.lower(params, model_state, opt_state, inputs, targets, idx0[0],
                        base_key).compile()
  compile_seconds = time.perf_counter() - start

  # Snapshots of the parameters, evaluated after training: evaluating in between slowed the
  # second-order methods' steps by up to 30% in the same process (docs/defaults.md).
  snapshots = [(0, 0.0, params, model_state)]
  train_seconds, steps_done, diverged = 0.0, 0, False
  bar = _progress_bar(range(1, epochs + 1), f"{method.name} lr={lr:g}", progress)
  for epoch in bar:
    batches = epoch_batches(len(x_train), batch_size, seed, epoch - 1)
    for chunk in _eval_chunks(len(batches), evals_per_epoch):
      start = time.perf_counter()
      for idx in batches[chunk]:
        rng = jax.random.fold_in(base_key, steps_done)
        params, model_state, opt_state, loss = compiled(params, model_state, opt_state,
                                                        inputs, targets, idx, rng)
        # One step at a time: queued CPU computations can deadlock (jax-ml/jax#25861).
        jax.block_until_ready(loss)
        steps_done += 1
      jax.block_until_ready(params)
      train_seconds += time.perf_counter() - start
      at_epoch = (epoch if chunk.stop == len(batches)
                  else epoch - 1 + chunk.stop / len(batches))
      # Host copies: on an accelerator 41 snapshots of a large model would fill its memory.
      snapshots.append((at_epoch, train_seconds, *jax.device_get((params, model_state))))
      if not math.isfinite(float(loss)):
        diverged = True
        break
    if hasattr(bar, "set_postfix"):
      bar.set_postfix(batch_loss=f"{float(loss):.4g}")
    if diverged:
      break
  record = evaluate_snapshots(evaluate, snapshots, (x_train, t_train), (x_test, t_test))
  diverged = diverged or not all(math.isfinite(l) for l in record["train_loss"])
  return {
      "method": method.name,
      "learning_rate": lr,
      "hparams": {**method.hparams, **(overrides or {})},
      "fisher": fisher,
      "reference": method.reference,
      **record,
      "steps": steps_done,
      "seconds_per_step": train_seconds / max(steps_done, 1),
      "compile_seconds": compile_seconds,
      "diverged": diverged,
  }


def evaluate_snapshots(evaluate, snapshots, train_data, test_data) -> Dict[str, List[Any]]:
  """Training/test loss and test accuracy of each `(epoch, seconds, params, model_state)`."""
  record = {"epoch": [], "train_loss": [], "test_loss": [], "test_accuracy": [],
            "seconds": []}
  for epoch, seconds, params, model_state in snapshots:
    train_loss, _ = evaluate(params, model_state, *train_data)
    test_loss, test_acc = evaluate(params, model_state, *test_data)
    for key, value in (("epoch", epoch), ("train_loss", train_loss), ("test_loss", test_loss),
                       ("test_accuracy", test_acc), ("seconds", seconds)):
      record[key].append(value)
  return record


def _eval_chunks(steps: int, evals: int) -> List[slice]:
  """`evals` consecutive slices of an epoch's `steps` batches (fewer if `steps < evals`)."""
  bounds = sorted({round(steps * k / evals) for k in range(1, evals + 1)} - {0})
  return [slice(a, b) for a, b in zip([0] + bounds[:-1], bounds)]


def _progress_bar(iterable, description: str, enabled: bool):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, desc=description, unit="epoch", leave=True)


def reach_target(run: Dict[str, Any], target: float):
  """`(epochs, seconds)` at which the training loss first is <= `target`, else `(None, None)`."""
  for epoch, loss, seconds in zip(run["epoch"], run["train_loss"], run["seconds"]):
    if epoch > 0 and math.isfinite(loss) and loss <= target:
      return epoch, seconds
  return None, None
