"""SimCLR pretraining on ImageNet (TFDS `imagenet2012`), as in SimCLR's ImageNet runs.

  python main.py --config=configs/simclr_imagenet.py[:r50] --workdir=...

Variants (the argument): an encoder name from `config_schema.MODEL_VARIANTS`
(r50, r50x2, r101, r152x2, r152x3sk, ...). ResNet-50, global batch 4096, 100 epochs,
LARS at 0.3 x B / 256 with 10 warm-up epochs, temperature 0.1, weight decay 1e-6,
colour strength 1.0, bfloat16, SimCLR's linear probe on the labels.

The data set is TFDS's own `imagenet2012`, read with `tfds.data_source`, so it must be
built in the array_record format (manual download of the ILSVRC2012 tars), e.g.
`tfds build imagenet2012 --file_format=array_record --manual_dir=...` (TFDS's
command needs TensorFlow); this project's `build_data` only builds its own builders.
Use the resulting workdir as `init_from` of the medical configs.
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.pretrain()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'imagenet2012'
  config.data.build_if_missing = False
  config.data.eval_split = 'validation'
  config.batch_size = 4096
  config.num_epochs = 100.0
  config.optimizer.learning_rate = 0.3
  config.optimizer.lr_scaling = 'linear'
  config.optimizer.warmup_epochs = 10.0
  config.temperature = 0.1
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoint_every_steps = 50_000
  config.eval_every_steps = 10_000
  config.eval_batches = 10
  config.data.num_workers = 16
  return config
