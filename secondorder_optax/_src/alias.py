"""Full optimizers: a preconditioner chained with weight decay, momentum and the learning rate.

`soo.<method>(learning_rate, ...)` is `build_optimizer(soo.scale_by_<method>(...), ...)`:

    preconditioner -> + weight_decay * params -> momentum (optax.trace) -> -learning_rate

or, with `precondition_momentum=True` (TNT, following the paper's code), momentum first and
the preconditioner applied to the momentum buffer. Weight decay is decoupled (added after
preconditioning), as in the TNT/MBF papers' code.
"""

from __future__ import annotations

from typing import Optional

import optax

from secondorder_optax._src import layerwise


def build_optimizer(
    preconditioner: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    precondition_momentum: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Chains a preconditioner with decoupled weight decay, momentum and the learning rate.

  Args:
    preconditioner: a `soo.scale_by_<method>(...)` transformation.
    learning_rate: a number or an optax schedule.
    momentum: heavy-ball momentum (`optax.trace`); `None` or 0 for none.
    weight_decay: decoupled weight decay coefficient.
    precondition_momentum: apply momentum before the preconditioner (TNT's convention).

  Returns:
    An `optax.GradientTransformationExtraArgs` forwarding `curvature=` to the preconditioner.
  """
  momentum_tx = optax.trace(decay=momentum) if momentum else optax.identity()
  if precondition_momentum:
    parts = [momentum_tx, preconditioner]
  else:
    parts = [preconditioner]
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  if not precondition_momentum:
    parts.append(momentum_tx)
  parts.append(optax.scale_by_learning_rate(learning_rate))
  tx = optax.chain(*parts)
  describe_fn = layerwise.description_of(preconditioner)
  if describe_fn is not None:
    layerwise.register_description(tx, describe_fn)
  return tx
