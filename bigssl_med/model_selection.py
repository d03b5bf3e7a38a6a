"""Training with model selection on validation: the loop the task trainers share.

`BestModel` keeps the best validation evaluation by one metric (higher is better,
lower for a loss), its variables in `WORKDIR/best/` and its record in
`WORKDIR/best.json`, and counts evaluations without improvement for early stopping
and for the plateau schedule, whose learning-rate reductions it records.
`train_loop` runs the steps of a supervised trainer (finetune, linear_eval, distill,
segment): logging, periodic validation and selection, checkpoints, SIGTERM, early
stopping; it resumes where a restarted run stopped, without evaluating a step twice.
"""

import contextlib
import logging
import os
import shutil
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bigssl_med import checkpointing
from bigssl_med import metrics as metrics_lib
from bigssl_med import optim
from bigssl_med import parallel
from bigssl_med import preemption as preemption_lib
from bigssl_med import workdir as workdir_lib
from bigssl_med.data import pipeline
from bigssl_med.errors import CheckpointError, ConfigError


def selection_settings(config: ml_collections.ConfigDict, steps_per_epoch: float,
                       total_steps: int) -> tuple[int, tuple[float, int] | None]:
  """`(eval_every steps, plateau)` of a trainer's config, for `train_loop` and `BestModel`.

  A run of `total_steps` that would evaluate only at its end while early stopping or the
  plateau schedule is asked for (which act on evaluations) gets a warning: a short run
  (a small label fraction, counted in steps) may not reach `eval_every_steps`.

  Raises:
    ConfigError: both eval_every_steps and eval_every_epochs set, or a plateau factor
      outside (0, 1), or a negative plateau patience or threshold.
  """
  eval_every = optim.resolve_steps(
      steps=config.eval_every_steps, epochs=config.eval_every_epochs,
      steps_per_epoch=steps_per_epoch, what='eval_every_steps/eval_every_epochs',
      allow_zero=True)
  o = config.optimizer
  if ((config.early_stopping_patience or o.schedule == 'plateau')
      and not 0 < eval_every < total_steps):
    logging.warning('this run of %d steps evaluates only at its end (eval_every %d steps): no '
                    'model selection, no early stopping%s; set eval_every_epochs or a smaller '
                    'eval_every_steps', total_steps, eval_every,
                    ', no plateau steps' if o.schedule == 'plateau' else '')
  if o.schedule != 'plateau':
    return eval_every, None
  if not 0.0 < o.plateau_factor < 1.0:
    raise ConfigError(f'config.optimizer.plateau_factor must be in (0, 1), got '
                      f'{o.plateau_factor}')
  if o.plateau_patience < 0:
    raise ConfigError(f'config.optimizer.plateau_patience must be >= 0, got '
                      f'{o.plateau_patience}')
  if o.plateau_threshold < 0:
    raise ConfigError(f'config.optimizer.plateau_threshold must be >= 0, got '
                      f'{o.plateau_threshold}')
  return eval_every, (float(o.plateau_factor), int(o.plateau_patience),
                      float(o.plateau_threshold))


# Validation images per training image between evaluations above which a run is warned:
# a forward pass costs about a third of a training step's, so from here on the
# evaluations take about as long as the training between them, or longer.
COSTLY_VALIDATION = 3.0


