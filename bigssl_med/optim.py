"""Optimisers and learning-rate schedules, as SimCLR uses them.

- LARS through `optax.lars`: weight decay is added to the gradient, then the update
  is scaled by the trust ratio `trust_coefficient * ||w|| / ||g||`, then by the
  learning rate, then momentum accumulates the scaled updates (SimCLR's
  "classic momentum"). BatchNorm parameters and biases are excluded from both the
  weight decay and the trust ratio, and so is the linear probe, which SimCLR
  regularises by an L2 term in its loss instead (`probe_l2`).
- Peak learning rate `base * B / 256` (linear scaling) or `base * sqrt(B)` (sqrt).
- Linear warm-up from 0, then cosine decay to 0 at the last step.
- Durations in steps or epochs: `resolve_steps`.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from bigssl_med.errors import ConfigError

PROBE = 'probe'


def decay_mask(params: Any) -> Any:
  """True for the leaves LARS decays and trust-scales: convolution and dense kernels.

  Flax names BatchNorm parameters `scale`/`bias` and layer biases `bias`, so the
  kernels are exactly the parameters that are neither BN parameters nor biases.
  The linear probe (top-level `probe`) is excluded as well.
  """
  def is_decayed(path, _):
    names = [getattr(k, 'key', str(k)) for k in path]
    return names[-1] == 'kernel' and names[0] != PROBE
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def probe_l2(params: Any, weight_decay: float) -> jax.Array:
  """SimCLR's L2 term for the supervised head: `wd * sum(kernel²) / 2` (no bias)."""
  if PROBE not in params:
    return jnp.zeros((), jnp.float32)
  return weight_decay * 0.5 * jnp.sum(jnp.square(params[PROBE]['kernel']))


def peak_learning_rate(base: float, scaling: str, batch_size: int) -> float:
  if scaling == 'linear':
    return base * batch_size / 256.0
  if scaling == 'sqrt':
    return base * math.sqrt(batch_size)
  raise ConfigError(f"config.optimizer.lr_scaling must be 'linear' or 'sqrt', got {scaling!r}")


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine to 0 at `total_steps`."""
  if not 0 <= warmup_steps <= total_steps:
    raise ConfigError(f'warm-up of {warmup_steps} steps does not fit in {total_steps} steps')
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak, total_steps)
  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, 0.0)


def gradient_step(state: Any, loss_fn: Callable, tx: optax.GradientTransformation,
                  schedule: Callable) -> tuple[Any, dict[str, Any]]:
  """One optimiser step of a trainer's state; every jitted train step ends with it.

  Args:
    state: `{'model': {'params', 'batch_stats'}, 'opt': {'step', 'opt_state'}}`.
    loss_fn: `params -> (loss, (new batch_stats, metrics))`.
    tx, schedule: the optimiser and its learning-rate schedule.

  Returns:
    The new state (step + 1) and the metrics with `learning_rate` added.
  """
  variables, opt = state['model'], state['opt']
  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(variables['params'])
  updates, opt_state = tx.update(grads, opt['opt_state'], variables['params'])
  params = optax.apply_updates(variables['params'], updates)
  metrics['learning_rate'] = schedule(opt['step'])
  return ({'model': {'params': params, 'batch_stats': batch_stats},
           'opt': {'step': opt['step'] + 1, 'opt_state': opt_state}}, metrics)


def build_optimizer(opt_config, schedule: Callable, params: Any) -> optax.GradientTransformation:
  """The optimiser named by `opt_config.name`: 'lars' (SimCLR), 'momentum' or 'adamw'."""
  name = opt_config.name
  mask = decay_mask(params)
  if name == 'lars':
    return optax.lars(schedule, weight_decay=opt_config.weight_decay, weight_decay_mask=mask,
                      trust_coefficient=opt_config.trust_coefficient, eps=0.0,
                      trust_ratio_mask=mask, momentum=opt_config.momentum, nesterov=False)
  if name == 'momentum':
    return optax.chain(optax.add_decayed_weights(opt_config.weight_decay, mask),
                       optax.sgd(schedule, momentum=opt_config.momentum, nesterov=True))
  if name == 'adamw':
    return optax.adamw(schedule, weight_decay=opt_config.weight_decay, mask=mask)
  raise ConfigError(f"config.optimizer.name must be 'lars', 'momentum' or 'adamw', got {name!r}")


def resolve_steps(*, steps: int, epochs: float, steps_per_epoch: int, what: str,
                  allow_zero: bool = False) -> int:
  """A duration given in steps or in epochs (exactly one of them > 0) as a step count.

  `what` names the config keys in errors, e.g. 'total_steps/num_epochs'.
  """
  if steps > 0 and epochs > 0:
    raise ConfigError(f'config sets both {what}; set one of them to 0')
  if steps > 0:
    return int(steps)
  if epochs > 0:
    return max(1, int(round(epochs * steps_per_epoch)))
  if allow_zero:
    return 0
  raise ConfigError(f'config sets neither of {what}; set one of them > 0')
