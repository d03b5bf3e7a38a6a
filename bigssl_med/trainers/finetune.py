"""Supervised fine-tuning (`config.trainer = 'finetune'`).

One linear function, in the order of `pretrain.py`: config, mesh, the labelled
input (a case-level label fraction of the training split), model and optimiser,
starting point (resume > init_from > scratch), the jitted step, and the loop.
Every `eval_every_steps` the model is evaluated on `data.eval_split`; the best
evaluation by the task's primary metric is kept (`WORKDIR/best/`, `best.json`),
and with `early_stopping_patience` the run stops after that many evaluations
without improvement. At the end the best model is evaluated once on
`data.test_split`; `results.json` and `test_predictions.npz` hold what
`python -m bigssl_med.report` reads.

Tasks come from the data set's label feature: a class label (multi-class:
softmax cross-entropy; top-1, top-3, balanced accuracy, AUCs) or a float vector
(multi-label: sigmoid cross-entropy with an uncertainty policy; per-label and
mean AUC). A second run on a finished workdir returns its results.
"""

import collections
import functools
import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bigssl_med import build_data
from bigssl_med import config_schema
from bigssl_med import label_policies
from bigssl_med import metrics as metrics_lib
from bigssl_med import models
from bigssl_med import optim
from bigssl_med import parallel
from bigssl_med import supervised
from bigssl_med import train_state
from bigssl_med import workdir as workdir_lib
from bigssl_med.data import fractions
from bigssl_med.data import pipeline
from bigssl_med.data import sources
from bigssl_med.errors import ConfigError
from bigssl_med.trainers import pretrain

_DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
_MEAN_OVER = {'chexpert5': metrics_lib.CHEXPERT_COMPETITION}


def task_of(config: ml_collections.ConfigDict, info) -> tuple[str, supervised.Task]:
  """The label feature and the task the data set's features imply."""
  key = config.data.label_key or ('label' if 'label' in info.features else 'labels')
  if key not in info.features:
    raise ConfigError(f'data set {config.dataset!r} has no label feature {key!r} '
                      f'(config.data.label_key); features: {sorted(info.features)}')
  feature = info.features[key]
  if hasattr(feature, 'num_classes'):
    return key, supervised.Task('multiclass', feature.num_classes, tuple(feature.names))
  shape = tuple(getattr(feature, 'shape', ()))
  if len(shape) != 1:
    raise ConfigError(f'label feature {key!r} of {config.dataset!r} is neither a class label '
                      f'nor a vector (shape {shape})')
  names = tuple((info.metadata or {}).get('label_names') or
                (str(i) for i in range(shape[0])))
  if config.task.uncertain not in label_policies.POLICIES:
    raise ConfigError(f'config.task.uncertain={config.task.uncertain!r} is not one of '
                      f'{", ".join(label_policies.POLICIES)}')
  if config.task.blank not in ('zeros', 'ignore'):
    raise ConfigError(f"config.task.blank must be 'zeros' or 'ignore', got {config.task.blank!r}")
  return key, supervised.Task('multilabel', shape[0], names, config.task.uncertain,
                              config.task.blank)


def mean_over(config: ml_collections.ConfigDict, task: supervised.Task) -> tuple[str, ...]:
  """The label names the mean AUC averages over (config.task.mean_over)."""
  spec = config.task.mean_over
  if not spec:
    return task.names
  names = _MEAN_OVER.get(spec) or tuple(n.strip() for n in spec.split(',') if n.strip())
  unknown = [n for n in names if n not in task.names]
  if unknown:
    raise ConfigError(f'config.task.mean_over names unknown labels {unknown}; labels of '
                      f'{config.dataset!r}: {list(task.names)}')
  return tuple(names)


def _warn_missing_classes(source, key: str, task: supervised.Task, where: str) -> None:
  """Warns when a class has no training example (a label fraction too small)."""
  counts = collections.Counter(int(r[key]) for r in _iterate(source))
  missing = [task.names[i] for i in range(task.num_outputs) if not counts[i]]
  if missing:
    logging.warning('%s: no training example of class(es) %s; the classifier cannot learn '
                    'them (raise config.data.label_fraction)', where, ', '.join(missing))


