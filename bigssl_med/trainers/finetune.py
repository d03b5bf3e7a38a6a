"""Supervised training of a classifier: `finetune`, `linear_eval` and `distill`.

One linear function, in the order of `pretrain.py`: config, mesh, the labelled
input (a case-level label fraction of the training split), model and optimiser,
starting point (resume > init_from > scratch), the jitted step, and the loop.
Every `eval_every_steps` the model is evaluated on `data.eval_split` (or, with
`data.holdout`, on a fixed fraction of the training cases set aside); the best
evaluation by the task's primary metric is kept (`WORKDIR/best/`, `best.json`),
and with `early_stopping_patience` the run stops after that many evaluations
without improvement. At the end the best model is evaluated once on
`data.test_split` (with `data.test_ten_crop`, by ten-crop test-time
augmentation; every evaluation view as `data.eval_resize` says), and, with
`shift.dataset`, on another data set through a label mapping
(`bigssl_med.label_mapping`); `results.json` and `test_predictions.npz` hold what
`python -m bigssl_med.report` reads. With `data.views` ('frontal' or 'lateral') every
split is read with only the chest X-rays of that view (`bigssl_med.data.views`); with
`task.eval_unit` ('study' or 'case') the validation, test and shift metrics count each
study or case once, its images' probabilities combined by `task.eval_reduce`
(`bigssl_med.eval_units`).

The three trainers differ in what they train and on what:

* `finetune`: every layer, from `init_from` (the encoder and the first
  `head_layers_kept` projection-head layers) or from random weights.
* `linear_eval`: a linear classifier on the frozen encoder (`Classifier` with
  `freeze_encoder`; only `classifier` is updated).
* `distill`: SimCLRv2's third step. The `teacher` (a finished `finetune` or
  `linear_eval` workdir, its best model) labels the whole training split without
  using its labels; the student (`config.model`, same size or smaller, from
  `init_from` or random weights) learns `CE(softmax(teacher/τ), softmax(student/τ))`.

Tasks come from the data set's label feature: a class label (multi-class:
softmax cross-entropy; top-1, top-3, balanced accuracy, AUCs) or a float vector
(multi-label: sigmoid cross-entropy with an uncertainty policy; per-label and
mean AUC). A second run on a finished workdir returns its results.
"""

import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import scipy.special

from bigssl_med import augment
from bigssl_med import build_data
from bigssl_med import checkpointing
from bigssl_med import config_schema
from bigssl_med import eval_units
from bigssl_med import label_mapping
from bigssl_med import label_policies
from bigssl_med import metrics as metrics_lib
from bigssl_med import model_selection
from bigssl_med import models
from bigssl_med import optim
from bigssl_med import parallel
from bigssl_med import supervised
from bigssl_med import train_state
from bigssl_med import workdir as workdir_lib
from bigssl_med.data import fractions
from bigssl_med.data import pipeline
from bigssl_med.data import sources
from bigssl_med.data import views as views_lib
from bigssl_med.errors import CheckpointError, ConfigError

_MEAN_OVER = {'chexpert5': metrics_lib.CHEXPERT_COMPETITION}


def task_of(config: ml_collections.ConfigDict, info) -> tuple[str, supervised.Task]:
  """The label feature and the task the data set's features imply."""
  key = config.data.label_key or ('label' if 'label' in info.features else 'labels')
  if key not in info.features:
    raise ConfigError(f'data set {config.dataset!r} has no label feature {key!r} '
                      f'(config.data.label_key); features: {sorted(info.features)}')
  feature = info.features[key]
  if config.task.eval_uncertain not in supervised.EVAL_UNCERTAIN:
    raise ConfigError(f'config.task.eval_uncertain={config.task.eval_uncertain!r} is not one '
                      f'of {", ".join(supervised.EVAL_UNCERTAIN)}')
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


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           names: tuple[str, ...]) -> dict[str, Any]:
  """Multi-class metrics; with two classes also binary ones (the second class positive).

  A two-class task (e.g. normal / pneumonia) adds `auc` and
  `sensitivity_at_specificity_{0.9,0.95}` of the second class's probability.
  """
  found = metrics_lib.multiclass_metrics(logits, labels, class_names=names)
  if len(names) == 2:
    logits = np.asarray(logits, np.float64)
    positive = scipy.special.expit(logits[:, 1] - logits[:, 0])  # softmax of class 1
    found.update(metrics_lib.binary_metrics(positive, np.asarray(labels) == 1))
  return found


