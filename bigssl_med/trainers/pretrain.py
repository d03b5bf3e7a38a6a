"""SimCLR / MICLe contrastive pretraining (`config.trainer = 'pretrain'`).

One linear function: config, mesh, input, model and optimiser, starting point
(resume > init_from > scratch), the jitted step, the loop with logging,
checkpoints and evaluations, the final evaluation and `results.json`.

The step is one `jax.jit` over global arrays: parameters replicated, the batch
sharded on the mesh's `data` axis, the state donated. BatchNorm statistics and the
contrastive negatives span the whole global batch by construction.
"""

import contextlib
import functools
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from bigssl_med import augment
from bigssl_med import build_data
from bigssl_med import config_schema
from bigssl_med import contrastive
from bigssl_med import models
from bigssl_med import optim
from bigssl_med import parallel
from bigssl_med import preemption as preemption_lib
from bigssl_med import train_state
from bigssl_med import workdir as workdir_lib
from bigssl_med.data import pipeline
from bigssl_med.data import sources
from bigssl_med.data import views as views_lib
from bigssl_med.errors import ConfigError

# Fixed seeds of the evaluation crops and augmentations, so evaluations compare.
_EVAL_SEED = 1234


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) pretraining in `workdir`; returns the final evaluation."""
  config_schema.validate(config)
  workdir_lib.start(workdir, config)
  workdir_lib.check_writable(workdir)  # a finished run writes its metrics file too
  dtype = train_state.compute_dtype(config)

  # ---------------------------------------------------------------- Mesh.
  mesh = parallel.data_mesh()
  local_batch = parallel.check_batch_size(config.batch_size, mesh)
  eval_batch = config.eval_batch_size or config.batch_size
  if config.eval_batch_size:
    parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  host, hosts = jax.process_index(), jax.process_count()
  logging.info('%d devices on %d hosts; global batch %d, %d per host', mesh.devices.size,
               hosts, config.batch_size, local_batch)

  # ---------------------------------------------------------------- Input.
  data_dir = build_data.ensure_built(config.dataset, data_dir=config.data.data_dir,
                                     manual_dir=config.data.manual_dir,
                                     build_if_missing=config.data.build_if_missing)
  info = sources.dataset_info(config.dataset, data_dir)
  if config.micle and not sources.has_cases(info):
    raise ConfigError(f'config.micle pairs two images of one case, but data set '
                      f'{config.dataset!r} has no case_id feature: set config.micle=False '
                      '(SimCLR: two views of one image)')
  views_lib.view_feature(config.data.views, info.features, config.dataset)
  # MICLe draws cases (groups of records); SimCLR draws records (groups=None).
  train_source, groups = views_lib.open_cases(config.dataset, config.data.train_split,
                                              data_dir, config.data.views, by_case=config.micle)
  num_units = len(groups) if config.micle else len(train_source)
  if config.micle and all(len(group) < 2 for group in groups):
    logging.warning('config.micle: no case of %s/%s has two images, so every pair is two '
                    'views of one image, as in SimCLR', config.dataset, config.data.train_split)
  label_key = config.data.label_key if config.probe else ''
  num_classes = 0
  if label_key:
    feature = info.features[label_key] if label_key in info.features else None
    if feature is None or not hasattr(feature, 'num_classes'):
      raise ConfigError(f'config.probe needs a class label: data set {config.dataset!r} has no '
                        f'class-label feature {label_key!r} (config.data.label_key)')
    num_classes = feature.num_classes
  spec = pipeline.ViewSpec(config.data.image_size, config.data.crop_area_min, label_key)
  steps_per_epoch, total_steps, warmup_steps = optim.run_length(
      config, num_units, f'{"cases" if config.micle else "images"} of {config.dataset}/'
      f'{config.data.train_split}')
  logging.info('%s/%s: %d %s, %.1f steps per epoch, %d steps (%d warm-up)', config.dataset,
               config.data.train_split, num_units, 'cases' if config.micle else 'images',
               steps_per_epoch, total_steps, warmup_steps)

  # ---------------------------------------------------------------- Model and optimiser.
  model = models.contrastive_model(config.model, dtype=dtype, probe_classes=num_classes)
  peak_lr = optim.peak_learning_rate(config.optimizer.learning_rate,
                                     config.optimizer.lr_scaling, config.batch_size)
  schedule = optim.warmup_cosine(peak_lr, total_steps, warmup_steps)

  # ---------------------------------------------------------------- Starting point.
  results_path = os.path.join(workdir, 'results.json')
  previous = workdir_lib.read_json(results_path)
  finished = isinstance(previous, dict) and previous.get('step') == total_steps
  run = train_state.start(
      model, config=config, workdir=workdir, mesh=mesh,
      make_tx=lambda params: optim.build_optimizer(config.optimizer, schedule, params),
      init_keys=('encoder', 'head') if config.init_head else ('encoder',),
      # A finished run returns its results, whatever the data is now.
      data=None if finished else train_state.data_fingerprint(config, data_dir),
      total_steps=total_steps)
  variables, opt, data_state, origin = run.variables, run.opt, run.data_state, run.origin
  checkpointer, tx = run.checkpointer, run.tx
  model_shardings, state_shardings = run.shardings['model'], run.shardings
  repl = parallel.replicated(mesh)
  start_step = int(opt['step'])
  logging.info('Start at step %d: %s', start_step, origin)

  # ---------------------------------------------------------------- Steps.
  augment_views = augment.from_config(config.augment)
  batch_sharding = parallel.batch_sharding(mesh)
  train_step = jax.jit(
      contrastive.make_train_step(model, tx, schedule, augment_views=augment_views,
                                  temperature=config.temperature,
                                  weight_decay=config.optimizer.weight_decay),
      in_shardings=(state_shardings, batch_sharding, repl),
      out_shardings=(state_shardings, repl), donate_argnums=0)
  pairs_step, images_step = contrastive.make_eval_steps(model, augment_views=augment_views,
                                                        temperature=config.temperature)
  pairs_step = jax.jit(pairs_step, in_shardings=(model_shardings, batch_sharding, repl),
                       out_shardings=repl)
  images_step = jax.jit(images_step, in_shardings=(model_shardings, batch_sharding),
                        out_shardings=repl)
  to_device = functools.partial(parallel.to_global, mesh=mesh)

  eval_source = None
  if config.data.eval_split:
    eval_source, eval_groups = views_lib.open_cases(
        config.dataset, config.data.eval_split, data_dir, config.data.views,
        by_case=config.micle)
    units = len(eval_source) if eval_groups is None else len(eval_groups)
    if units < eval_batch:
      logging.warning('%s/%s has %d %s, fewer than one batch of %d: its contrastive metrics '
                      '(whole batches only) will not be evaluated%s; a smaller '
                      'config.eval_batch_size evaluates them', config.dataset,
                      config.data.eval_split, units, 'cases' if config.micle else 'images',
                      eval_batch, '; the probe\'s top-1 will' if label_key else '')

  def evaluate(variables) -> dict[str, float]:
    """Contrastive metrics on `eval_split` pairs and, with the probe, its top-1."""
    if eval_source is None:
      return {}
    results = {}
    name = f'{config.dataset}/{config.data.eval_split}'
    pairs = pipeline.eval_pair_dataset(
        eval_source, eval_groups, spec, global_batch=eval_batch, host_index=host,
        host_count=hosts, seed=_EVAL_SEED, num_workers=config.data.num_workers, name=name,
        max_batches=config.eval_batches)
    if pairs is not None:  # else: too few units for a batch, as the start-up said
      sums, n = {}, 0
      for i, (batch, _) in enumerate(pipeline.device_prefetch(iter(pairs), to_device)):
        m = pairs_step(variables, batch, jax.random.key(_EVAL_SEED + i))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
        n += 1
      results.update({k: v / n for k, v in sums.items()})
    if label_key:
      images = pipeline.eval_image_dataset(
          eval_source, spec, global_batch=eval_batch, host_index=host, host_count=hosts,
          num_workers=config.data.num_workers, name=name)
      correct = count = 0.0
      for batch, _ in pipeline.device_prefetch(iter(images), to_device):
        m = images_step(variables, batch)
        correct, count = correct + float(m['correct']), count + float(m['count'])
      if not count:
        logging.warning('%s has no labeled image: no probe top-1', name)
      results['probe_top1'] = correct / count if count else float('nan')
    return results

  # ---------------------------------------------------------------- Loop.
  def keep_row(row: dict[str, Any]) -> bool:
    """Rows up to the resumed step, less an unfinished run's final evaluation (the
    last checkpoint is saved before it: the run evaluates again)."""
    step = int(row.get('step', 0))
    if (not finished and step == total_steps and config.data.eval_split
        and row.get('split') == config.data.eval_split):
      return False
    return step <= start_step

  writer = workdir_lib.MetricWriter(workdir, total_steps=total_steps,
                                    tensorboard=config.tensorboard, resume_step=start_step,
                                    keep_row=keep_row)
  def train_data(start_batch: int):
    return pipeline.pair_dataset(
        train_source, groups, spec, global_batch=config.batch_size, host_index=host,
        host_count=hosts, seed=config.seed, num_workers=config.data.num_workers,
        name=f'{config.dataset}/{config.data.train_split}', start_batch=start_batch)

  train_iter = (pipeline.resume_iterator(train_data, data_state, step=start_step,
                                         num_workers=config.data.num_workers)
                if start_step < total_steps else iter(()))
  state = {'model': variables, 'opt': opt}
  rng = jax.random.key(config.seed + 1)
  last_data_state = data_state
  step = start_step
  last_metrics: dict[str, float] = {}
  images_per_step = 2 * config.batch_size

  prefetched = pipeline.device_prefetch(train_iter, to_device,
                                       size=config.data.prefetch_batches)
  with (preemption_lib.Preemption(checkpointer.reached_preemption) as preemption,
        contextlib.closing(prefetched) as batches):
    while step < total_steps:
      batch, last_data_state = next(batches)
      state, metrics = train_step(state, batch, rng)
      step += 1
      preemption.step_done(step)
      if step == start_step + 1:  # rates start after the compilation
        jax.block_until_ready(metrics)
        writer.start_clock(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        rates = writer.progress(step, scalars, images_per_step)
        last_metrics = writer.write(step, 'train', {**scalars, **rates})
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total_steps:
        # Before a SIGTERM's checkpoint: the resumed run starts after this step.
        writer.write(step, config.data.eval_split, evaluate(state['model']))
        writer.start_clock(step)
      stop = preemption.should_stop(step)
      if step % config.checkpoint_every_steps == 0 or step == total_steps or stop:
        checkpointer.save(step, model=state['model'], opt=state['opt'],
                          data_state=last_data_state, force=True)
        writer.start_clock(step)
      if stop:
        checkpointer.close()
        writer.close()
        logging.warning('Stopped at step %d after SIGTERM; the checkpoint is saved.', step)
        raise preemption_lib.Preempted(step)

  # ---------------------------------------------------------------- Final evaluation.
  if finished:
    logging.info('Step %d reached and evaluated before: %s', total_steps, results_path)
    checkpointer.close()
    writer.close()
    return previous
  if not last_metrics:  # resumed at the last step: its training row was logged before
    last_metrics = workdir_lib.last_row(workdir, 'train', total_steps) or {}
  t0 = time.perf_counter()
  eval_metrics = evaluate(state['model'])
  if eval_metrics:
    writer.write(step, config.data.eval_split, eval_metrics)
  results = {'step': step, 'total_steps': total_steps, 'origin': origin,
             'trainer': 'pretrain', 'dataset': config.dataset,
             'views': config.data.views or 'all',
             'initialised_from': run.initialised_from,
             'train': last_metrics, config.data.eval_split or 'eval': eval_metrics,
             'eval_seconds': time.perf_counter() - t0}
  checkpointer.close()  # the last checkpoint is committed before the run reads as finished
  workdir_lib.write_json(results_path, results)
  writer.close()
  return results