def _iterate(source, chunk: int = 512):
  for start in range(0, len(source), chunk):
    yield from source.__getitems__(list(range(start, min(start + chunk, len(source)))))


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) fine-tuning in `workdir`; returns validation and test metrics."""
  config_schema.validate(config)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  results_path = os.path.join(workdir, 'results.json')
  previous = _read_json(results_path)
  if previous and previous.get('test') is not None and previous.get('trainer') == 'finetune':
    logging.info('Finished before: %s', results_path)
    return previous
  if config.compute_dtype not in _DTYPES:
    raise ConfigError(f'config.compute_dtype must be one of {sorted(_DTYPES)}, '
                      f'got {config.compute_dtype!r}')
  dtype = _DTYPES[config.compute_dtype]

  # ---------------------------------------------------------------- Mesh.
  mesh = parallel.data_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  host, hosts = jax.process_index(), jax.process_count()

  # ---------------------------------------------------------------- Input.
  data_dir = build_data.ensure_built(config.dataset, data_dir=config.data.data_dir,
                                     manual_dir=config.data.manual_dir,
                                     build_if_missing=config.data.build_if_missing)
  info = sources.dataset_info(config.dataset, data_dir)
  label_key, task = task_of(config, info)
  averaged = mean_over(config, task) if task.kind == 'multilabel' else ()
  primary = config.task.primary_metric or ('top1' if task.kind == 'multiclass' else 'auc_mean')
  train_name = f'{config.dataset}/{config.data.train_split}'
  train_source, _ = fractions.open_fraction(config.dataset, config.data.train_split, data_dir,
                                            config.data.label_fraction, config.data.fraction_seed)
  if task.kind == 'multiclass' and config.data.label_fraction < 1.0:
    _warn_missing_classes(train_source, label_key, task, train_name)
  label_shape = () if task.kind == 'multiclass' else (task.num_outputs,)
  spec = pipeline.ViewSpec(config.data.image_size, config.data.crop_area_min, label_key,
                           label_shape)
  steps_per_epoch = len(train_source) // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'config.batch_size={config.batch_size} is larger than the '
                      f'{len(train_source)} labelled images of {train_name} '
                      f'(label_fraction {config.data.label_fraction:g})')
  total_steps = optim.resolve_steps(steps=config.total_steps, epochs=config.num_epochs,
                                    steps_per_epoch=steps_per_epoch,
                                    what='total_steps/num_epochs')
  warmup_steps = min(total_steps, optim.resolve_steps(
      steps=config.optimizer.warmup_steps, epochs=config.optimizer.warmup_epochs,
      steps_per_epoch=steps_per_epoch, what='optimizer.warmup_steps/warmup_epochs',
      allow_zero=True))
  logging.info('%s: %d labelled images (fraction %g), %s with %d outputs, %d steps',
               train_name, len(train_source), config.data.label_fraction, task.kind,
               task.num_outputs, total_steps)

  # ---------------------------------------------------------------- Model and optimiser.
  if not 0 <= config.head_layers_kept <= config.model.head_layers:
    raise ConfigError(f'config.head_layers_kept={config.head_layers_kept} must be in '
                      f'[0, config.model.head_layers={config.model.head_layers}]')
  model = models.classifier(config.model, dtype=dtype, num_outputs=task.num_outputs,
                            head_layers_kept=config.head_layers_kept)
  schedule = optim.warmup_cosine(
      optim.peak_learning_rate(config.optimizer.learning_rate, config.optimizer.lr_scaling,
                               config.batch_size), total_steps, warmup_steps)
  run = train_state.start(
      model, config=config, workdir=workdir, mesh=mesh,
      make_tx=lambda params: optim.build_optimizer(config.optimizer, schedule, params),
      init_keys=('encoder', 'head') if config.head_layers_kept else ('encoder',),
      partial_keys=('head',))
  variables, opt, data_state, origin = run.variables, run.opt, run.data_state, run.origin
  checkpointer, model_shardings = run.checkpointer, run.shardings['model']
  start_step = int(opt['step'])
  logging.info('Start at step %d: %s', start_step, origin)

  # ---------------------------------------------------------------- Steps.
  batch_sharding = parallel.batch_sharding(mesh)
  repl = parallel.replicated(mesh)
  train_step = jax.jit(supervised.make_train_step(model, run.tx, schedule, task),
                       in_shardings=(run.shardings, batch_sharding, repl),
                       out_shardings=(run.shardings, repl), donate_argnums=0)
  eval_step = jax.jit(supervised.make_eval_step(model),
                      in_shardings=(model_shardings, batch_sharding), out_shardings=batch_sharding)
  to_device = functools.partial(parallel.to_global, mesh=mesh)

  def predict(variables, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every record of `split`, in record order."""
    source = sources.open_split(config.dataset, split, data_dir)
    images = pipeline.eval_image_dataset(
        source, spec, global_batch=config.batch_size, host_index=host, host_count=hosts,
        num_workers=config.data.num_workers, name=f'{config.dataset}/{split}')
    logits, labels, masks = [], [], []
    for batch, _ in pipeline.device_prefetch(iter(images), to_device):
      logits.append(parallel.to_host(eval_step(variables, batch)))
      labels.append(parallel.to_host(batch['label']))
      masks.append(parallel.to_host(batch['mask']))
    keep = np.concatenate(masks) > 0
    return np.concatenate(logits)[keep], np.concatenate(labels)[keep]

  def evaluate(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    if task.kind == 'multiclass':
      return metrics_lib.multiclass_metrics(logits, labels, class_names=task.names)
    targets, mask = supervised.eval_targets(labels, task.blank)
    return metrics_lib.multilabel_metrics(logits, targets, mask=mask, label_names=task.names,
                                          mean_over=averaged)

  # ---------------------------------------------------------------- Model selection.
  best_path = os.path.join(workdir, 'best.json')
  best = _read_json(best_path) or {'step': -1, 'value': None, 'validation': {},
                                   'last_eval_step': 0, 'evals_since_best': 0,
                                   'stopped_early': False}
  best_dir = os.path.join(workdir, 'best')
  saver = ocp.StandardCheckpointer()

  def select(step: int, variables) -> bool:
    """Evaluates on the validation split; keeps the best; True when patience runs out."""
    if step <= best['last_eval_step']:
      return False  # evaluated before a restart
    found = evaluate(*predict(variables, config.data.eval_split))
    writer.write(step, config.data.eval_split, _scalars(found))
    value = found.get(primary)
    if value is None:
      raise ConfigError(f'config.task.primary_metric={primary!r} is not among the metrics '
                        f'{sorted(_scalars(found))}')
    improved = best['value'] is None or (np.isfinite(value) and value > best['value'])
    if improved:  # every host calls orbax; process 0 moves the finished copy into place
      tmp = best_dir + '.tmp'
      if host == 0:
        shutil.rmtree(tmp, ignore_errors=True)
      parallel.sync(f'best {step} cleared')
      saver.save(tmp, variables)
      saver.wait_until_finished()
      parallel.sync(f'best {step} saved')
      if host == 0:
        shutil.rmtree(best_dir, ignore_errors=True)
        os.replace(tmp, best_dir)
      parallel.sync(f'best {step} moved')
    best.update(last_eval_step=step, evals_since_best=0 if improved else
                best['evals_since_best'] + 1)
    if improved:
      best.update(step=step, value=float(value), validation=found)
    stop = bool(config.early_stopping_patience and
                best['evals_since_best'] >= config.early_stopping_patience)
    best['stopped_early'] = stop
    workdir_lib.write_json(best_path, best)
    return stop

  # ---------------------------------------------------------------- Loop.
  writer = workdir_lib.MetricWriter(workdir, total_steps=total_steps,
                                    tensorboard=config.tensorboard)
  train_data = pipeline.image_dataset(
      train_source, spec, global_batch=config.batch_size, host_index=host, host_count=hosts,
      seed=config.seed, num_workers=config.data.num_workers, name=train_name)
  running = start_step < total_steps and not best['stopped_early']
  train_iter = iter(train_data) if running else iter(())
  if data_state is not None and running:
    train_iter.set_state(json.loads(data_state))
  state = {'model': variables, 'opt': opt}
  rng = jax.random.key(config.seed + 1)
  last_data_state, step = data_state, start_step
  with pretrain._Preemption() as preemption:  # pylint: disable=protected-access
    batches = pipeline.device_prefetch(train_iter, to_device, size=config.data.prefetch_batches)
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
      stop = preemption.requested or (hosts > 1 and checkpointer.reached_preemption(step))
      if (step % config.checkpoint_every_steps == 0 or step == total_steps or stop
          or stopped_early):
        checkpointer.save(step, model=state['model'], opt=state['opt'],
                          data_state=last_data_state, force=True)
      if stop:
        checkpointer.close()
        writer.close()
        raise pretrain.Preempted(step)
      if stopped_early:
        logging.info('Early stop at step %d: %d evaluations without improvement of %s',
                     step, best['evals_since_best'], primary)
        break
    batches.close()
  if best['value'] is None:  # no evaluation happened (e.g. resumed at the end)
    select(step, state['model'])

  # ---------------------------------------------------------------- Test, once.
  best_variables = saver.restore(best_dir, run.abstract_model)
  test_split = config.data.test_split
  test: dict[str, Any] = {}
  if test_split and test_split in info.splits:
    logits, labels = predict(best_variables, test_split)
    test = evaluate(logits, labels)
    writer.write(best['step'], test_split, _scalars(test))
    if jax.process_index() == 0:
      _save_predictions(os.path.join(workdir, 'test_predictions.npz'), logits, labels, task)
  elif test_split:
    logging.warning('%s has no split %r: no test evaluation (splits: %s)', config.dataset,
                    test_split, ', '.join(sorted(info.splits)))
  results = {
      'trainer': 'finetune', 'dataset': config.dataset,
      'init': config.init or (os.path.basename(os.path.normpath(config.init_from))
                              if config.init_from else 'scratch'),
      'label_fraction': float(config.data.label_fraction), 'seed': int(config.seed),
      'fraction_seed': int(config.data.fraction_seed), 'primary_metric': primary,
      'task': task.kind, 'step': step, 'total_steps': total_steps, 'best_step': best['step'],
      'stopped_early': bool(best['stopped_early']), 'origin': origin,
      'labelled_images': len(train_source), 'validation': best['validation'], 'test': test,
  }
  workdir_lib.write_json(results_path, results)
  checkpointer.close()
  writer.close()
  return results


def _scalars(found: dict[str, Any]) -> dict[str, float]:
  """The float metrics of an evaluation (per-class dicts flattened as `name/class`)."""
  out = {}
  for key, value in found.items():
    if isinstance(value, dict):
      out.update({f'{key}/{k}': float(v) for k, v in value.items()})
    elif isinstance(value, (int, float, np.floating, np.integer)):
      out[key] = float(value)
  return out


def _save_predictions(path: str, logits: np.ndarray, labels: np.ndarray,
                      task: supervised.Task) -> None:
  """Test-set probabilities and labels for reports (ROC curves)."""
  if task.kind == 'multiclass':
    shifted = logits - logits.max(axis=1, keepdims=True)
    scores = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    np.savez(path, scores=scores, labels=labels.astype(np.int64),
             class_names=np.asarray(task.names))
  else:
    targets, mask = supervised.eval_targets(labels, task.blank)
    np.savez(path, scores=1.0 / (1.0 + np.exp(-logits)), labels=targets, mask=mask,
             class_names=np.asarray(task.names))
