"""SIIM-ACR pneumothorax segmentation: a U-Net on the ResNet encoder (validation Dice selects).

  python main.py --config=configs/segment_siim_acr.py[:r50] --workdir=... \
      --config.data.manual_dir=SIIM_DIR \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle --config.seed=0

One of the transfer-learning benchmark's segmentation tasks (SIIM-ACR Pneumothorax
Segmentation: chest X-rays in DICOM, the union of each image's annotated pneumothorax
regions; an image without pneumothorax has an empty mask; README, Segmentation) with
the segment trainer of `configs/segment_ham10000.py`: segmentation_models' U-Net
(decoder channels 256, 128, 64, 32, 16) on the encoder of `init_from` (or random weights
when `init_from` is empty, the scratch baseline), 224 x 224 inputs as the benchmark
trains this task (images stored at a longest side of 512, the builder's default
config), BCE + soft Dice loss (`loss.bce_weight=0`: the Dice loss alone, as the
benchmark's code trains this task), Adam at 2e-4 with the benchmark's batch of 32 and a
cosine decay, evaluated on the validation split every 2 epochs with early stopping
after 25 evaluations without a better validation Dice (the benchmark's patience of 50
epochs), and the best model tested once by the mean per-image Dice (1 for an image
whose mask and prediction are both empty, as the competition scored). The
competition's test labels were never published: the builder splits the annotated
images 80/10/10 by patient. The argument picks the encoder (`r50`, `r50x2`, ..., see
`config_schema.MODEL_VARIANTS`). The set cannot be downloaded by the builder:
`data.manual_dir` is the folder of the competition's files (the `.dcm` images and
`train-rle.csv` or `stage_2_train.csv`) for the first run's build.
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.segment()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'siim_acr_pneumothorax/side512'
  config.data.image_size = 224
  config.batch_size = 32
  config.num_epochs = 100.0
  config.optimizer.learning_rate = 1.6e-3  # x 32 / 256: Adam's 2e-4
  config.eval_every_steps = 0
  config.eval_every_epochs = 2.0  # at any label fraction: the run length is in epochs
  config.early_stopping_patience = 25
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
