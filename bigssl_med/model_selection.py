"""Training with model selection on validation: the loop the task trainers share.

`BestModel` keeps the best validation evaluation by one metric, its variables in
`WORKDIR/best/` and its record in `WORKDIR/best.json`, and counts evaluations
without improvement for early stopping. `train_loop` runs the steps of a
supervised trainer (finetune, linear_eval, distill, segment): logging, periodic
validation and selection, checkpoints, SIGTERM, early stopping; it resumes
where a restarted run stopped, without evaluating a step twice.
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
from bigssl_med import parallel
from bigssl_med import preemption as preemption_lib
from bigssl_med import workdir as workdir_lib
from bigssl_med.data import pipeline
from bigssl_med.errors import ConfigError


class BestModel:
  """The best evaluation so far by `metric` (higher is better), persisted in `workdir`."""

  def __init__(self, workdir: str, *, metric: str, patience: int):
    self.metric = metric
    self.patience = patience
    self.path = os.path.join(workdir, 'best.json')
    self.dir = os.path.join(workdir, 'best')
    self.record = workdir_lib.read_json(self.path) or {
        'step': -1, 'value': None, 'validation': {}, 'last_eval_step': 0,
        'evals_since_best': 0, 'stopped_early': False}
    self._saver = ocp.StandardCheckpointer()

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
    """Keeps `variables` when `found[metric]` improves; True when patience runs out."""
    value = found.get(self.metric)
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
    improved = finite and (best is None or not np.isfinite(best) or value > best)
    undecided = not finite and (best is None or not np.isfinite(best))
    if improved or undecided:
      self._save(step, variables)
      record.update(step=step, value=float(value), validation=found)
    record.update(last_eval_step=step,
                  evals_since_best=0 if improved or undecided
                  else record['evals_since_best'] + 1)
    record['stopped_early'] = bool(self.patience and record['evals_since_best'] >= self.patience)
    workdir_lib.write_json(self.path, record)
    return record['stopped_early']

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
    return self._saver.restore(self.dir, abstract_model)


def train_loop(*, config: ml_collections.ConfigDict, state: dict[str, Any],
               data_state: bytes | None, train_data: Callable[[int], Iterable],
               train_step: Callable,
               to_device: Callable, total_steps: int, checkpointer: checkpointing.Checkpointer,
               writer: workdir_lib.MetricWriter, best: BestModel,
               evaluate: Callable[[Any], dict[str, Any]]) -> tuple[dict[str, Any], int]:
  """Trains from `state['opt']['step']` to `total_steps`; returns the state and last step.

  `evaluate(variables)` returns the validation metrics (on `config.data.eval_split`, or
  on held-out training cases, logged as split 'holdout'); it runs
  every `config.eval_every_steps` and at the last step, the metrics are logged, and
  `best` selects. A run
  that stops early saves a checkpoint and returns. After the loop, a run that has
  no evaluation yet (resumed at its end) is evaluated once.
  """
  start_step = step = int(state['opt']['step'])

  def select(step: int, variables) -> bool:
    if best.done_at(step):
      return False
    found = evaluate(variables)
    writer.write(step, config.data.eval_split or 'holdout', workdir_lib.scalars(found))
    return best.update(step, variables, found)

  running = start_step < total_steps and not best.stopped_early
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
      state, train_metrics = train_step(state, batch, rng)
      step += 1
      if step == start_step + 1:
        jax.block_until_ready(train_metrics)
        writer.start_clock(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        writer.write(step, 'train', {**scalars,
                                     **writer.progress(step, scalars, config.batch_size)})
      stopped_early = False
      if (config.eval_every_steps and step % config.eval_every_steps == 0) or (
          step == total_steps):
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
