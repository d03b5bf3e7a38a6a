"""HAM10000 lesion segmentation: a U-Net on the ResNet encoder (validation Dice selects).

  python main.py --config=configs/segment_ham10000.py[:r50] --workdir=... \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle \
      --config.data.label_fraction=0.1 --config.seed=0

The transfer-learning benchmark's U-Net and Dice metric on HAM10000's lesion masks
(Tschandl et al. 2020; not one of the benchmark's segmentation tasks, and a training
recipe of this project's: README, Segmentation): segmentation_models' U-Net (decoder
channels 256, 128, 64, 32, 16) on the encoder of `init_from` (or random weights when
`init_from` is empty, the scratch baseline), 224 x 224 inputs, BCE + soft Dice loss
(`loss.bce_weight=0`: the Dice loss alone, as the benchmark's code trains most of its
tasks), Adam at 2e-4 (batch 32) with a cosine decay, evaluated on the validation
split about once an epoch (~8,000 training images / 32) with early stopping, and the
best model tested once by the mean per-image Dice. The argument picks the encoder
(`r50`, `r50x2`, ..., see `config_schema.MODEL_VARIANTS`); label fractions are
fractions of lesions.
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.segment()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'ham10000'
  config.data.image_size = 224
  config.batch_size = 32
  config.num_epochs = 50.0
  config.optimizer.learning_rate = 1.6e-3  # x 32 / 256: Adam's 2e-4
  config.eval_every_steps = 0
  config.eval_every_epochs = 2.0  # at any label fraction: the run length is in epochs
  config.early_stopping_patience = 10
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
