"""Optimisers and learning-rate schedules, as SimCLR uses them.

- LARS through `optax.lars`: weight decay is added to the gradient, then the update
  is scaled by the trust ratio `trust_coefficient * ||w|| / ||g||`, then by the
  learning rate, then momentum accumulates the scaled updates (SimCLR's
  "classic momentum"). BatchNorm parameters and biases are excluded from both the
  weight decay and the trust ratio, and so are the supervised heads (SimCLR's
  `head_supervised`: the linear probe of pretraining, and under LARS the classifier
  of fine-tuning and linear evaluation), which SimCLR regularises by an L2 term in
  the loss instead (`head_l2`).
- Peak learning rate `base * B / 256` (linear scaling) or `base * sqrt(B)` (sqrt).
- Linear warm-up from 0, then cosine decay to 0 at the last step.
- Durations in steps or epochs: `resolve_steps`; a run's lengths: `run_length`. An
  epoch is N/B steps (N images, or cases with MICLe; B the global batch), as SimCLR
  counts a duration in epochs (its input repeats, then batches across epochs).
"""

import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigssl_med.errors import ConfigError

PROBE = 'probe'
CLASSIFIER = 'classifier'


def decay_mask(params: Any, heads: tuple[str, ...] = (PROBE,)) -> Any:
  """True for the leaves the optimiser decays (and LARS trust-scales): the kernels.

  Flax names BatchNorm parameters `scale`/`bias` and layer biases `bias`, so the
  kernels are exactly the parameters that are neither BN parameters nor biases.
  The supervised heads among the top-level `heads` are excluded as well.
  """
  def is_decayed(path, _):
    names = [getattr(k, 'key', str(k)) for k in path]
    return names[-1] == 'kernel' and names[0] not in heads
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def lars_heads(opt_config) -> tuple[str, ...]:
  """The supervised heads an optimiser leaves to `head_l2`: the probe, and under LARS
  the classifier too (SimCLR's `head_supervised` when it fine-tunes with LARS)."""
  return (PROBE, CLASSIFIER) if opt_config.name == 'lars' else (PROBE,)


def head_l2(params: Any, weight_decay: float, heads: tuple[str, ...] = (PROBE,)) -> jax.Array:
  """SimCLR's L2 term for its supervised head: `wd * sum(kernel²) / 2` (no bias), summed
  over the top-level `heads` present in `params`."""
  total = jnp.zeros((), jnp.float32)
  for name in heads:
    if name in params:
      total = total + jnp.sum(jnp.square(params[name]['kernel'].astype(jnp.float32)))
  return weight_decay * 0.5 * total


def peak_learning_rate(base: float, scaling: str, batch_size: int) -> float:
  if scaling == 'linear':
    return base * batch_size / 256.0
  if scaling == 'sqrt':
    return base * math.sqrt(batch_size)
  raise ConfigError(f"config.optimizer.lr_scaling must be 'linear' or 'sqrt', got {scaling!r}")


