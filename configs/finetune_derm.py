"""Fine-tuning on HAM10000's 7 diagnoses (multi-class; top-1 selects the model).

  python main.py --config=configs/finetune_derm.py[:r50] --workdir=... \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle \
      --config.data.label_fraction=0.1 --config.seed=0

Every layer is fine-tuned from the encoder and the first projection-head layer of
`init_from` (SimCLRv2's choice; `head_layers_kept`), or from random weights when
`init_from` is empty (the scratch baseline). `init` names the initialisation in
reports. Label fractions are fractions of lesions, nested for one `fraction_seed`.

The training crops are augmented as the MICLe paper fine-tunes: random crop and
flip (host), then on the device a random rotation, colour jitter and Gaussian blur.
The strengths are this project's choice: the rotation (up to 45 degrees) and jitter
strength (0.5) of the chest X-ray pretraining recipe, and SimCLR's blur (p 0.5).

HAM10000 (dermatoscopic images, 7 diagnoses) stands in for the MICLe paper's
dermatology data set, which is private (digital-camera images of 26 skin conditions
and 'Other'): top-1 here is not comparable with the paper's. A user's own cases come
through the `image_cases` builder. `--config.augment.jitter_p=0 --config.augment.blur_p=0
--config.augment.rotation_deg=0` fine-tunes on crops and flips alone.
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.finetune()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'ham10000'
  config.data.image_size = 224
  config.augment.rotation_deg = 45.0
  config.augment.color_strength = 0.5
  config.augment.jitter_p = 0.8
  config.augment.blur_p = 0.5
  config.batch_size = 256
  config.num_epochs = 50.0
  config.optimizer.learning_rate = 0.1
  config.eval_every_steps = 0
  config.eval_every_epochs = 2.0  # at any label fraction: the run length is in epochs
  config.early_stopping_patience = 10
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
