"""Montgomery County lung segmentation: a U-Net on the ResNet encoder (validation Dice selects).

  python main.py --config=configs/segment_montgomery.py[:r50] --workdir=... \
      --config.data.manual_dir=MONTGOMERYSET_DIR \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle --config.seed=0

One of the transfer-learning benchmark's segmentation tasks (Montgomery County chest
X-rays, the union of the manual left- and right-lung masks; README, Segmentation)
with the segment trainer of `configs/segment_ham10000.py`: segmentation_models' U-Net
(decoder channels 256, 128, 64, 32, 16) on the encoder of `init_from` (or random
weights when `init_from` is empty, the scratch baseline), 224 x 224 inputs (images
stored at a longest side of 512, the builder's default config), BCE + soft Dice loss
(`loss.bce_weight=0`: the Dice loss alone, as the benchmark's code trains most of its
tasks), Adam at 2e-4 (batch 16) with a cosine decay, evaluated on the validation
split every 2 epochs (104 training images, 6.5 steps an epoch) with early stopping,
and the best model tested once by the mean per-image Dice. The set has 138 images
and no official split: the builder's 80/10/10 case-hash split of the published file
names gives 104 / 18 / 16 images, so a single run's Dice is noisy; compare seeds. The
argument picks the encoder (`r50`, `r50x2`, ..., see `config_schema.MODEL_VARIANTS`).
The set cannot be downloaded by the builder: `data.manual_dir` is the unzipped
`MontgomerySet/` (or a folder above it) for the first run's build.
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.segment()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'montgomery/side512'
  config.data.image_size = 224
  config.batch_size = 16
  config.num_epochs = 200.0
  config.optimizer.learning_rate = 3.2e-3  # x 16 / 256: Adam's 2e-4
  config.eval_every_steps = 0
  config.eval_every_epochs = 2.0  # at any label fraction: the run length is in epochs
  config.early_stopping_patience = 20
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  return config