def warn_costly_validation(config: ml_collections.ConfigDict, eval_every: int,
                           total_steps: int, eval_images: int, where: str) -> None:
  """Warns when each validation of `eval_images` images (of `where`) reads more than
  `COSTLY_VALIDATION` times the images trained on between two (a small label fraction
  validated every epoch on a large set), saying how often it evaluates and how to change it."""
  if not 0 < eval_every < total_steps:
    return
  trained = eval_every * config.batch_size
  ratio = eval_images / trained
  if ratio <= COSTLY_VALIDATION:
    return
  key = 'eval_every_epochs' if config.eval_every_epochs else 'eval_every_steps'
  logging.warning('validation on %s reads %d images every %d steps of %d training images '
                  '(%.1fx): the %d evaluations may take longer than the training; a larger '
                  'config.%s evaluates less often', where, eval_images, eval_every, trained,
                  ratio, total_steps // eval_every, key)


# What every `best.json` holds (the others are filled in for a file of an older version).
_RECORD_KEYS = ('step', 'value', 'validation', 'last_eval_step', 'evals_since_best',
                'stopped_early')


class BestModel:
  """The best evaluation so far by `metric`, persisted in `workdir`.

  With `plateau=(factor, patience, threshold)` (the plateau schedule), the learning
  rate is multiplied by `factor` once more than `patience` evaluations in a row have
  not improved the metric by more than `threshold` relative to the best the schedule
  has seen (PyTorch's ReduceLROnPlateau in its default relative mode, counted in
  evaluations: a loss improves on `best` below `best * (1 - threshold)`); the count
  restarts after each reduction. Model selection and early stopping compare strictly,
  so a model can be kept while the schedule still counts a stall. `record['lr_scales']`
  lists `[step, scale]`: the scale of the steps after `step`, so a run resumed from
  an earlier checkpoint replays the scales it trained with.
  """

  def __init__(self, workdir: str, *, metric: str, patience: int,
               plateau: tuple[float, int, float] | None = None, fresh: bool = False):
    """`fresh`: the run starts from its beginning (no checkpoint to resume from), so
    what an earlier, interrupted attempt left in `best.json` and `best/` is removed."""
    self.metric = metric
    self.patience = patience
    self.plateau = plateau
    self.lower_is_better = metrics_lib.lower_is_better(metric)
    self.path = os.path.join(workdir, 'best.json')
    self.dir = checkpointing.absolute(os.path.join(workdir, 'best'))
    if fresh:
      self._forget()
    self.record = workdir_lib.read_record(
        self.path, f'restore it, or delete it and {self.dir} to select among the '
        'evaluations after the checkpoint this run resumes from only (or rerun in a new '
        'workdir)', keys=_RECORD_KEYS) or {
            'step': -1, 'value': None, 'validation': {}, 'last_eval_step': 0,
            'evals_since_best': 0, 'stopped_early': False}
    self.record.setdefault('lr_scales', [[0, 1.0]])
    self.record.setdefault('evals_since_reduction', 0)
    self.record.setdefault('plateau_best', self.record['value'])  # older best.json
    self._saver = ocp.StandardCheckpointer()

  def lr_scale_at(self, step: int) -> float:
    """The learning-rate scale of the update made from step `step` (steps done)."""
    return float([scale for since, scale in self.record['lr_scales'] if since <= step][-1])

  @property
  def step(self) -> int:
    return self.record['step']

  @property
  def evaluated(self) -> bool:
    return self.record['value'] is not None

  @property
  def stopped_early(self) -> bool:
    return bool(self.record['stopped_early'])

  def done_at(self, step: int) -> bool:
    """Whether `step` was evaluated already (before a restart)."""
    return step <= self.record['last_eval_step']

  def update(self, step: int, variables: Any, found: dict[str, Any]) -> bool:
    """Keeps `variables` when `found[metric]` improves; True when patience runs out.

    Logs one line: the step, the metric's value, and whether it is the new best or
    else the best so far and its step.
    """
    value = workdir_lib.scalars(found).get(self.metric)  # per-class ones as `name/class`
    if value is None:
      raise ConfigError(f'config.task.primary_metric={self.metric!r} is not among the metrics '
                        f'{sorted(workdir_lib.scalars(found))}')
    record = self.record
    finite, best = bool(np.isfinite(value)), record['value']
    if not finite:
      logging.warning('Step %d: %s is %s on validation, so it cannot select a model (a '
                      'split without both classes?)', step, self.metric, value)
    # A NaN never beats a number; while there is no number yet, the newest model is
    # kept and patience is not spent (nothing can be compared).
    improved = finite and (best is None or not np.isfinite(best)
                           or (value < best if self.lower_is_better else value > best))
    undecided = not finite and (best is None or not np.isfinite(best))
    if improved or undecided:
      self._save(step, variables)
      record.update(step=step, value=float(value), validation=found)
    record.update(last_eval_step=step,
                  evals_since_best=0 if improved or undecided
                  else record['evals_since_best'] + 1)
    if improved or undecided:
      logging.info('Step %d: validation %s %.6g, the new best', step, self.metric, value)
    else:
      since = record['evals_since_best']
      logging.info('Step %d: validation %s %.6g; best so far %.6g at step %d (%d evaluation%s '
                   'without improvement)', step, self.metric, value, record['value'],
                   record['step'], since, '' if since == 1 else 's')
    record['stopped_early'] = bool(self.patience and record['evals_since_best'] >= self.patience)
    if self.plateau is not None:
      factor, plateau_patience, threshold = self.plateau
      reference = record['plateau_best']
      significant = finite and (
          reference is None or not np.isfinite(reference)
          or (value < reference * (1 - threshold) if self.lower_is_better
              else value > reference * (1 + threshold)))
      if significant:
        record['plateau_best'] = float(value)
      stalled = 0 if significant or undecided else record['evals_since_reduction'] + 1
      if stalled > plateau_patience:
        scale = record['lr_scales'][-1][1] * factor
        record['lr_scales'].append([step, scale])
        logging.info('Step %d: %s has not improved for %d evaluations; learning rate x%g '
                     '(now x%g of the schedule)', step, self.metric, stalled, factor, scale)
        stalled = 0
      record['evals_since_reduction'] = stalled
    workdir_lib.write_json(self.path, record)
    return record['stopped_early']

  def _forget(self) -> None:
    """Removes an earlier attempt's record and model (process 0; every host waits)."""
    if jax.process_index() == 0 and os.path.exists(self.path):
      logging.info('%s: left by an attempt that stopped before its first checkpoint; this '
                   'run starts afresh and selects its own model', self.path)
      os.remove(self.path)  # first: a best/ without best.json is never read
      for folder in (self.dir, self.dir + '.tmp'):
        shutil.rmtree(folder, ignore_errors=True)
    parallel.sync('best forgotten')

  def _save(self, step: int, variables: Any) -> None:
    """Every host calls orbax; process 0 moves the finished copy into place."""
    tmp = self.dir + '.tmp'
    if jax.process_index() == 0:
      shutil.rmtree(tmp, ignore_errors=True)
    parallel.sync(f'best {step} cleared')
    self._saver.save(tmp, variables)
    self._saver.wait_until_finished()
    parallel.sync(f'best {step} saved')
    if jax.process_index() == 0:
      shutil.rmtree(self.dir, ignore_errors=True)
      os.replace(tmp, self.dir)
    parallel.sync(f'best {step} moved')

  def restore(self, abstract_model: Any) -> Any:
    """The selected model's variables, from `best/`, onto `abstract_model`.

    Raises:
      CheckpointError: `best/` is missing or cannot be read; one line naming it.
    """
    instead = ('to select the final checkpoint\'s model (evaluated again) instead, or rerun '
               'in a new workdir to select among every evaluation')
    if not os.path.isdir(self.dir):
      raise CheckpointError(f'{self.dir}: the selected model (step {self.step}, as '
                            f'{self.path} says) is missing; delete {self.path} {instead}')
    recover = f'delete it and {self.path} {instead}'
    try:
      with checkpointing.quiet_failed_reads():
        return self._saver.restore(self.dir, abstract_model)
    except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore errors)
      raise CheckpointError(f'{self.dir}: the selected model (step {self.step}) cannot be '
                            f'read, damaged or cut short ({checkpointing.first_line(e)}); '
                            f'{recover}') from e


