"""HAM10000 at CPU scale: the pretraining and fine-tuning runs of docs/results.md.

  python main.py --config=configs/ham10000_small.py:micle --workdir=...     # or :simclr
  python main.py --config=configs/ham10000_small.py:finetune --workdir=... \
      --config.init_from=PRETRAIN_WORKDIR --config.init=micle \
      --config.data.label_fraction=0.1 --config.seed=0

A ResNet-18 of width 1/4 at 64x64 on `ham10000/side96` (the images stored with
their longer side at 96 pixels, built in seconds). Pretraining: 200 steps of
batch 128 (3.2 epochs) with SimCLR (two views of one image) or MICLe (views of
two images of one lesion), the same budget for both. Fine-tuning: every layer,
150 steps of batch 64 with the first projection-head layer kept, the best of 3
validation evaluations tested once. The same protocol from random weights is the scratch
baseline (`init_from` empty).
"""

from bigssl_med import config_schema

_DATASET = 'ham10000/side96'


def _small(config):
  config.dataset = _DATASET
  config.data.image_size = 64
  config.data.num_workers = 2
  config.model.depth = 18
  config.model.width_multiplier = 0.25
  config.model.head_out_dim = 64
  config.compute_dtype = 'float32'     # bfloat16 is slow on CPUs
  config.num_epochs = 0.0
  config.total_steps = 200
  config.optimizer.warmup_epochs = 0.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.tensorboard = False
  return config


def get_config(arg: str = 'micle'):
  if arg in ('simclr', 'micle'):
    config = _small(config_schema.pretrain())
    config.micle = arg == 'micle'
    config.augment.color_strength = 0.5  # SimCLR's strength for small images
    config.batch_size = 128
    config.temperature = 0.2
    config.optimizer.learning_rate = 0.075  # SimCLR's small-batch rule: 0.075 x sqrt(B)
    config.optimizer.lr_scaling = 'sqrt'
    config.optimizer.warmup_steps = 20
    return config
  if arg == 'finetune':
    config = _small(config_schema.finetune())
    config.batch_size = 64
    config.data.crop_area_min = 0.25
    config.optimizer.learning_rate = 0.2  # x 64 / 256: a peak of 0.05
    config.total_steps = 150
    config.eval_every_steps = 50
    return config
  raise ValueError(f"configs/ham10000_small.py takes 'simclr', 'micle' or 'finetune', got {arg!r}")
