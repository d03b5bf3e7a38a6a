"""Model selection on a loss (lower is better) and the plateau schedule's reductions."""

import json
import logging
import os

import ml_collections
import numpy as np
import optax
import pytest

from bigssl_med import config_schema, model_selection, optim
from test_configs import load as load_config
from bigssl_med.errors import ConfigError
from bigssl_med.trainers import finetune
from test_finetune import colours, tiny_config  # noqa: F401  pylint: disable=unused-import

VARIABLES = {'w': np.zeros(2, np.float32)}


def _best(tmp_path, metric='loss', patience=0, plateau=None):
  workdir = tmp_path / f'run{len(list(tmp_path.iterdir()))}'
  workdir.mkdir()
  return model_selection.BestModel(os.fspath(workdir), metric=metric, patience=patience,
                                   plateau=plateau)


def test_a_loss_is_selected_by_its_minimum(tmp_path):
  best = _best(tmp_path, patience=2)
  stops = [best.update(10 * (k + 1), VARIABLES, {'loss': v})
           for k, v in enumerate([0.9, 0.7, 0.8, 0.75])]
  assert (best.step, best.record['value'], stops) == (20, 0.7, [False, False, False, True])
  assert best.lower_is_better and not _best(tmp_path, metric='auc_mean').lower_is_better