def start_logs(workdir: str, config: ml_collections.ConfigDict, *, metric: str,
               plateau: tuple[float, int, float] | None, total_steps: int, resume_step: int,
               resumed: bool) -> tuple[workdir_lib.MetricWriter, BestModel]:
  """The metric writer and best model of a run that starts at `resume_step`.

  A run that did not resume from a checkpoint starts its model selection afresh. In
  `metrics.jsonl`, the rows an earlier attempt logged after `resume_step` are dropped
  (the steps are run and logged again), except its validation rows of steps
  `BestModel` has evaluated already (they are not evaluated again); test and shift
  rows are dropped, as the test runs again before the run can finish.
  """
  best = BestModel(workdir, metric=metric, patience=config.early_stopping_patience,
                   plateau=plateau, fresh=not resumed)
  eval_split = config.data.eval_split or 'holdout'

  def keep(row: dict[str, Any]) -> bool:
    split, step = str(row.get('split')), int(row.get('step', 0))
    if split == 'test' or split.startswith('shift/'):
      return False
    if split == eval_split:
      return step <= max(resume_step, best.record['last_eval_step'])
    return step <= resume_step

  writer = workdir_lib.MetricWriter(workdir, total_steps=total_steps,
                                    tensorboard=config.tensorboard, resume_step=resume_step,
                                    keep_row=keep)
  return writer, best


