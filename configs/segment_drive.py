"""DRIVE retinal vessel segmentation: a U-Net on the ResNet encoder (validation Dice selects).

  python main.py --config=configs/segment_drive.py[:r50] --workdir=... \
      --config.data.manual_dir=DRIVE_DIR \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle --config.seed=0

One of the transfer-learning benchmark's segmentation tasks (DRIVE colour fundus
photographs, the first observer's vessel annotation; README, Segmentation) with the
segment trainer of `configs/segment_montgomery.py`: segmentation_models' U-Net (decoder
channels 256, 128, 64, 32, 16) on the encoder of `init_from` (or random weights when
`init_from` is empty, the scratch baseline), 512 x 512 inputs as the benchmark trains
DRIVE (the images stored as published, 565 x 584, the builder's default config, and
resized on the host; masks nearest, vessel where the stored value is at least 128),
BCE + soft Dice loss (`loss.bce_weight=0`: the Dice loss alone), Adam at 2e-4 (batch 4)
with a cosine decay over 500 epochs, evaluated on the validation split every 10 epochs (15
training images, 3.75 steps an epoch: 1875 steps, an evaluation every 38) with early
stopping after 20 evaluations without improvement, and the best model tested once by the
mean per-image Dice on the official test images. The Dice is over the whole image, the
field of view included (the `fov` feature is not used). The builder's 80/20 case-hash
split of the 20 official training images gives 15 / 5, so the validation Dice that
selects the model rests on 5 images; compare seeds. The argument picks the encoder
(`r50`, `r50x2`, ..., see `config_schema.MODEL_VARIANTS`). The set cannot be downloaded
by the builder: `data.manual_dir` is the unzipped `DRIVE/` (or a folder above it) for
the first run's build. A download without the test annotations (`test/1st_manual/`)
builds no test split; the run then ends without a test evaluation (a warning says so).
The batch of 4 must be a multiple of the devices in use: on 8 devices,
`--config.batch_size=8` (the learning rate is per 256 images, so Adam's rate doubles
with it; halve `optimizer.learning_rate` to keep 2e-4).
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.segment()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'drive/original'
  config.data.image_size = 512
  config.batch_size = 4
  config.num_epochs = 500.0
  config.optimizer.learning_rate = 1.28e-2  # x 4 / 256: Adam's 2e-4
  config.eval_every_steps = 0
  config.eval_every_epochs = 10.0  # at any label fraction: the run length is in epochs
  config.early_stopping_patience = 20
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  return config