def test_plateau_halves_the_rate_after_patience_stalls_like_reduce_lr_on_plateau(tmp_path):
  best = _best(tmp_path, plateau=(0.5, 2, 0.0))
  # PyTorch's ReduceLROnPlateau(factor=0.5, patience=2, threshold=0), stepped with the
  # same losses, reduces after the 3rd stall in a row and then counts afresh.
  losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85]
  for k, loss in enumerate(losses):
    best.update(k + 1, VARIABLES, {'loss': loss})
  assert best.record['lr_scales'] == [[0, 1.0], [5, 0.5], [10, 0.25]]
  assert [best.lr_scale_at(s) for s in (0, 4, 5, 9, 10, 11)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
  # A restarted run reads the reductions back.
  again = model_selection.BestModel(os.path.dirname(best.path), metric='loss', patience=0,
                                    plateau=(0.5, 2, 0.0))
  assert again.lr_scale_at(7) == 0.5 and again.record['evals_since_reduction'] == 1


class ReduceLROnPlateau:
  """PyTorch's ReduceLROnPlateau rule written out (relative threshold, no cooldown)."""

  def __init__(self, factor, patience, threshold, lower=True):
    self.factor, self.patience, self.threshold, self.lower = factor, patience, threshold, lower
    self.lr, self.best, self.bad = 1.0, np.inf if lower else -np.inf, 0

  def step(self, value):
    if (value < self.best * (1 - self.threshold) if self.lower
        else value > self.best * (1 + self.threshold)):
      self.best, self.bad = value, 0
    else:
      self.bad += 1
    if self.bad > self.patience:
      self.lr, self.bad = self.lr * self.factor, 0
    return self.lr


def test_plateau_reductions_match_a_reference_implementation(tmp_path):
  rng = np.random.default_rng(0)
  losses = list(np.cumsum(rng.normal(-0.01, 0.05, 60)) + 5)
  best = _best(tmp_path, plateau=(0.1, 3, 0.0))
  reference = ReduceLROnPlateau(0.1, 3, 0.0)
  want = []
  for step, loss in enumerate(losses, 1):
    best.update(step, VARIABLES, {'loss': loss})
    want.append(reference.step(loss))
  assert [best.lr_scale_at(s) for s in range(1, 61)] == pytest.approx(want)


@pytest.mark.parametrize('metric', ['loss', 'auc_mean'])
def test_benchmark_schedule_and_early_stop_match_the_benchmarks_loop(tmp_path, metric):
  """The benchmark's loop: ReduceLROnPlateau(factor=0.5, patience=5, threshold=1e-4, rel)
  stepped on every validation value, the model kept on a strict improvement, and a stop
  once more than 10 evaluations in a row brought none; written out in float64."""
  c = load_config('benchmark_cxr')
  _, plateau = model_selection.selection_settings(c, steps_per_epoch=10, total_steps=1000)
  rng = np.random.default_rng(1)
  # A clear descent; relative steps of 1e-5 (better models, too small for the
  # schedule until ten add up); then no better value.
  small_steps = np.cumprod(np.full(60, 1 - 1e-5))
  loss = np.concatenate([np.linspace(2.0, 1.0, 40), small_steps,
                         small_steps[-1] * (1 + 0.01 * rng.random(30))])
  lower = metric == 'loss'
  values = loss if lower else 3.0 - loss

  best = _best(tmp_path, metric=metric, patience=c.early_stopping_patience, plateau=plateau)
  schedule = ReduceLROnPlateau(0.5, 5, 1e-4, lower)
  counter, want_lrs, stopped_at = 0, [], None
  kept = np.inf if lower else -np.inf
  for epoch, value in enumerate(values, 1):
    stop = best.update(epoch, VARIABLES, {metric: value})
    want_lrs.append(schedule.step(value))
    if value < kept if lower else value > kept:
      kept, counter = value, 0
    else:
      counter += 1
    assert stop == (counter > 10), epoch
    if stop:
      stopped_at = epoch
      break
  assert stopped_at == 111
  assert [best.lr_scale_at(s) for s in range(1, stopped_at + 1)] == pytest.approx(want_lrs)
  # The threshold mattered: without it, the small improvements would reset the count.
  assert len(best.record['lr_scales']) >= 6
  assert best.record['value'] == pytest.approx(kept)


def test_selection_settings(tmp_path):
  c = config_schema.finetune()
  c.eval_every_steps, c.eval_every_epochs = 0, 1.0
  c.optimizer.schedule = 'plateau'
  assert model_selection.selection_settings(c, 12.4, 1000) == (12, (0.5, 5, 1e-4))
  c.eval_every_steps = 5
  with pytest.raises(ConfigError, match='both eval_every_steps/eval_every_epochs'):
    model_selection.selection_settings(c, 12.4, 1000)
  c.eval_every_epochs, c.optimizer.plateau_factor = 0.0, 1.5
  with pytest.raises(ConfigError, match=r'plateau_factor must be in \(0, 1\), got 1.5'):
    model_selection.selection_settings(c, 12.4, 1000)
  c.optimizer.schedule = 'cosine'
  assert model_selection.selection_settings(c, 12.4, 1000) == (5, None)


@pytest.mark.parametrize('every, epochs, total, patience, warns', [
    (1000, 0.0, 790, 5, True),     # CheXpert's 10 epochs at a 10% label fraction
    (1000, 0.0, 790, 0, False),    # no early stopping asked for: evaluating once is the plan
    (0, 0.0, 790, 5, True),
    (0, 1.0, 790, 5, False),       # every epoch, at any fraction
    (100, 0.0, 790, 5, False),
])
def test_a_run_that_evaluates_only_at_its_end_warns(caplog, every, epochs, total, patience,
                                                     warns):
  c = config_schema.finetune()
  c.eval_every_steps, c.eval_every_epochs, c.early_stopping_patience = every, epochs, patience
  with caplog.at_level(logging.WARNING):
    model_selection.selection_settings(c, 79.0, total)
  assert ('evaluates only at its end' in caplog.text) == warns, caplog.text


def test_plateau_schedule_is_constant_after_warm_up_and_refuses_lars():
  o = ml_collections.ConfigDict({'name': 'adamw', 'schedule': 'plateau'})
  schedule = optim.schedule_for(o, 2.0, 100, 10)
  assert [float(schedule(s)) for s in (0, 5, 10, 99)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
  o.name = 'lars'
  with pytest.raises(ConfigError, match="needs optimizer.name 'momentum' or 'adamw'"):
    optim.schedule_for(o, 2.0, 100, 10)
  o.name, o.schedule = 'adamw', 'step'
  with pytest.raises(ConfigError, match="must be 'cosine' or 'plateau', got 'step'"):
    optim.schedule_for(o, 2.0, 100, 10)


@pytest.mark.parametrize('name', ['momentum', 'adamw'])
def test_lr_scale_scales_the_learning_rate(name):
  """Scaling the update by s is the optimiser at learning rate s x lr, moments included."""
  params = {'w': np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3)}
  o = ml_collections.ConfigDict({'name': name, 'momentum': 0.9, 'weight_decay': 1e-2})
  scales = [1.0, 1.0, 0.5, 0.5, 0.25]
  results = []
  for scaled in (True, False):
    lrs = iter(scales)
    schedule = (optax.constant_schedule(0.1) if scaled
                else lambda step: 0.1 * np.asarray(scales)[step])
    tx = optim.build_optimizer(o, schedule, params)
    state = {'model': {'params': params, 'batch_stats': {}},
             'opt': {'step': 0, 'opt_state': tx.init(params)}}

    def loss_fn(p):
      return (p['w'] ** 3).sum(), ({}, {})

    for _ in scales:
      state, metrics = optim.gradient_step(state, loss_fn, tx, schedule,
                                           next(lrs) if scaled else None)
    results.append((np.asarray(state['model']['params']['w']),
                    float(metrics['learning_rate'])))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  assert results[0][1] == pytest.approx(results[1][1])


def test_finetune_with_the_plateau_schedule_and_loss_selection(colours, tmp_path):  # noqa: F811
  cfg = tiny_config(colours, total_steps=0, num_epochs=6.0, eval_every_steps=0,
                    eval_every_epochs=1.0,
                    **{'optimizer.name': 'adamw', 'optimizer.schedule': 'plateau',
                       'optimizer.plateau_patience': 0, 'optimizer.learning_rate': 20.0,
                       'task.primary_metric': 'loss', 'classifier_init': 'normal'})
  workdir = tmp_path / 'plateau'
  results = finetune.train_and_evaluate(cfg, os.fspath(workdir))
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  validation = [r for r in rows if r['split'] == 'validation']
  assert [r['step'] for r in validation] == [4 * k for k in range(1, 7)]  # 64 / 16 a epoch
  best = json.loads((workdir / 'best.json').read_text())
  assert best['value'] == min(r['loss'] for r in validation)
  assert results['validation']['loss'] == best['value'] and 'loss' in results['test']
  # The report leads with the task's metric, not the loss the model was selected on: for
  # this two-class task, its AUC.
  assert (results['primary_metric'], results['selected_on']) == ('auc', 'loss')
  # Each logged rate is the peak (20 x 16/256) times the scale of that step's update.
  scales = best['lr_scales']
  assert len(scales) > 1  # the loss stalled at least once, and the rate was lowered
  for row in (r for r in rows if r['split'] == 'train'):
    scale = [s for since, s in scales if since <= row['step'] - 1][-1]
    assert row['learning_rate'] == pytest.approx(20.0 * 16 / 256 * scale)


def test_a_per_class_metric_selects_the_model(tmp_path):
  best = _best(tmp_path, metric='auc_per_class/b')
  for step, auc in ((10, 0.6), (20, 0.9), (30, 0.7)):
    best.update(step, VARIABLES, {'top1': 0.5, 'auc_per_class': {'a': 0.5, 'b': auc}})
  assert (best.step, best.record['value']) == (20, 0.9)


def test_an_unknown_primary_metric_fails_before_training_naming_the_metrics(
    colours, tmp_path):  # noqa: F811
  cfg = tiny_config(colours, **{'task.primary_metric': 'auc_mean'})  # a multi-label metric
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError) as excinfo:
    finetune.train_and_evaluate(cfg, os.fspath(workdir))
  message = str(excinfo.value)
  assert "primary_metric='auc_mean'" in message and "'top1'" in message and '\n' not in message
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'metrics.jsonl').exists()


@pytest.mark.parametrize('eval_images, eval_every, warned', [
    (100, 2, True),  # 100 validation images every 16 training images: 6.25x
    (48, 2, False),  # 3x: as long as the training between evaluations, no more
    (100, 0, False),  # evaluated at the end only
    (100, 10, False),  # once, at the end
])
def test_validation_much_larger_than_the_training_between_evaluations_is_a_warning(
    caplog, eval_images, eval_every, warned):
  config = ml_collections.ConfigDict({'batch_size': 8, 'eval_every_epochs': 1.0})
  with caplog.at_level(logging.WARNING):
    model_selection.warn_costly_validation(config, eval_every, 10, eval_images, 'data/valid')
  messages = [r.getMessage() for r in caplog.records]
  if warned:
    assert messages == ['validation on data/valid reads 100 images every 2 steps of 16 training '
                        'images (6.2x): the 5 evaluations may take longer than the training; a '
                        'larger config.eval_every_epochs evaluates less often']
  else:
    assert not messages