def train_loop(*, config: ml_collections.ConfigDict, state: dict[str, Any],
               data_state: bytes | None, train_data: Callable[[int], Iterable],
               train_step: Callable,
               to_device: Callable, total_steps: int, checkpointer: checkpointing.Checkpointer,
               writer: workdir_lib.MetricWriter, best: BestModel,
               evaluate: Callable[[Any, int], dict[str, Any]],
               eval_every: int | None = None) -> tuple[dict[str, Any], int]:
  """Trains from `state['opt']['step']` to `total_steps`; returns the state and last step.

  `train_step(state, batch, key, lr_scale)` is given `best.lr_scale_at(step)`.
  `evaluate(variables, step)` returns the validation metrics of the model at `step` (on
  `config.data.eval_split`, or on held-out training cases, logged as split 'holdout'); it runs
  every `eval_every` steps (default `config.eval_every_steps`; 0: only at the end)
  and at the last step, the metrics are logged, and `best` selects. A run
  that stops early saves a checkpoint and returns. After the loop, a run that has
  no evaluation yet (resumed at its end) is evaluated once.
  """
  start_step = step = int(state['opt']['step'])
  eval_every = config.eval_every_steps if eval_every is None else eval_every

  def select(step: int, variables) -> bool:
    if best.done_at(step):  # evaluated before a restart: its decision stands
      return best.stopped_early and step == best.record['last_eval_step']
    found = evaluate(variables, step)
    writer.write(step, config.data.eval_split or 'holdout', workdir_lib.scalars(found))
    return best.update(step, variables, found)

  # A run killed after deciding to stop early but before that step's checkpoint was
  # committed trains on to that step again, stops there and saves it.
  running = start_step < total_steps and not (
      best.stopped_early and best.record['last_eval_step'] <= start_step)
  train_iter = (pipeline.resume_iterator(train_data, data_state, step=start_step,
                                         num_workers=config.data.num_workers)
                if running else iter(()))
  rng = jax.random.key(config.seed + 1)
  last_data_state = data_state
  prefetched = pipeline.device_prefetch(train_iter, to_device,
                                       size=config.data.prefetch_batches)
  with (preemption_lib.Preemption(checkpointer.reached_preemption) as preemption,
        contextlib.closing(prefetched) as batches):
    while running and step < total_steps:
      batch, last_data_state = next(batches)
      state, train_metrics = train_step(state, batch, rng, np.float32(best.lr_scale_at(step)))
      step += 1
      preemption.step_done(step)
      if step == start_step + 1:
        jax.block_until_ready(train_metrics)
        writer.start_clock(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        writer.write(step, 'train', {**scalars,
                                     **writer.progress(step, scalars, config.batch_size)})
      stopped_early = False
      if (eval_every and step % eval_every == 0) or step == total_steps:
        stopped_early = select(step, state['model'])
        writer.start_clock(step)
      stop = preemption.should_stop(step)
      if (step % config.checkpoint_every_steps == 0 or step == total_steps or stop
          or stopped_early):
        checkpointer.save(step, model=state['model'], opt=state['opt'],
                          data_state=last_data_state, force=True)
      if stop:
        checkpointer.close()
        writer.close()
        raise preemption_lib.Preempted(step)
      if stopped_early:
        logging.info('Early stop at step %d: %d evaluations without improvement of %s',
                     step, best.record['evals_since_best'], best.metric)
        break
  if not best.evaluated:
    select(step, state['model'])
  return state, step
