"""MICLe continual pretraining on dermatology cases (HAM10000 lesions by default).

  python main.py --config=configs/micle_derm.py[:r50] --workdir=... \
      --config.init_from=WORKDIR_OF_AN_IMAGENET_RUN

The two views of a positive pair come from two different images of one lesion
(`case_id`); a lesion with one image gives two crops of it. Starts from
`config.init_from` (a SimCLR ImageNet workdir, or a checkpoint imported into this
project's format): encoder and projection head are loaded, the optimiser and
the step count start fresh. Leave init_from empty to pretrain from scratch.

HAM10000 (dermatoscopic images, 7 diagnoses) stands in for the MICLe paper's private
dermatology cases (digital-camera images, several per case).

The raw HAM10000 files: `config.data.manual_dir` (the Dataverse release or the
layout of ../shared/data/ham10000); the data set is built on first use.
A user's own dermatology cases come through the `image_cases` builder
(`--config.dataset=image_cases/NAME`, README "Data").
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.pretrain()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'ham10000'
  config.micle = True
  config.data.image_size = 224
  config.batch_size = 512
  config.num_epochs = 300.0
  config.optimizer.learning_rate = 0.3
  config.optimizer.warmup_epochs = 10.0
  config.temperature = 0.1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.eval_every_steps = 2000
  return config