def schedule_for(opt_config, peak: float, total_steps: int,
                 warmup_steps: int) -> optax.Schedule:
  """The schedule `opt_config.schedule` names (`cosine` when the config has no such key).

  'cosine': `warmup_cosine`; 'plateau': linear warm-up, then the peak, which the
  training loop lowers by `plateau_factor` whenever the validation metric stalls
  (`model_selection.BestModel`), as PyTorch's ReduceLROnPlateau does.
  """
  name = opt_config.get('schedule', 'cosine')
  if name == 'cosine':
    return warmup_cosine(peak, total_steps, warmup_steps)
  if name == 'plateau':
    if opt_config.name == 'lars':
      raise ConfigError("config.optimizer.schedule='plateau' needs optimizer.name 'momentum' "
                        "or 'adamw' (LARS applies the learning rate before its momentum)")
    _check_warmup(warmup_steps, total_steps)
    if warmup_steps == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps),
                                 optax.constant_schedule(peak)], [warmup_steps])
  raise ConfigError(f"config.optimizer.schedule must be 'cosine' or 'plateau', got {name!r}")


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine to 0 at `total_steps`."""
  _check_warmup(warmup_steps, total_steps)
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak, total_steps)
  if warmup_steps == total_steps:
    logging.warning('The warm-up takes all %d steps: the learning rate ends at its peak %g '
                    '(shorten optimizer.warmup_steps or warmup_epochs)', total_steps, peak)
    return optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, 0.0)


def _check_warmup(warmup_steps: int, total_steps: int) -> None:
  if not 0 <= warmup_steps <= total_steps:
    raise ConfigError(f'warm-up of {warmup_steps} steps does not fit in {total_steps} steps')


def gradient_step(state: Any, loss_fn: Callable, tx: optax.GradientTransformation,
                  schedule: Callable, lr_scale: Any = None) -> tuple[Any, dict[str, Any]]:
  """One optimiser step of a trainer's state; every jitted train step ends with it.

  Args:
    state: `{'model': {'params', 'batch_stats'}, 'opt': {'step', 'opt_state'}}`.
    loss_fn: `params -> (loss, (new batch_stats, metrics))`.
    tx, schedule: the optimiser and its learning-rate schedule.
    lr_scale: None, or a scalar the update is multiplied by: the plateau schedule's
      reductions. 'momentum' and 'adamw' apply the learning rate last (their momentum
      and moments are kept unscaled), so this scales the learning rate; LARS scales
      before its momentum, so `schedule_for` refuses the plateau schedule with it.

  Returns:
    The new state (step + 1) and the metrics with `learning_rate` added.
  """
  variables, opt = state['model'], state['opt']
  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(variables['params'])
  updates, opt_state = tx.update(grads, opt['opt_state'], variables['params'])
  learning_rate = schedule(opt['step'])
  if lr_scale is not None:
    lr_scale = jnp.asarray(lr_scale, jnp.float32)
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    learning_rate = learning_rate * lr_scale
  params = optax.apply_updates(variables['params'], updates)
  metrics['learning_rate'] = learning_rate
  return ({'model': {'params': params, 'batch_stats': batch_stats},
           'opt': {'step': opt['step'] + 1, 'opt_state': opt_state}}, metrics)


_NORM_CHUNK = 1024


def sums_of_squares(leaves: list[jax.Array]) -> jax.Array:
  """`[sum(x²) for x in leaves]` in float32, as one reduction over all of them.

  Each leaf is flattened and zero-padded to a multiple of `_NORM_CHUNK`; the pieces
  are concatenated into one `[chunks, _NORM_CHUNK]` array, reduced along its rows,
  and the row sums are added up per leaf. One reduction kernel and one small
  segment sum, where a sum per leaf is a kernel per leaf.
  """
  pieces, owners = [], []
  for i, leaf in enumerate(leaves):
    flat = jnp.ravel(leaf).astype(jnp.float32)
    chunks = -(-flat.size // _NORM_CHUNK)
    pieces.append(jnp.pad(flat, (0, chunks * _NORM_CHUNK - flat.size)))
    owners.append(np.full(chunks, i, np.int32))
  rows = jnp.concatenate(pieces).reshape(-1, _NORM_CHUNK)
  return jax.ops.segment_sum(jnp.sum(rows * rows, axis=1), np.concatenate(owners),
                             num_segments=len(leaves), indices_are_sorted=True)


def batched_trust_ratio(trust_coefficient: float) -> optax.GradientTransformation:
  """`optax.scale_by_trust_ratio(trust_coefficient=...)` with every norm in one reduction.

  The same update (`trust_coefficient·‖w‖/‖u‖`, or 1 where either norm is 0) and the
  same (empty) state, so it can replace optax's inside `optax.lars`: a LARS step on
  a ResNet-50 otherwise computes two norms per kernel, two small kernels each.
  """
  def update(updates, state, params):
    if params is None:
      raise ValueError('batched_trust_ratio needs the parameters')
    leaves_u, treedef = jax.tree.flatten(updates)
    leaves_p = treedef.flatten_up_to(params)
    if not leaves_u:
      return updates, state
    norms = jnp.sqrt(sums_of_squares(leaves_u + leaves_p))
    norm_u, norm_p = norms[:len(leaves_u)], norms[len(leaves_u):]
    ratio = jnp.where((norm_p == 0) | (norm_u == 0), 1.0, trust_coefficient * norm_p / norm_u)
    scaled = [u * ratio[i].astype(u.dtype) for i, u in enumerate(leaves_u)]
    return jax.tree.unflatten(treedef, scaled), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def lars(learning_rate, *, weight_decay: float, mask: Any, trust_coefficient: float,
         momentum: float, batched_norms: bool = False) -> optax.GradientTransformation:
  """SimCLR's LARS: `optax.lars` (no Nesterov, eps 0) with `mask` for decay and trust ratio.

  `batched_norms` computes the trust ratios' norms in one reduction
  (`batched_trust_ratio`); the update and the optimiser state are the same either
  way, so checkpoints work with both.
  """
  if not batched_norms:
    return optax.lars(learning_rate, weight_decay=weight_decay, weight_decay_mask=mask,
                      trust_coefficient=trust_coefficient, eps=0.0, trust_ratio_mask=mask,
                      momentum=momentum, nesterov=False)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask),
      optax.masked(batched_trust_ratio(trust_coefficient), mask),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum, nesterov=False))


def build_optimizer(opt_config, schedule: Callable, params: Any) -> optax.GradientTransformation:
  """The optimiser named by `opt_config.name`: 'lars' (SimCLR), 'momentum' or 'adamw'."""
  name = opt_config.name
  mask = decay_mask(params, lars_heads(opt_config))
  if name == 'lars':
    return lars(schedule, weight_decay=opt_config.weight_decay, mask=mask,
                trust_coefficient=opt_config.trust_coefficient, momentum=opt_config.momentum,
                batched_norms=getattr(opt_config, 'lars_batched_norms', False))
  if name == 'momentum':
    return optax.chain(optax.add_decayed_weights(opt_config.weight_decay, mask),
                       optax.sgd(schedule, momentum=opt_config.momentum, nesterov=True))
  if name == 'adamw':
    return optax.adamw(schedule, weight_decay=opt_config.weight_decay, mask=mask)
  raise ConfigError(f"config.optimizer.name must be 'lars', 'momentum' or 'adamw', got {name!r}")


def resolve_steps(*, steps: int, epochs: float, steps_per_epoch: float, what: str,
                  allow_zero: bool = False) -> int:
  """A duration given in steps or in epochs (exactly one of them > 0) as a step count.

  `what` names the config keys in errors, e.g. 'total_steps/num_epochs'.
  """
  if steps > 0 and epochs > 0:
    first, second = what.split('/')
    prefix = first.rpartition('.')[0]
    raise ConfigError(f'config sets both {what}; set one of them to 0 (e.g. '
                      f"--config.{prefix + '.' if prefix else ''}{second}=0)")
  if steps > 0:
    return int(steps)
  if epochs > 0:
    return max(1, int(round(epochs * steps_per_epoch)))
  if allow_zero:
    return 0
  raise ConfigError(f'config sets neither of {what}; set one of them > 0')


def run_length(config, num_examples: int, examples: str) -> tuple[float, int, int]:
  """`(steps_per_epoch, total_steps, warmup_steps)` of a trainer's config over its train set.

  `num_examples` are the units an epoch goes through once (images, or cases for
  MICLe); `examples` describes them for the error when one global batch
  (`config.batch_size`) holds more, e.g. 'labelled images of ham10000/train'.
  An epoch is `num_examples / batch_size` steps, a fraction included, so E epochs
  show each unit E times on average: the input pipeline reshuffles every
  ⌊N/B⌋ steps and leaves out the N mod B units each shuffle puts last (other ones
  every time) rather than put a unit twice in one batch. The warm-up is capped at
  the run's length.
  """
  steps_per_epoch = num_examples / config.batch_size
  if num_examples < config.batch_size:
    raise ConfigError(f'config.batch_size={config.batch_size} is larger than the '
                      f'{num_examples} {examples}')
  total_steps = resolve_steps(steps=config.total_steps, epochs=config.num_epochs,
                              steps_per_epoch=steps_per_epoch, what='total_steps/num_epochs')
  warmup_steps = resolve_steps(steps=config.optimizer.warmup_steps,
                               epochs=config.optimizer.warmup_epochs,
                               steps_per_epoch=steps_per_epoch,
                               what='optimizer.warmup_steps/warmup_epochs', allow_zero=True)
  return steps_per_epoch, total_steps, min(warmup_steps, total_steps)