def _check_metric_exists(metric: str, evaluate: Callable[..., dict[str, Any]],
                         task: supervised.Task) -> None:
  """Fails before training when `metric` (config.task.primary_metric) is not one of
  the metrics `evaluate` gives, found by evaluating one example of every class."""
  k = task.num_outputs
  if task.kind == 'multiclass':
    example = np.eye(k, dtype=np.float32), np.arange(k)
  else:
    example = np.zeros((2, k), np.float32), np.stack([np.zeros(k), np.ones(k)]).astype(np.float32)
  names = workdir_lib.scalars(evaluate(*example))
  if metric not in names:
    raise ConfigError(f'config.task.primary_metric={metric!r} is not a metric of this '
                      f'{task.kind} task; its metrics are {sorted(names)}')


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


def _check_validation_split(config: ml_collections.ConfigDict) -> float:
  """`config.data.holdout`, checked against `config.data.eval_split` (one of them names
  the validation data)."""
  holdout = fractions.check_holdout(config.data.holdout)
  if holdout and config.data.eval_split:
    raise ConfigError(f'config.data.holdout={holdout:g} takes the validation cases from '
                      f'data.train_split, but data.eval_split is {config.data.eval_split!r}: '
                      "pass --config.data.eval_split='' with it")
  if not holdout and not config.data.eval_split:
    raise ConfigError('config.data.eval_split is empty: name the validation split, or hold '
                      'out training cases with config.data.holdout')
  return holdout


def _warn_missing_classes(labels: np.ndarray, task: supervised.Task, where: str) -> None:
  """Warns when a class has no training example, or (multi-label) a label no positive
  one (a label fraction too small); `labels`: the training images' labels.

  A multi-label entry is positive when the task's training targets make it one: 1, and
  uncertain (-1) under the `ones` and `lsr_ones` policies (`supervised.policy_targets`).
  """
  if task.kind == 'multiclass':
    counts = np.bincount(np.asarray(labels, np.int64).reshape(-1), minlength=task.num_outputs)
    missing = [task.names[i] for i in range(task.num_outputs) if not counts[i]]
    if missing:
      logging.warning('%s: no training example of class(es) %s; the classifier cannot learn '
                      'them (raise config.data.label_fraction)', where, ', '.join(missing))
    return
  labels = np.asarray(labels, np.float32)
  if not len(labels):
    return
  targets, mask = supervised.policy_targets(labels.reshape(len(labels), -1), task, seed=0,
                                            step=0)
  positive = (mask & (targets > 0)).any(axis=0)
  missing = [task.names[i] for i in range(task.num_outputs) if not positive[i]]
  if missing:
    logging.warning('%s: no positive training example of label(s) %s (uncertain labels '
                    "counted as task.uncertain='%s' makes them); the classifier cannot learn "
                    'them (raise config.data.label_fraction)', where, ', '.join(missing),
                    task.uncertain)


def _read(source, records, chunk: int = 512):
  """The records `records` of `source`, in that order, read `chunk` at a time."""
  records = list(records)
  for start in range(0, len(records), chunk):
    keys = records[start:start + chunk]
    if hasattr(source, '__getitems__'):
      yield from source.__getitems__(keys)
    else:
      yield from (source[k] for k in keys)


TRAINER_NAMES = ('finetune', 'linear_eval', 'distill')
CLASSIFIER_INITS = ('zeros', 'normal')


def build_model(config: ml_collections.ConfigDict, num_outputs: int, dtype=jnp.float32):
  """The classifier a run of `config` trains (and `bigssl_med.predict` rebuilds)."""
  if not 0 <= config.head_layers_kept <= config.model.head_layers:
    raise ConfigError(f'config.head_layers_kept={config.head_layers_kept} must be in '
                      f'[0, config.model.head_layers={config.model.head_layers}]')
  if config.classifier_init not in CLASSIFIER_INITS:
    raise ConfigError(f'config.classifier_init={config.classifier_init!r} is not one of '
                      f'{CLASSIFIER_INITS}')
  return models.classifier(config.model, dtype=dtype, num_outputs=num_outputs,
                           head_layers_kept=config.head_layers_kept,
                           freeze_encoder=config.trainer == 'linear_eval',
                           feature_bn=config.get('feature_bn', False),
                           zero_init=config.classifier_init == 'zeros')


