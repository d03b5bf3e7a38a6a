"""MICLe continual pretraining on chest X-rays (CheXpert patients by default).

  python main.py --config=configs/micle_cxr.py[:r50] --workdir=... \
      --config.init_from=WORKDIR_OF_AN_IMAGENET_RUN

Positive pairs are two different images (studies, views) of one patient
(`case_id`). The augmentation is the chest X-ray recipe of the MICLe paper:
random crop and horizontal flip (host), a random rotation of up to 45 degrees,
colour jitter of strength 0.5, and no Gaussian blur (it can erase the local texture
a finding is read from). Hue and saturation jitter are off: on grayscale
radiographs they change nothing. Chest X-ray labels are multi-label, so SimCLR's
single-label linear probe is off; evaluation reports the contrastive metrics.

`--config.dataset` may name any built chest X-ray set with `case_id`
(`chexpert`, `nih_chest_xray14`, `mimic_cxr_jpg`).
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.pretrain()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'chexpert'
  config.micle = True
  config.probe = False
  config.data.label_key = ''
  config.augment.hue = False
  config.augment.saturation = False
  config.augment.color_strength = 0.5
  config.augment.blur_p = 0.0
  config.augment.rotation_deg = 45.0
  config.batch_size = 1024
  config.num_epochs = 100.0
  config.optimizer.learning_rate = 0.3
  config.optimizer.warmup_epochs = 5.0
  config.temperature = 0.1
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = 5000
  config.eval_batches = 20
  # CheXpert's validation split has 200 patients (234 images), fewer than a batch of
  # 1024: the contrastive metrics are evaluated on batches of 128 (254 negatives a row).
  config.eval_batch_size = 128
  config.data.num_workers = 16
  return config
