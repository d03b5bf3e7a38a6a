"""Binary segmentation with a U-Net on the ResNet encoder (`config.trainer = 'segment'`).

The transfer-learning benchmark's segmentation network and metric:
segmentation_models' U-Net (`bigssl_med.models.UNet`) on the project's encoder,
trained with BCE + soft Dice (`bigssl_med.segmentation`; the weights are
`config.loss`), evaluated by the hard Dice coefficient; the model is selected on the
validation Dice (the benchmark's code keeps the lowest validation loss). One linear
function, in the order of `finetune.py`: config, mesh, the masked input (a
case-level label fraction of the training split, `data.mask_key` masks), model and
optimiser, starting point (resume > init_from's encoder > scratch), the jitted
steps, and the loop. Every `eval_every_steps` the model is evaluated on
`data.eval_split`; the best mean Dice is kept (`WORKDIR/best/`, `best.json`), and
with `early_stopping_patience` the run stops after that many evaluations without
improvement. At the end the best model is evaluated once on `data.test_split`;
`results.json` holds what `python -m bigssl_med.report` reads. A second run on a
finished workdir returns its results.

Metrics are computed on the masks resized to `data.image_size` (nearest
neighbour), as the benchmark scores its 224 x 224 masks.
"""

import functools
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from bigssl_med import build_data
from bigssl_med import checkpointing
from bigssl_med import config_schema
from bigssl_med import model_selection
from bigssl_med import models
from bigssl_med import optim
from bigssl_med import parallel
from bigssl_med import segmentation
from bigssl_med import train_state
from bigssl_med import workdir as workdir_lib
from bigssl_med.data import fractions
from bigssl_med.data import pipeline
from bigssl_med.data import segmentation_data
from bigssl_med.data import sources
from bigssl_med.errors import ConfigError
from bigssl_med.models import resnet

PRIMARY_METRIC = 'dice'