def stored_images(info) -> dict[str, int | None]:
  """How the data set stores its images: `max_side` (None: as published), `channels`.

  `bigssl_med.predict` replays both on new image files, so that they reach the model
  as the test images did.
  """
  metadata = info.metadata or {}
  max_side = metadata.get('max_side')
  return {'max_side': int(max_side) if max_side else None,
          'channels': int(info.features['image'].shape[-1] or 3)}


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a finished run in `workdir` was trained with (its config.json).

  Read over its trainer's defaults: a key the file lacks (written by another version)
  takes the value that run had (`config_schema.saved_defaults`), and one the trainer
  no longer has is left out.

  Raises:
    ConfigError: naming the file, when it is missing, not a run's config, or holds a
      value of the wrong type.
  """
  path = os.path.join(workdir, 'config.json')
  found = workdir_lib.read_json(path)
  if not isinstance(found, dict) or not isinstance(found.get('trainer'), str):
    raise ConfigError(f'{path}: missing or not a run config (is {workdir} a workdir of '
                      'main.py?)')
  if found['trainer'] == 'stages':  # a config of configs: the file as it is
    return ml_collections.ConfigDict(found)
  try:
    config = config_schema.saved_defaults(found['trainer'])
  except ConfigError:  # a trainer without a schema ('imported'): the file as it is
    return ml_collections.ConfigDict(found)
  known = dict(config_schema.leaves(config))
  for key, value in config_schema.leaves(found):
    if key not in known:
      continue
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    try:
      node[leaf] = value
    except (TypeError, ValueError):
      raise ConfigError(f'{path}: key {key!r} should be a {type(known[key]).__name__}, got '
                        f'{value!r}') from None
  try:
    config_schema.validate(config)
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from None
  return config


def _trainable_only(tx: optax.GradientTransformation, params, trainable: str):
  """`tx` on the top-level parameters `trainable`; every other parameter stays fixed."""
  labels = {k: jax.tree.map(lambda _, k=k: 'train' if k == trainable else 'fixed', v)
            for k, v in params.items()}
  return optax.multi_transform({'train': tx, 'fixed': optax.set_to_zero()}, labels)


class _Teacher:
  """A finished fine-tuning run's best model, for distillation."""

  def __init__(self, config: ml_collections.ConfigDict, task: supervised.Task, dtype,
               model_sharding):
    if not config.teacher:
      raise ConfigError('config.teacher is empty: distillation needs the workdir of a finished '
                        'finetune or linear_eval run')
    workdir = checkpointing.absolute(config.teacher)
    self.workdir = os.fspath(workdir)  # where it lies, whatever the current directory
    self.config = read_run_config(workdir)
    self.results = workdir_lib.read_json(os.path.join(workdir, 'results.json')) or {}
    if self.config.trainer not in ('finetune', 'linear_eval'):
      raise ConfigError(f'config.teacher={workdir!r} is a run of the '
                        f'{self.config.trainer!r} trainer; a teacher is a finished finetune or '
                        'linear_eval run')
    if not self.results.get('best_step'):
      raise ConfigError(f'config.teacher={workdir!r} is not a finished finetune or linear_eval '
                        'run (no results.json with best_step)')
    teacher_size = self.config.data.get('image_size')
    if teacher_size and teacher_size != config.data.image_size:
      logging.warning('config.teacher=%r was trained on %d-pixel images; here it scores the '
                      'student\'s %d-pixel views (config.data.image_size)', workdir, teacher_size,
                      config.data.image_size)
    teacher_views = self.config.data.get('views', '')
    if teacher_views != config.data.views:
      logging.warning('config.teacher=%r was trained on %s; here it labels %s '
                      '(config.data.views)', workdir, _views_text(teacher_views),
                      _views_text(config.data.views))
    if self.config.dataset != config.dataset:
      raise ConfigError(f'config.teacher={workdir!r} was trained on {self.config.dataset!r}, '
                        f'not config.dataset={config.dataset!r}')
    names = tuple(self.results.get('label_names') or ())
    if names and names != task.names:
      raise ConfigError(f'config.teacher={workdir!r} predicts {list(names)}, the data set has '
                        f'{list(task.names)}')
    self.model = build_model(self.config, task.num_outputs, dtype)
    size = config.data.image_size
    abstract = jax.eval_shape(
        lambda: self.model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, jax.tree.map(lambda _: model_sharding, abstract))
    best = os.path.join(workdir, 'best')
    try:
      with checkpointing.quiet_failed_reads():
        self.variables = ocp.StandardCheckpointer().restore(best, abstract)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises bare Exceptions too)
      raise CheckpointError(f'{best}: cannot restore the teacher\'s model as its config.json '
                            f'describes it ({checkpointing.first_line(e)})') from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) `config.trainer` in `workdir`; returns validation and test metrics."""
  config_schema.validate(config)
  if config.trainer not in TRAINER_NAMES:
    raise ConfigError(f'config.trainer={config.trainer!r} is not one of {TRAINER_NAMES}')
  pipeline.check_eval_resize(config.data.eval_resize)
  distill = config.trainer == 'distill'
  if config.trainer == 'linear_eval' and not config.init_from:
    logging.warning('config.trainer=\'linear_eval\' with no config.init_from: the classifier '
                    'is trained on a frozen, randomly initialised encoder (a random-features '
                    'baseline); set init_from to evaluate a pretrained one')
  workdir_lib.start(workdir, config)
  results_path = os.path.join(workdir, 'results.json')
  previous = workdir_lib.finished_results(workdir, config)
  if previous is not None:
    return previous
  dtype = train_state.compute_dtype(config)

  # ---------------------------------------------------------------- Mesh.
  mesh = parallel.data_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  host, hosts = jax.process_index(), jax.process_count()
  repl = parallel.replicated(mesh)

  # ---------------------------------------------------------------- Input.
  data_dir = build_data.ensure_built(config.dataset, data_dir=config.data.data_dir,
                                     manual_dir=config.data.manual_dir,
                                     build_if_missing=config.data.build_if_missing)
  info = sources.dataset_info(config.dataset, data_dir)
  label_key, task = task_of(config, info)
  averaged = mean_over(config, task) if task.kind == 'multilabel' else ()
  headline = 'top1' if task.kind == 'multiclass' else 'auc_mean'
  primary = config.task.primary_metric or headline  # the metric that selects the model
  if not metrics_lib.lower_is_better(primary):
    headline = primary  # ... and the one results lead with, unless it is a loss
  elif task.kind == 'multiclass' and task.num_outputs == 2:
    headline = 'auc'  # a two-class task selected on a loss: its threshold-free score

  def evaluate(logits: np.ndarray, labels: np.ndarray, loss_targets=None) -> dict[str, Any]:
    """Metrics of `logits`; `loss_targets`: `(targets, mask)` of the loss (multi-label),
    when not those of the AUCs."""
    if task.kind == 'multiclass':
      return {**classification_metrics(logits, labels, task.names),
              'loss': metrics_lib.softmax_cross_entropy(logits, labels)}
    targets, mask = supervised.eval_targets(labels, task.blank)
    loss_targets, loss_mask = (targets, mask) if loss_targets is None else loss_targets
    return {**metrics_lib.multilabel_metrics(logits, targets, mask=mask,
                                             label_names=task.names, mean_over=averaged),
            'loss': metrics_lib.sigmoid_cross_entropy(logits, loss_targets, loss_mask)}

  _check_metric_exists(primary, evaluate, task)
  views, unit = config.data.views, config.task.eval_unit
  views_lib.view_feature(views, info.features, config.dataset)
  eval_units.unit_features(unit, info.features, config.dataset)
  reduce = eval_units.check_reduce(config.task.eval_reduce,
                                   task.kind if unit != 'image' else 'multilabel')
  teacher = _Teacher(config, task, dtype, repl) if distill else None
  # The shifted data set is checked before training, so that a bad mapping fails fast.
  shift = _ShiftedData(config, task) if config.shift.dataset else None
  # The student of a distillation learns from every training image, without labels.
  fraction = 1.0 if distill else config.data.label_fraction
  fraction_seed = 0 if distill else config.data.fraction_seed
  train_name = f'{config.dataset}/{config.data.train_split}'
  holdout = _check_validation_split(config)
  train_source, train_cases = fractions.open_fraction(
      config.dataset, config.data.train_split, data_dir, fraction, fraction_seed, holdout, views)
  if holdout:
    eval_name = f'{train_name} (held-out {holdout:g} of its cases)'
    eval_split = config.data.train_split
    eval_source = fractions.open_holdout(config.dataset, eval_split, data_dir, holdout, views)
    logging.info('Validation: %d images of %s', len(eval_source), eval_name)
  else:
    eval_split = config.data.eval_split
    eval_name = f'{config.dataset}/{eval_split}'
    eval_source = views_lib.open_split(config.dataset, eval_split, data_dir, views)
  test_split, test_source = config.data.test_split, None
  if test_split and test_split in info.splits:
    test_source = views_lib.open_split(config.dataset, test_split, data_dir, views)
  elif test_split:
    logging.warning('%s has no split %r: no test evaluation (splits: %s)', config.dataset,
                    test_split, ', '.join(sorted(info.splits)))
  if fraction < 1.0:
    _warn_missing_classes(
        eval_units.source_labels(train_source, config.dataset, config.data.train_split,
                                 data_dir, label_key), task, train_name)
  label_shape = () if task.kind == 'multiclass' else (task.num_outputs,)
  spec = pipeline.ViewSpec(config.data.image_size, config.data.crop_area_min, label_key,
                           label_shape, eval_resize=config.data.eval_resize)
  steps_per_epoch, total_steps, warmup_steps = optim.run_length(
      config, len(train_source), f'labelled images of {train_name} (label_fraction {fraction:g})')
  eval_every, plateau = model_selection.selection_settings(config, steps_per_epoch,
                                                          total_steps)
  model_selection.warn_costly_validation(config, eval_every, total_steps, len(eval_source),
                                         eval_name)
  logging.info('%s: %d %s images (fraction %g), %s with %d outputs, %d steps', train_name,
               len(train_source), 'unlabelled' if distill else 'labelled', fraction,
               task.kind, task.num_outputs, total_steps)

  split_units = {}  # (data set, split, data dir, unit) -> the unit of each of its records

  def units_of(source, dataset: str, split: str, data_dir: str, unit: str,
               records=None) -> np.ndarray:
    """The unit of each of `source`'s records `records` (all by default)."""
    key = (dataset, split, data_dir, unit)
    if key not in split_units:
      split_units[key] = eval_units.split_unit_keys(dataset, split, data_dir, unit)
    positions = np.arange(len(source)) if records is None else records
    return split_units[key][eval_units.split_indices(source, positions)]

  # Metrics per unit need one label per unit: checked on every split they will be taken
  # on before training, not at the first evaluation.
  evaluated = [(eval_source, config.dataset, eval_split, data_dir, label_key, eval_name, unit)]
  if test_source is not None:
    evaluated.append((test_source, config.dataset, test_split, data_dir, label_key,
                      f'{config.dataset}/{test_split}', unit))
  if shift is not None:
    evaluated.append((shift.source, shift.dataset, shift.split, shift.data_dir,
                      shift.label_key, f'{shift.dataset}/{shift.split}', shift.unit))
  for source, dataset, split, where_dir, key, where, by in evaluated:
    if by != 'image':
      labels = eval_units.source_labels(source, dataset, split, where_dir, key)
      eval_units.check_labels(labels, units_of(source, dataset, split, where_dir, by), where)

  # ---------------------------------------------------------------- Model and optimiser.
  model = build_model(config, task.num_outputs, dtype)
  schedule = optim.schedule_for(
      config.optimizer,
      optim.peak_learning_rate(config.optimizer.learning_rate, config.optimizer.lr_scaling,
                               config.batch_size), total_steps, warmup_steps)

  def make_tx(params):
    tx = optim.build_optimizer(config.optimizer, schedule, params)
    return _trainable_only(tx, params, 'classifier') if config.trainer == 'linear_eval' else tx

  run = train_state.start(
      model, config=config, workdir=workdir, mesh=mesh, make_tx=make_tx,
      init_keys=('encoder', 'head') if config.head_layers_kept else ('encoder',),
      partial_keys=('head',), data=train_state.data_fingerprint(config, data_dir),
      total_steps=total_steps)
  variables, opt, data_state, origin = run.variables, run.opt, run.data_state, run.origin
  checkpointer, model_shardings = run.checkpointer, run.shardings['model']
  logging.info('Start at step %d: %s', int(opt['step']), origin)

  # ---------------------------------------------------------------- Steps.
  batch_sharding = parallel.batch_sharding(mesh)
  # Under LARS the classifier is left out of the weight decay and the trust ratio and
  # regularised in the loss instead (`optim.lars_heads`), as SimCLR fine-tunes.
  l2 = dict(l2_heads=tuple(set(optim.lars_heads(config.optimizer)) - {optim.PROBE}),
            weight_decay=config.optimizer.weight_decay)
  if distill:
    step_fn = jax.jit(
        supervised.make_distill_step(model, teacher.model, run.tx, schedule, task,
                                     config.distill_temperature, **l2),
        in_shardings=(run.shardings, repl, batch_sharding, repl, repl),  # teacher: replicated
        out_shardings=(run.shardings, repl), donate_argnums=0)

    def train_step(state, batch, key, lr_scale):
      return step_fn(state, teacher.variables, batch, key, lr_scale)
  else:
    augment_config = config.get('augment')
    augment_images = (None if augment_config is None or augment.is_identity(augment_config)
                      else augment.from_config(augment_config))
    train_step = jax.jit(supervised.make_train_step(model, run.tx, schedule, task,
                                                    augment_images=augment_images, **l2),
                         in_shardings=(run.shardings, batch_sharding, repl, repl),
                         out_shardings=(run.shardings, repl), donate_argnums=0)
  eval_steps = {}
  to_device = functools.partial(parallel.to_global, mesh=mesh)

  def predict(variables, source, name: str, split_spec, *,
              ten_crop: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels and record indices of every record of `source` (called `name`),
    padding left out: one row per record, each row's index in `source` beside it."""
    if ten_crop not in eval_steps:
      eval_steps[ten_crop] = jax.jit(
          supervised.make_eval_step(model, task, config.data.image_size if ten_crop else 0),
          in_shardings=(model_shardings, batch_sharding), out_shardings=batch_sharding)
    images = pipeline.eval_image_dataset(
        source, split_spec, global_batch=config.batch_size, host_index=host, host_count=hosts,
        num_workers=config.data.num_workers, name=name, ten_crop=ten_crop)
    logits, labels, masks, records = [], [], [], []
    for batch, _ in pipeline.device_prefetch(iter(images), to_device):
      logits.append(parallel.to_host(eval_steps[ten_crop](variables, batch)))
      labels.append(parallel.to_host(batch['label']))
      masks.append(parallel.to_host(batch['mask']))
      records.append(parallel.to_host(batch['record']))
    keep = np.concatenate(masks) > 0
    return (np.concatenate(logits)[keep], np.concatenate(labels)[keep],
            np.concatenate(records)[keep])

  def per_unit(predicted, source, dataset: str, split: str, where: str, data_dir=data_dir,
               unit=unit):
    """`predict`'s `(logits, labels, records)`, one row per unit of `task.eval_unit`
    (`eval_units.combine`; records are then the units' names)."""
    if unit == 'image':
      return predicted
    logits, labels, records = predicted
    keys = units_of(source, dataset, split, data_dir, unit, records)
    return eval_units.combine(logits, labels, keys, kind=task.kind, reduce=reduce, where=where)

  def validate(variables, step: int) -> dict[str, Any]:
    """Validation metrics; with task.eval_uncertain='train_policy' the loss counts the
    uncertain labels as training does (`supervised.policy_targets`), the AUCs do not."""
    logits, labels, _ = per_unit(predict(variables, eval_source, eval_name, spec), eval_source,
                                 config.dataset, eval_split, eval_name)
    loss_targets = None
    if task.kind == 'multilabel' and config.task.eval_uncertain == 'train_policy':
      loss_targets = supervised.policy_targets(labels, task, seed=config.seed, step=step)
    return evaluate(logits, labels, loss_targets)

  # ---------------------------------------------------------------- Loop, with model selection.
  writer, best = model_selection.start_logs(
      workdir, config, metric=primary, plateau=plateau, total_steps=total_steps,
      resume_step=int(opt['step']), resumed=origin.startswith('resumed'))

  train_data = functools.partial(
      pipeline.image_dataset, train_source, spec, global_batch=config.batch_size, host_index=host,
      host_count=hosts, seed=config.seed, num_workers=config.data.num_workers, name=train_name)
  _, step = model_selection.train_loop(
      config=config, state={'model': variables, 'opt': opt}, data_state=data_state,
      train_data=train_data, train_step=train_step, to_device=to_device,
      total_steps=total_steps, checkpointer=checkpointer, writer=writer, best=best,
      evaluate=validate, eval_every=eval_every)

  # ---------------------------------------------------------------- Test, once.
  best_variables = best.restore(run.abstract_model)
  ten_crop = config.data.test_ten_crop
  test: dict[str, Any] = {}
  if test_source is not None:
    test_name = f'{config.dataset}/{test_split}'
    logits, labels, records = per_unit(
        predict(best_variables, test_source, test_name, spec, ten_crop=ten_crop), test_source,
        config.dataset, test_split, test_name)
    test = evaluate(logits, labels)
    # Logged as 'test' whatever the split is called (CheXpert tests on 'validation').
    writer.write(best.step, 'test', workdir_lib.scalars(test))
    if jax.process_index() == 0:
      ids = ({'unit_id': records} if unit != 'image' else
             _record_ids(test_source, records, info.features))
      _save_predictions(os.path.join(workdir, 'test_predictions.npz'), logits, labels, task,
                        ids=ids)
  shifted = None
  if shift is not None:
    shift_name = f'{shift.dataset}/{shift.split}'
    logits, labels, _ = per_unit(
        predict(best_variables, shift.source, shift_name, shift.spec(config), ten_crop=ten_crop),
        shift.source, shift.dataset, shift.split, shift_name, data_dir=shift.data_dir,
        unit=shift.unit)
    shifted = shift.evaluate(logits, labels)
    writer.write(best.step, f'shift/{shift.dataset}/{shift.split}',
                 workdir_lib.scalars(shifted['metrics']))
  if distill:
    teacher_fraction = teacher.results.get('label_fraction', teacher.config.data.label_fraction)
    init = config.init or f'distilled from {teacher.results.get("init", "?")}'
  else:
    teacher_fraction = None
    init = config.init or (checkpointing.init_name(config.init_from)
                           if config.init_from else 'scratch')
  results = {
      'trainer': config.trainer, 'dataset': config.dataset, 'init': init,
      'init_from': config.init_from, 'initialised_from': run.initialised_from,
      'pretrain_seed': checkpointing.recorded_pretrain_seed(run.initialised_from,
                                                            config.init_from),
      'label_fraction': float(teacher_fraction if distill else fraction),
      'seed': int(config.seed),
      'fraction_seed': int(teacher.results.get('fraction_seed', 0) if distill else fraction_seed),
      'primary_metric': headline, 'selected_on': primary, 'task': task.kind,
      'label_names': list(task.names),
      'step': step, 'total_steps': total_steps, 'best_step': best.step,
      'stopped_early': best.stopped_early, 'origin': origin,
      'labelled_images': 0 if distill else len(train_source),
      'labelled_cases': 0 if distill else len(train_cases), 'ten_crop': bool(ten_crop),
      'views': views or 'all', 'eval_unit': unit,
      'eval_reduce': reduce if unit != 'image' else None,
      'stored_images': stored_images(info),
      'validation_split': eval_name, 'validation': best.record['validation'],
      'test_split': f'{config.dataset}/{test_split}' if test else None, 'test': test,
  }
  if distill:
    results['teacher'] = {'workdir': teacher.workdir, 'init': teacher.results.get('init'),
                          'test': teacher.results.get('test'),
                          'model': teacher.config.model.to_dict()}
  if shifted is not None:
    results['shift'] = shifted
  checkpointer.close()  # the last checkpoint is committed before the run reads as finished
  workdir_lib.write_json(results_path, results)
  writer.close()
  logging.info('%s', _summary(results, primary))
  return results


def _summary(results: dict[str, Any], selected_on: str) -> str:
  """One line of a finished run: the selected model's validation and test metric."""
  validation = workdir_lib.scalars(results['validation']).get(selected_on, float('nan'))
  line = (f"Done at step {results['step']}: best validation {selected_on} {validation:.6g} "
          f"(step {results['best_step']}); ")
  headline = results['primary_metric']
  test = workdir_lib.scalars(results['test']).get(headline) if results['test'] else None
  if test is None:
    return line + 'no test evaluation'
  return line + f"test {headline} {test:.6g} on {results['test_split']}"


def _views_text(views: str) -> str:
  return f'{views} images only' if views else 'images of every view'


class _ShiftedData:
  """Another data set, its split, and the mapping of the model's labels onto its labels."""

  def __init__(self, config: ml_collections.ConfigDict, task: supervised.Task):
    c = config.shift
    self.dataset, self.split = c.dataset, c.split
    self.data_dir = build_data.ensure_built(
        c.dataset, data_dir=c.data_dir or config.data.data_dir, manual_dir=c.manual_dir,
        build_if_missing=config.data.build_if_missing, manual_dir_key='config.shift.manual_dir')
    info = sources.dataset_info(c.dataset, self.data_dir)
    if c.split not in info.splits:
      raise ConfigError(f'config.shift.split={c.split!r}: {c.dataset!r} has splits '
                        f'{sorted(info.splits)}')
    self.label_key = 'label' if 'label' in info.features else 'labels'
    if self.label_key not in info.features:
      raise ConfigError(f'config.shift.dataset={c.dataset!r} has no label or labels feature')
    feature = info.features[self.label_key]
    multi_label = not hasattr(feature, 'num_classes')
    if multi_label != (task.kind == 'multilabel'):
      raise ConfigError(f'config.shift.dataset={c.dataset!r} is '
                        f'{"multi-label" if multi_label else "multi-class"}; the model is '
                        f'{task.kind}: no mapping between them')
    if multi_label:
      self.num_labels = tuple(feature.shape)[0]
      names = tuple((info.metadata or {}).get('label_names') or
                    (str(i) for i in range(self.num_labels)))
    else:
      names = tuple(feature.names)
    where = f'{c.dataset} (config.shift.dataset)'
    views_lib.view_feature(config.data.views, info.features, where)
    self.source = views_lib.open_split(c.dataset, c.split, self.data_dir, config.data.views)
    self.unit = config.task.eval_unit  # checked on the trained data set already
    if not eval_units.has_unit(self.unit, info.features):
      logging.warning('config.task.eval_unit=%r: %s has no such unit; it is evaluated per '
                      'image (results.json shift.eval_unit)', self.unit, where)
      self.unit = 'image'
    self.task = task
    self.label_map = label_mapping.resolve(c.label_map, task.names, names,
                                           multi_label=multi_label, target=repr(c.dataset))

  def spec(self, config: ml_collections.ConfigDict) -> pipeline.ViewSpec:
    shape = (self.num_labels,) if self.task.kind == 'multilabel' else ()
    return pipeline.ViewSpec(config.data.image_size, config.data.crop_area_min,
                             self.label_key, shape, eval_resize=config.data.eval_resize)

  def evaluate(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Metrics on the shifted data and what was mapped; `label_names`: the shifted data
    set's labels (classes) the mapping reaches, in its order, which the metrics are over."""
    out = {'dataset': self.dataset, 'split': self.split, 'label_map': self.label_map.as_dict(),
           'eval_unit': self.unit, 'images' if self.unit == 'image' else 'units': int(len(labels))}
    if self.task.kind == 'multiclass':
      log_probs, mapped, names, left_out = label_mapping.map_multiclass(
          logits, labels, self.label_map)
      if len(mapped) == 0:
        raise ConfigError(f'no image of {self.dataset}/{self.split} has a class of '
                          f'config.shift.label_map ({self.label_map.as_dict()})')
      out.update(images_left_out=left_out,
                 metrics=classification_metrics(log_probs, mapped, names))
    else:
      targets, mask = supervised.eval_targets(labels, self.task.blank)
      logits, targets, mask, names = label_mapping.map_multilabel(logits, targets, mask,
                                                                  self.label_map)
      out['metrics'] = metrics_lib.multilabel_metrics(logits, targets, mask=mask,
                                                      label_names=names)
    out['label_names'] = list(names)  # what the metrics are over: the mapped labels only
    return out


# The records' features `test_predictions.npz` holds beside each row's scores.
ID_FEATURES = ('image_id', 'case_id')


def _record_ids(source, records: np.ndarray, features) -> dict[str, np.ndarray]:
  """`{feature: str array}` of the `ID_FEATURES` the data set has, for `source`'s records
  `records` in that order."""
  keys = [key for key in ID_FEATURES if key in features]
  ids = {key: [] for key in keys}
  if keys:
    for record in _read(source, [int(r) for r in records]):
      for key in keys:
        ids[key].append(pipeline.as_text(record[key]))
  return {key: np.asarray(values, dtype=str) for key, values in ids.items()}


def _save_predictions(path: str, logits: np.ndarray, labels: np.ndarray,
                      task: supervised.Task, ids: dict[str, np.ndarray] | None = None) -> None:
  """Test-set probabilities and labels for reports (ROC curves); `ids` (`_record_ids`):
  each row's `image_id` and `case_id`, where the data set has them."""
  ids = ids or {}
  # In float64, as the metrics are taken: probabilities of distinct float32 logits can
  # round to one float32 value, and a tie there changes an AUC computed from the file.
  logits = np.asarray(logits, np.float64)
  for key, values in ids.items():
    if len(values) != len(logits):
      raise ValueError(f'{len(values)} {key} values for {len(logits)} rows of predictions')
  # `log_scores` keep the order of probabilities that round to 1 (what the AUCs rank).
  if task.kind == 'multiclass':
    log_scores = metrics_lib.log_softmax(logits)
    np.savez(path, scores=np.exp(log_scores), log_scores=log_scores,
             labels=labels.astype(np.int64), class_names=np.asarray(task.names), **ids)
  else:
    targets, mask = supervised.eval_targets(labels, task.blank)
    log_scores = -np.logaddexp(0.0, -logits)  # log sigmoid
    np.savez(path, scores=np.exp(log_scores), log_scores=log_scores, labels=targets,
             mask=mask, class_names=np.asarray(task.names), **ids)
