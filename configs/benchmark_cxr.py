"""The transfer-learning benchmark's fine-tuning protocol, on chest X-rays.

  python main.py --config=configs/benchmark_cxr.py[:DATASET[,MODEL]] --workdir=... \
      --config.init_from=IMPORTED_OR_PRETRAINED_WORKDIR --config.init=NAME --config.seed=S

DATASET is `nih14` (ChestX-ray14, the default), `chexpert`, `shenzhen` or `rsna`; MODEL a
variant of `config_schema.MODEL_VARIANTS` (`r50` by default). Every layer is trained
from the encoder of `init_from` (an imported torchvision-layout model, or a pretraining
run) under a new linear classifier, as the benchmark fine-tunes its initialisations:

- Adam, no weight decay, learning rate 2e-4 at batch 32 (`adamw`, 1.6e-3 x 32/256);
- the learning rate halved once the validation loss has not improved by more than
  0.01% for more than 5 evaluations (`optimizer.schedule='plateau'`: ReduceLROnPlateau
  with patience 10 // 2 and threshold 1e-4), one evaluation per epoch;
- the model of lowest validation loss kept (`task.primary_metric='loss'`), training
  stopped once more than 10 evaluations in a row have not lowered it
  (`early_stopping_patience=11`), at most 1000 epochs;
- training crops: random resized crop to 224 (area 0.08-1), flip, and a rotation within
  7 degrees (on the device);
- evaluation of the whole image squashed to 256 x 256 whatever its aspect ratio,
  bilinear (`data.eval_resize='squash'`, its `Resize((256, 256))`): the central 224 for
  validation, ten crops of 224 for testing (`data.test_ten_crop`); `bigssl_med.predict`
  does the same.

ChestX-ray14: the official test list is the test split; validation is 10% of the
train_val patients (the builder's split). CheXpert: the official validation split is
the test split, validation is 10% of the training patients held out (`data.holdout`),
uncertain labels follow LSR-Ones, and the mean AUC is over the five competition
pathologies. As its code gives the validation set the training policy, the validation
loss (which selects the model, halves the learning rate and stops the run) counts the
uncertain labels with LSR-Ones' targets, drawn afresh at each evaluation from the seed
and the step (`task.eval_uncertain='train_policy'`); the AUCs, and the test split (the
official validation set, which has no uncertain labels), leave them out. Shenzhen
(tuberculosis or normal): the benchmark's own train, validation and test lists
(`shenzhen/benchmark_side512`; the builder reads `ShenzenCXR_{train,valid,test}_data.txt`
from `data.manual_dir` with the set; `--config.dataset=shenzhen` splits by case hash
instead). Its two classes make a two-class softmax task that logs `auc` (of
tuberculosis) besides top-1; the benchmark trains one sigmoid output instead, the same
model family (a softmax of two logits is the sigmoid of their difference). The
validation loss selects the model, as for the other data sets; the benchmark's score,
`auc`, is the run's headline (results.json `primary_metric`, the report's default
column), as for any two-class task selected on a loss. RSNA Pneumonia: the
`rsna_pneumonia` builder's three classes (normal, no lung opacity but not normal, lung
opacity) as a three-class softmax task scored by top-1 accuracy, on its 80/10/10 split by
patient (the challenge's test labels were not published).

The architecture is torchvision's, as the benchmark's initialisations are
(`python -m bigssl_med.convert` imports them): its max-pooling windows
(`model.stem_pool_padding='symmetric'`), ImageNet standardisation of the input
(`model.input_normalization='imagenet'`) and, for ResNet-18/34, no projection in the
first block (`model.identity_shortcuts=True`, set from MODEL: pick the depth there, as
`:nih14,r18`; a depth set with `--config.model.depth` alone is refused from scratch,
and named by the encoder check with `init_from`). From a SimCLR or MICLe run of this
project, pass that run's settings instead (`--config.model.stem_pool_padding=same
--config.model.input_normalization=none`); from BYOL's checkpoint, which pads as
Haiku does, `--config.model.stem_pool_padding=same --config.model.conv_padding=same`.
A mismatch is a one-line error naming the key.
"""

from bigssl_med import config_schema

_DATASETS = ('nih14', 'chexpert', 'shenzhen', 'rsna')


def get_config(arg: str = 'nih14'):
  parts = [p.strip() for p in arg.split(',') if p.strip()]
  named = [p for p in parts if p in _DATASETS]
  if len(named) > 1:
    raise ValueError(f'configs/benchmark_cxr.py takes one DATASET, got {arg!r}')
  dataset = named[0] if named else 'nih14'
  variants = [p for p in parts if p not in _DATASETS]
  if len(variants) > 1:
    raise ValueError(f'configs/benchmark_cxr.py takes DATASET[,MODEL], got {arg!r}')
  unknown = [v for v in variants if v not in config_schema.MODEL_VARIANTS]
  if unknown:
    raise ValueError(f'configs/benchmark_cxr.py: {unknown[0]!r} is neither a DATASET '
                     f'({", ".join(_DATASETS)}) nor a MODEL '
                     f'({", ".join(sorted(config_schema.MODEL_VARIANTS))})')
  config = config_schema.finetune()
  config_schema.set_model_variant(config, variants[0] if variants else 'r50')
  config.model.stem_pool_padding = 'symmetric'
  config.model.input_normalization = 'imagenet'
  config.model.identity_shortcuts = config.model.depth < 50
  config.head_layers_kept = 0
  config.data.image_size = 224
  config.data.test_ten_crop = True
  config.data.eval_resize = 'squash'
  config.augment.rotation_deg = 7.0
  config.batch_size = 32
  config.num_epochs = 1000.0
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1.6e-3   # x 32 / 256: 2e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.schedule = 'plateau'
  config.optimizer.plateau_factor = 0.5
  config.optimizer.plateau_patience = 5
  config.optimizer.plateau_threshold = 1e-4
  config.task.primary_metric = 'loss'
  config.eval_every_steps = 0
  config.eval_every_epochs = 1.0
  config.early_stopping_patience = 11   # the benchmark stops when its count exceeds 10
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  if dataset == 'chexpert':
    config.dataset = 'chexpert'
    config.task.uncertain = 'lsr_ones'
    config.task.eval_uncertain = 'train_policy'   # its validation set has LSR-Ones' labels
    config.task.mean_over = 'chexpert5'
    config.data.holdout = 0.1
    config.data.eval_split = ''
    config.data.test_split = 'validation'
  elif dataset == 'shenzhen':
    config.dataset = 'shenzhen/benchmark_side512'   # its lists; validation and test splits
  elif dataset == 'rsna':
    config.dataset = 'rsna_pneumonia'
  else:
    config.dataset = 'nih_chest_xray14'
  return config