def _check_model(config: ml_collections.ConfigDict) -> None:
  """The decoder has one block per encoder map, and the image size fits the strides."""
  channels = tuple(config.decoder_channels)
  num_maps = len(resnet.map_strides(config.model.cifar_stem))
  if len(channels) != num_maps or not all(isinstance(c, int) and c > 0 for c in channels):
    raise ConfigError(f'config.decoder_channels={channels} must be {num_maps} positive ints, '
                      'one per decoder block')
  stride = resnet.map_strides(config.model.cifar_stem)[-1]
  if config.data.image_size % stride:
    raise ConfigError(f'config.data.image_size={config.data.image_size} must be a multiple of '
                      f'{stride}, the encoder\'s output stride, for the U-Net\'s skips to align')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) segmentation training in `workdir`; returns validation and test Dice."""
  config_schema.validate(config)
  workdir_lib.start(workdir, config)
  results_path = os.path.join(workdir, 'results.json')
  previous = workdir_lib.finished_results(workdir, config)
  if previous is not None:
    return previous
  dtype = train_state.compute_dtype(config)
  _check_model(config)

  # ---------------------------------------------------------------- Mesh.
  mesh = parallel.data_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  host, hosts = jax.process_index(), jax.process_count()

  # ---------------------------------------------------------------- Input.
  data_dir = build_data.ensure_built(config.dataset, data_dir=config.data.data_dir,
                                     manual_dir=config.data.manual_dir,
                                     build_if_missing=config.data.build_if_missing)
  info = sources.dataset_info(config.dataset, data_dir)
  segmentation_data.check_mask_feature(info, config.dataset, config.data.mask_key)
  train_name = f'{config.dataset}/{config.data.train_split}'
  train_source, train_cases = fractions.open_fraction(
      config.dataset, config.data.train_split, data_dir, config.data.label_fraction,
      config.data.fraction_seed)
  spec = segmentation_data.MaskSpec(config.data.image_size, config.data.crop_area_min,
                                    config.data.mask_key)
  steps_per_epoch, total_steps, warmup_steps = optim.run_length(
      config, len(train_source), f'masked images of {train_name} '
      f'(label_fraction {config.data.label_fraction:g})')
  logging.info('%s: %d masked images (fraction %g), %d steps', train_name, len(train_source),
               config.data.label_fraction, total_steps)
  eval_every, plateau = model_selection.selection_settings(config, steps_per_epoch,
                                                          total_steps)

  # ---------------------------------------------------------------- Model and optimiser.
  model = models.unet_model(config.model, dtype=dtype, decoder_channels=config.decoder_channels)
  schedule = optim.schedule_for(
      config.optimizer,
      optim.peak_learning_rate(config.optimizer.learning_rate, config.optimizer.lr_scaling,
                               config.batch_size), total_steps, warmup_steps)
  run = train_state.start(
      model, config=config, workdir=workdir, mesh=mesh,
      make_tx=lambda params: optim.build_optimizer(config.optimizer, schedule, params),
      init_keys=('encoder',), data=train_state.data_fingerprint(config, data_dir),
      total_steps=total_steps)
  variables, opt, data_state, origin = run.variables, run.opt, run.data_state, run.origin
  checkpointer, model_shardings = run.checkpointer, run.shardings['model']
  logging.info('Start at step %d: %s', int(opt['step']), origin)

  # ---------------------------------------------------------------- Steps.
  batch_sharding = parallel.batch_sharding(mesh)
  repl = parallel.replicated(mesh)
  train_step = jax.jit(
      segmentation.make_train_step(model, run.tx, schedule, bce_weight=config.loss.bce_weight,
                                   dice_weight=config.loss.dice_weight,
                                   smooth=config.loss.dice_smooth,
                                   per_image=config.loss.dice_per_image),
      in_shardings=(run.shardings, batch_sharding, repl, repl),
      out_shardings=(run.shardings, repl), donate_argnums=0)
  eval_step = jax.jit(segmentation.make_eval_step(model),
                      in_shardings=(model_shardings, batch_sharding), out_shardings=batch_sharding)
  to_device = functools.partial(parallel.to_global, mesh=mesh)

  def evaluate(variables, split: str) -> dict[str, Any]:
    """Dice and IoU of every record of `split`, each counted once."""
    source = sources.open_split(config.dataset, split, data_dir)
    batches = segmentation_data.eval_dataset(
        source, spec, global_batch=config.batch_size, host_index=host, host_count=hosts,
        num_workers=config.data.num_workers, name=f'{config.dataset}/{split}')
    counts, valid = [], []
    for batch, _ in pipeline.device_prefetch(iter(batches), to_device):
      counts.append(parallel.to_host(eval_step(variables, batch)))
      valid.append(parallel.to_host(batch['valid']))
    return segmentation.dice_metrics(np.concatenate(counts)[np.concatenate(valid) > 0])

  # ---------------------------------------------------------------- Loop, with model selection.
  writer, best = model_selection.start_logs(
      workdir, config, metric=PRIMARY_METRIC, plateau=plateau, total_steps=total_steps,
      resume_step=int(opt['step']), resumed=origin.startswith('resumed'))

  train_data = functools.partial(
      segmentation_data.train_dataset, train_source, spec, global_batch=config.batch_size,
      host_index=host, host_count=hosts, seed=config.seed,
      num_workers=config.data.num_workers, name=train_name)
  _, step = model_selection.train_loop(
      config=config, state={'model': variables, 'opt': opt}, data_state=data_state,
      train_data=train_data, train_step=train_step, to_device=to_device,
      total_steps=total_steps, checkpointer=checkpointer, writer=writer, best=best,
      evaluate=lambda variables, step: evaluate(variables, config.data.eval_split),
      eval_every=eval_every)

  # ---------------------------------------------------------------- Test, once.
  best_variables = best.restore(run.abstract_model)
  test_split = config.data.test_split
  test: dict[str, Any] = {}
  if test_split and test_split in info.splits:
    test = evaluate(best_variables, test_split)
    writer.write(best.step, test_split, workdir_lib.scalars(test))
  elif test_split:
    logging.warning('%s has no split %r: no test evaluation (splits: %s)', config.dataset,
                    test_split, ', '.join(sorted(info.splits)))
  results = {
      'trainer': 'segment', 'dataset': config.dataset,
      'init': config.init or (checkpointing.init_name(config.init_from)
                              if config.init_from else 'scratch'),
      'init_from': config.init_from, 'initialised_from': run.initialised_from,
      'pretrain_seed': checkpointing.recorded_pretrain_seed(run.initialised_from,
                                                            config.init_from),
      'label_fraction': float(config.data.label_fraction), 'seed': int(config.seed),
      'fraction_seed': int(config.data.fraction_seed), 'primary_metric': PRIMARY_METRIC,
      'task': 'segmentation', 'step': step, 'total_steps': total_steps,
      'best_step': best.step, 'stopped_early': best.stopped_early,
      'origin': origin, 'labelled_images': len(train_source),
      'labelled_cases': len(train_cases),
      'validation': best.record['validation'],
      'test': test,
  }
  checkpointer.close()  # the last checkpoint is committed before the run reads as finished
  workdir_lib.write_json(results_path, results)
  writer.close()
  return results
