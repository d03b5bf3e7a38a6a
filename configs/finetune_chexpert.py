"""Fine-tuning on CheXpert's 14 observations (multi-label; mean AUC selects the model).

  python main.py --config=configs/finetune_chexpert.py[:r50] --workdir=... \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle

Uncertain labels follow `task.uncertain` (U-Ones by default; ignore, zeros,
lsr_ones); blanks count as negatives. The mean AUC is over CheXpert's five
competition pathologies. CheXpert v1.0 has no public test split, so its official
validation split (234 images) is the test split, evaluated once; the model is
selected on 10% of the training patients held out by a fixed hash of the patient id
(`data.holdout`), never trained on, the same for every seed and label fraction.

Every view is read, and AUCs are per image; `--config.data.views=frontal` reads frontal
images only, and `--config.task.eval_unit=study` scores each study once (the highest
probability among its images; `task.eval_reduce`).

The training crops are augmented as the MICLe paper fine-tunes (crop and flip on
the host; rotation up to 45 degrees, colour jitter of strength 0.5 without hue and
saturation, and SimCLR's Gaussian blur on the device; see finetune_derm.py).
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.finetune()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'chexpert'
  config.data.holdout = 0.1
  config.data.eval_split = ''
  config.data.test_split = 'validation'
  config.data.image_size = 224
  config.augment.rotation_deg = 45.0
  config.augment.color_strength = 0.5
  config.augment.jitter_p = 0.8
  config.augment.hue = False
  config.augment.saturation = False
  config.augment.blur_p = 0.5
  config.batch_size = 256
  config.num_epochs = 10.0
  config.optimizer.learning_rate = 0.1
  config.task.uncertain = 'ones'
  config.task.mean_over = 'chexpert5'
  config.eval_every_steps = 0
  config.eval_every_epochs = 1.0  # at any label fraction: the run length is in epochs
  config.early_stopping_patience = 5
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
