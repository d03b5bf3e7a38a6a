"""What each trainer accepts: its complete default config, and the check against it.

Config files in `configs/` start from `defaults(trainer)` and change values; the
trainer then checks with `validate` that the config holds no key it does not use,
and fails naming the key. (ml_collections' locked configs already reject an unknown
`--config.key=value` on the command line.) Every trainer understands the common
keys: trainer, dataset, batch_size, total_steps / num_epochs, seed, init_from,
log_every_steps, checkpoint_every_steps.

This module imports nothing heavy, so configs load fast.
"""

import logging
import os
from typing import Any, Mapping

import ml_collections

from bigssl_med.data import splits
from bigssl_med.errors import ConfigError


def _common(trainer: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = trainer
  c.dataset = 'ham10000'
  c.batch_size = 256              # global, over all devices and hosts
  c.total_steps = 0               # the run's length: total_steps or num_epochs (one > 0)
  c.num_epochs = 100.0
  c.seed = 0
  c.init_from = ''                # workdir, checkpoints/ folder or step folder to start from
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3          # keep the last N checkpoints ...
  c.keep_checkpoint_every_steps = 0  # ... and every K-th step for good (0: none)
  c.eval_every_steps = 0          # 0: evaluate once, at the end
  c.compute_dtype = 'bfloat16'    # activations; parameters stay float32
  c.tensorboard = True
  return c


def _data() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.data_dir = ''                 # TFDS data dir ('' = TFDS default, ~/tensorflow_datasets)
  d.manual_dir = ''               # raw files to build the data set from when it is not built yet
  d.build_if_missing = True       # build from manual_dir (or download) when absent
  d.train_split = 'train'         # a split, slice or sum ('train+unlabeled', 'train[:10%]')
  d.eval_split = 'validation'
  d.image_size = 224
  d.crop_area_min = 0.08          # random resized crop: area in [crop_area_min, 1]
  d.num_workers = 8               # host decode processes per host (0: in the main process)
  d.prefetch_batches = 2          # batches placed on the devices ahead of the step
  d.label_key = 'label'           # class label for the linear probe ('' for none)
  return d


def _augment() -> ml_collections.ConfigDict:
  a = ml_collections.ConfigDict()
  a.color_strength = 1.0          # SimCLR's colour jitter strength s
  a.jitter_p = 0.8
  a.grayscale_p = 0.2
  a.blur_p = 0.5
  a.hue = True                    # switch off hue / saturation jitter for grayscale X-rays
  a.saturation = True
  a.impl = 'simclrv2'             # multiplicative brightness ('simclrv1': additive)
  a.rotation_deg = 0.0            # random rotation in [-r, r] degrees, first (0: off)
  return a


def _model() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.depth = 50
  m.width_multiplier = 1.0
  m.sk_ratio = 0.0
  m.cifar_stem = False
  m.fused_bn = False              # BatchNorm with a hand-written gradient (models.batch_norm)
  m.stem_pool_padding = 'same'    # 'symmetric' for models imported from torchvision's layout
  m.identity_shortcuts = False    # True: torchvision's shortcuts (ResNet-18/34 imports)
  m.input_normalization = 'none'  # 'imagenet': (x - mean) / std, as torchvision-layout models
  m.conv_padding = 'fixed'        # 'same': TF SAME padding of strided convs (BYOL imports)
  m.head_layers = 3
  m.head_hidden_dim = 0           # 0: the encoder's feature width
  m.head_out_dim = 128
  return m


def _optimizer() -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.name = 'lars'
  o.learning_rate = 0.3           # base rate, scaled by lr_scaling
  o.lr_scaling = 'linear'         # 'linear': base * B / 256; 'sqrt': base * sqrt(B)
  o.momentum = 0.9
  o.weight_decay = 1e-6
  o.trust_coefficient = 1e-3
  o.lars_batched_norms = False    # LARS: every layer's norms in one reduction (optim.lars)
  o.warmup_steps = 0              # warm-up in steps or epochs (at most one > 0)
  o.warmup_epochs = 10.0
  return o


def _with_selection(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The keys of trainers that select a model on validation (`model_selection`)."""
  c.eval_every_epochs = 0.0       # > 0: evaluate every this many epochs (eval_every_steps 0)
  c.optimizer.schedule = 'cosine'  # or 'plateau': constant, x plateau_factor when the
  c.optimizer.plateau_factor = 0.5  # validation metric has not improved for more than
  c.optimizer.plateau_patience = 5  # plateau_patience evaluations (ReduceLROnPlateau)
  c.optimizer.plateau_threshold = 1e-4  # an improvement: by more than this, relative
  return c


def pretrain() -> ml_collections.ConfigDict:
  """SimCLR / MICLe pretraining (`trainer='pretrain'`)."""
  c = _common('pretrain')
  c.data = _data()
  c.data.views = ''               # chest X-rays: 'frontal' or 'lateral' images only ('' : all;
  #                                 bigssl_med.data.views)
  c.augment = _augment()
  c.model = _model()
  c.optimizer = _optimizer()
  c.micle = False                 # positives from two different images of one case
  c.temperature = 0.1
  c.probe = True                  # SimCLR's linear probe on frozen features (needs data.label_key)
  c.init_head = True              # with init_from: load the projection head too
  c.eval_batches = 0              # evaluation batches (0: one pass over data.eval_split)
  c.eval_batch_size = 0           # contrastive evaluation batch (0: batch_size); its rows'
  #                                 negatives, so a metric compares only at one size
  return c


def finetune() -> ml_collections.ConfigDict:
  """Supervised fine-tuning of every layer (`trainer='finetune'`).

  From `init_from` (a pretraining workdir or checkpoint: the encoder and the first
  `head_layers_kept` projection-head layers), or from random weights when
  `init_from` is '' (the scratch baseline).
  """
  c = _common('finetune')
  c.init = ''                     # the initialisation's name in reports ('' : from init_from)
  c.data = _data()
  c.data.label_key = ''           # '' : `label` if the data set has it, else `labels`
  c.data.test_split = 'test'      # evaluated once, with the best validation checkpoint
  c.data.test_ten_crop = False    # test (and shift) by ten-crop test-time augmentation
  c.data.eval_resize = 'square'   # evaluation views: 'square' (SimCLR's central square of
  #                                 the shorter side) or 'squash' (the whole image resized to
  #                                 a square, bilinear, as the transfer-learning benchmark)
  c.data.label_fraction = 1.0     # fraction of training cases with labels, in (0, 1]
  c.data.fraction_seed = 0        # which cases; nested over fractions for one seed
  c.data.holdout = 0.0            # > 0: validate on this fraction of the training cases
  #                                 (fixed by case hash) instead of data.eval_split ('')
  c.data.views = ''               # chest X-rays: 'frontal' or 'lateral' images only, in
  #                                 every split ('' : all images; bigssl_med.data.views)
  c.augment = _augment()          # on-device augmentation of the training crops: off by
  c.augment.jitter_p = 0.0        # default (crops and flips only, SimCLRv2's fine-tuning);
  c.augment.grayscale_p = 0.0     # finetune_derm / finetune_chexpert turn it on
  c.augment.blur_p = 0.0
  c.model = _model()
  c.head_layers_kept = 1          # projection-head layers kept from init_from (SimCLRv2: 1)
  c.classifier_init = 'zeros'     # the linear classifier's start: 'zeros' (SimCLR's
  #                                 zero_init_logits_layer) or 'normal' (kernel ~ N(0, 0.01))
  c.optimizer = _optimizer()
  c.optimizer.name = 'momentum'
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_epochs = 0.0
  c.task = ml_collections.ConfigDict()
  c.task.uncertain = 'ones'       # multi-label -1 labels: ignore | zeros | ones | lsr_ones
  c.task.blank = 'zeros'          # multi-label blank (NaN) labels: zeros | ignore
  c.task.eval_uncertain = 'ignore'  # -1 labels in the validation loss: ignore | train_policy
  #                                 (task.uncertain's targets); AUCs and test always ignore
  c.task.mean_over = ''           # multi-label mean AUC over these names ('a,b'; '' all,
  #                                 'chexpert5': CheXpert's 5 competition pathologies)
  c.task.primary_metric = ''      # '' : top1 (multi-class) or auc_mean (multi-label)
  c.task.eval_unit = 'image'      # what validation and test metrics count: 'image', 'study'
  #                                 (CheXpert, MIMIC-CXR) or 'case' (bigssl_med.eval_units)
  c.task.eval_reduce = ''         # a study's or case's probabilities: 'max' (multi-label) or
  #                                 'mean' of its images' ('' : max multi-label, mean multi-class)
  c.early_stopping_patience = 0   # evaluations without improvement before stopping (0: off)
  c.num_epochs = 30.0
  c.eval_every_steps = 100
  c.shift = ml_collections.ConfigDict()  # distribution shift: the best model on another data set
  c.shift.dataset = ''            # e.g. 'nih_chest_xray14' ('' : none)
  c.shift.split = 'test'
  c.shift.label_map = ''          # 'MODEL_LABEL=DATASET_LABEL,...' ('' : the shared names)
  c.shift.data_dir = ''           # '' : config.data.data_dir
  c.shift.manual_dir = ''
  return _with_selection(c)


def linear_eval() -> ml_collections.ConfigDict:
  """A linear classifier on the frozen encoder (`trainer='linear_eval'`).

  The encoder (and the first `head_layers_kept` head layers) of `init_from` run in
  inference mode; only the classifier is trained, on random crops and flips,
  with Nesterov momentum at 0.1 x B / 256 for 90 epochs (SimCLR's protocol).
  """
  c = finetune()
  c.trainer = 'linear_eval'
  del c.augment                   # SimCLR's linear evaluation: crops and flips
  c.head_layers_kept = 0          # SimCLR evaluates the encoder's output
  c.feature_bn = False            # True: standardise the frozen features by a BatchNorm
  #                                 without scale or offset before the classifier
  c.num_epochs = 90.0
  return c


def distill() -> ml_collections.ConfigDict:
  """Self-distillation from a fine-tuned teacher (`trainer='distill'`, SimCLRv2's third step).

  The student (`model`, from `init_from` or random weights) learns from the
  teacher's softened predictions on every training image; no labels are used.
  """
  c = finetune()
  c.trainer = 'distill'
  del c.augment                   # SimCLRv2's distillation: crops and flips
  c.teacher = ''                  # workdir of a finished finetune or linear_eval run
  c.distill_temperature = 1.0     # τ of CE(softmax(teacher/τ), softmax(student/τ))
  del c.data.label_fraction       # the student sees every training image, without labels
  del c.data.fraction_seed
  c.head_layers_kept = 0
  return c


def segment() -> ml_collections.ConfigDict:
  """Binary segmentation with a U-Net on the ResNet encoder (`trainer='segment'`).

  segmentation_models' U-Net (`decoder_channels`) on `config.model`'s encoder, from
  `init_from` (a pretraining workdir or checkpoint: the encoder) or from random
  weights; loss `bce_weight * BCE + dice_weight * soft Dice`; the validation Dice
  selects the model. Adam (`adamw` without weight decay) with a cosine schedule, as
  the transfer-learning benchmark trains its segmentation models (its code: the Dice
  loss alone for most tasks, `bce_weight=0`, and the lowest validation loss selects).
  """
  c = _common('segment')
  c.init = ''                     # the initialisation's name in reports ('' : from init_from)
  c.batch_size = 32
  c.num_epochs = 50.0
  c.eval_every_steps = 200
  c.data = _data()
  del c.data.label_key
  c.data.mask_key = 'mask'        # the data set's mask feature (0 background, 255 foreground)
  c.data.crop_area_min = 0.25     # training crops: the same box for the image and its mask
  c.data.test_split = 'test'      # evaluated once, with the best validation checkpoint
  c.data.label_fraction = 1.0     # fraction of training cases with masks, in (0, 1]
  c.data.fraction_seed = 0        # which cases; nested over fractions for one seed
  c.model = _model()
  del c.model.head_layers         # the U-Net reads the encoder's maps, not the head
  del c.model.head_hidden_dim
  del c.model.head_out_dim
  c.decoder_channels = (256, 128, 64, 32, 16)  # the five decoder blocks, deepest first
  c.loss = ml_collections.ConfigDict()
  c.loss.bce_weight = 1.0
  c.loss.dice_weight = 1.0
  c.loss.dice_smooth = 1.0        # s in 1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s)
  c.loss.dice_per_image = False   # sums over the batch (the benchmark's) or over each image
  c.optimizer = _optimizer()
  c.optimizer.name = 'adamw'      # with weight_decay 0: Adam
  c.optimizer.learning_rate = 1.6e-3  # x B / 256: a peak of 2e-4 at batch 32
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_epochs = 0.0
  c.early_stopping_patience = 0   # evaluations without improvement before stopping (0: off)
  return _with_selection(c)


# Encoders by short name: depth, width multiplier, selective-kernel ratio.
MODEL_VARIANTS = {
    'r18': (18, 1.0, 0.0), 'r50': (50, 1.0, 0.0), 'r50x2': (50, 2.0, 0.0),
    'r50x4': (50, 4.0, 0.0), 'r101': (101, 1.0, 0.0), 'r101x2': (101, 2.0, 0.0),
    'r152x2': (152, 2.0, 0.0), 'r50sk': (50, 1.0, 0.0625), 'r152x3sk': (152, 3.0, 0.0625),
}


def set_model_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  """Sets config.model's depth, width and SK ratio from a name such as 'r152x3sk'."""
  if variant not in MODEL_VARIANTS:
    raise ConfigError(f'model variant {variant!r} is not one of {sorted(MODEL_VARIANTS)}')
  config.model.depth, config.model.width_multiplier, config.model.sk_ratio = (
      MODEL_VARIANTS[variant])


def stages() -> ml_collections.ConfigDict:
  """Several runs in one workdir, in order (`trainer='stages'`).

  `stages.NAME` is a whole config of another trainer; `order` lists the names;
  a stage's `init_from` or `teacher` written '@NAME' is an earlier stage's workdir.
  """
  c = ml_collections.ConfigDict()
  c.trainer = 'stages'
  c.order = ()                    # stage names, in the order they run
  c.stages = ml_collections.ConfigDict()
  c.report = True                 # WORKDIR/report.md over the evaluating stages
  return c


_DEFAULTS = {'pretrain': pretrain, 'finetune': finetune, 'linear_eval': linear_eval,
             'distill': distill, 'segment': segment, 'stages': stages}


def defaults(trainer: str) -> ml_collections.ConfigDict:
  if trainer not in _DEFAULTS:
    raise ConfigError(f'config.trainer={trainer!r} is not one of {sorted(_DEFAULTS)}')
  return _DEFAULTS[trainer]()


# How a run whose config.json lacks a key ran, where that is not the key's default
# (the default changed when the key was added): `{trainer: {dotted key: value}}`.
ABSENT_MEANS = {
    'finetune': {'classifier_init': 'normal'},
    'linear_eval': {'classifier_init': 'normal', 'feature_bn': True},
    'distill': {'classifier_init': 'normal'},
}


def saved_defaults(trainer: str) -> ml_collections.ConfigDict:
  """`defaults(trainer)` as a config.json that lacks a key ran: with `ABSENT_MEANS`."""
  config = defaults(trainer)
  config.update_from_flattened_dict(ABSENT_MEANS.get(trainer, {}))
  return config


def trainers_with_key(key: str) -> list[str]:
  """The trainers whose default config has the dotted `key` (a value or a section)."""
  def has(config, parts):
    head, *rest = parts
    if head not in config:
      return False
    return not rest or (isinstance(config[head], ml_collections.ConfigDict)
                        and has(config[head], rest))
  return sorted(name for name, make in _DEFAULTS.items() if has(make(), key.split('.')))


def leaves(config, prefix=''):
  """`(dotted key, value)` of every leaf of a config (or of its `to_dict()`, or JSON)."""
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from leaves(value, f'{name}.')
    else:
      yield name, value


# Keys that change how a run is carried out, not what it computes: logging,
# checkpointing, input workers, switches between implementations of one computation,
# and (`is_bookkeeping`) where files live.
BOOKKEEPING_KEYS = frozenset((
    'data.build_if_missing', 'data.num_workers', 'data.prefetch_batches',
    'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'keep_checkpoint_every_steps', 'tensorboard', 'model.fused_bn',
    'optimizer.lars_batched_norms'))


def is_bookkeeping(key: str) -> bool:
  """Whether two runs that differ only in `key` compute the same thing."""
  return key in BOOKKEEPING_KEYS or key.rsplit('.', 1)[-1] in ('data_dir', 'manual_dir')


def saved_settings(saved) -> dict[str, Any]:
  """`leaves(saved)` of a `config.json`, completed with its trainer's defaults.

  A config written before a key existed ran as the key's default says, or as
  `ABSENT_MEANS` says where the default changed when the key was added, so the
  missing key takes that value; keys of the saved trainer's schema only.
  """
  found = dict(leaves(saved))
  trainer = saved.get('trainer') if isinstance(saved, Mapping) else None
  if trainer in _DEFAULTS and trainer != 'stages':
    for key, value in leaves(saved_defaults(trainer).to_dict()):
      found.setdefault(key, value)
  return found


def setting_differences(saved, config) -> list[tuple[str, Any, Any]]:
  """`(key, saved value, config's value)` of the settings that differ, bookkeeping aside.

  `saved` is a config as its `config.json` holds it, completed by `saved_settings`
  (a key it lacks has its default); a key `config` lacks (one a later version retired)
  is not compared; numbers compare by value, tuples as lists.
  """
  ours = dict(leaves(config))
  found = []
  for key, old in sorted(saved_settings(saved).items()):
    if key not in ours or is_bookkeeping(key):
      continue
    new = ours[key]
    if key.rsplit('.', 1)[-1] in PATH_KEYS and isinstance(old, str) and isinstance(new, str):
      same = _as_path(old) == _as_path(new)  # one run, named relative or absolute
    else:
      same = _same_value(old, new)
    if not same:
      found.append((key, old, new))
  return found


def describe_differences(differences: list[tuple[str, Any, Any]]) -> str:
  """`key is OLD there, NEW asked` for the first of `setting_differences`, `and N more`."""
  key, old, new = differences[0]
  more = f' and {len(differences) - 1} more' if len(differences) > 1 else ''
  return f'{key} is {old!r} there, {new!r} asked{more}'


# Keys naming another run's folder (compared as paths).
PATH_KEYS = ('init_from', 'teacher')


def _as_path(value: str) -> str:
  return os.path.normpath(os.path.abspath(os.path.expanduser(value))) if value else ''


def _same_value(a, b) -> bool:
  number = (int, float)
  if (isinstance(a, number) and isinstance(b, number) and not isinstance(a, bool)
      and not isinstance(b, bool)):
    return float(a) == float(b)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
  return a == b


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails with the first key of `config` that its trainer does not use, or of a wrong type."""
  if 'trainer' not in config:
    raise ConfigError('config has no `trainer` key')
  if config.trainer == 'stages':
    _validate_stages(config)
    return
  schema = dict(leaves(defaults(config.trainer)))
  for name, value in leaves(config):
    if name not in schema:
      raise ConfigError(f'config key {name!r} is not used by trainer {config.trainer!r}')
    expected = schema[name]
    if isinstance(expected, bool) != isinstance(value, bool) or (
        not isinstance(value, type(expected)) and
        not (isinstance(expected, float) and isinstance(value, int))):
      raise ConfigError(f'config key {name!r} should be a {type(expected).__name__}, '
                        f'got {value!r}')
  values = dict(leaves(config))
  for name in _POSITIVE:
    value = values.get(name)
    if value is not None and value <= 0:
      raise ConfigError(f'config.{name} must be positive, got {value!r}')
  if config.trainer == 'pretrain' and values['batch_size'] < 2:
    raise ConfigError(f'config.batch_size={values["batch_size"]} gives the contrastive loss no '
                      'negatives (each pair\'s are the other pairs of its batch): use 2 or more')
  _check_unlabeled_splits(config.trainer, values)
  _check_torchvision_layout(values)
  init = values.get('init')
  if (config.trainer != 'distill' and init and init.lower() not in ('scratch', 'random')
      and 'init_from' in values and not values['init_from']):
    logging.warning('config.init=%r names an initialisation, but config.init_from is empty: '
                    'this run starts from random weights, and reports list it as %r', init,
                    init)


def _check_torchvision_layout(values: Mapping[str, Any]) -> None:
  """Fails on a ResNet-18/34 in torchvision's layout with a projection in its first block.

  torchvision's have none, and a benchmark config picks `identity_shortcuts` from the
  depth it was given: a depth set afterwards (`--config.model.depth=18` over an r50
  config) would silently train another architecture from scratch than the imported
  models it is compared with. With `init_from`, the encoder check names the key.
  """
  depth = values.get('model.depth')
  if (values.get('model.stem_pool_padding') == 'symmetric' and isinstance(depth, int)
      and depth < 50 and values.get('model.identity_shortcuts') is False
      and not values.get('init_from')):
    raise ConfigError(
        f'config.model.depth={depth} in torchvision\'s layout (model.stem_pool_padding='
        '\'symmetric\') has no projection in its first block: set '
        '--config.model.identity_shortcuts=True (configs/benchmark_cxr.py:DATASET,r18 sets '
        'both), or model.stem_pool_padding=\'same\' for SimCLR\'s ResNet')


def _check_unlabeled_splits(trainer: str, values: Mapping[str, Any]) -> None:
  """Fails where a split of images without labels (`unlabeled`) is used for labels.

  Pretraining may train on it, though not with the probe alone; a distillation student
  may train on it (it learns from its teacher) unless the validation cases are held out
  of its training split; every other use trains on labels or evaluates.
  """
  if trainer == 'pretrain':
    split = values['data.train_split']
    if values['probe'] and splits.only_unlabeled(split):
      raise ConfigError(f'config.probe learns from labels, but config.data.train_split='
                        f'{split!r} has none: set config.probe=False, or add labeled images '
                        f'(train+{splits.UNLABELED})')
    return
  keys = ['data.train_split', 'data.eval_split', 'data.test_split']
  if trainer == 'distill' and not values.get('data.holdout'):
    keys.remove('data.train_split')
  if values.get('shift.dataset'):
    keys.append('shift.split')
  for key in keys:
    split = values.get(key)
    if isinstance(split, str) and splits.has_unlabeled(split):
      raise ConfigError(f'config.{key}={split!r} takes in split {splits.UNLABELED}, whose '
                        'images have no labels: training on labels and evaluation need '
                        'labeled splits (unlabeled images serve pretraining and distillation)')


# Keys that divide a step count, size an image or divide logits: 0 or less is never meant.
_POSITIVE = ('batch_size', 'log_every_steps', 'checkpoint_every_steps', 'data.image_size',
             'temperature', 'distill_temperature')


def _validate_stages(config: ml_collections.ConfigDict) -> None:
  unknown = sorted(set(config) - {'trainer', 'order', 'stages', 'report'})
  if unknown:
    raise ConfigError(f'config key {unknown[0]!r} is not used by trainer \'stages\'')
  order = tuple(config.get('order') or ())
  stages_ = config.get('stages') or {}
  if not order:
    raise ConfigError('config.order is empty: name the stages to run')
  missing = [name for name in order if name not in stages_]
  if missing:
    raise ConfigError(f'config.order names stage(s) {missing} that config.stages lacks '
                      f'(stages: {sorted(stages_)})')
  unused = sorted(set(stages_) - set(order))
  if unused:
    raise ConfigError(f'config.stages.{unused[0]} is not in config.order')
  if len(set(order)) != len(order):
    raise ConfigError(f'config.order names a stage twice: {list(order)}')
  for name in order:
    stage = stages_[name]
    if stage.get('trainer') in (None, 'stages'):
      raise ConfigError(f'config.stages.{name} needs a trainer other than stages')
    try:
      validate(stage)
    except ConfigError as e:
      raise ConfigError(f'config.stages.{name}: {e}') from None
