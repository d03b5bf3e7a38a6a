"""Fine-tuning on ChestX-ray14's 14 findings (multi-label; mean AUC over all 14).

  python main.py --config=configs/finetune_nih14.py[:r50] --workdir=... \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle

Official test split; validation is 10% of the train_val patients.
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.finetune()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'nih_chest_xray14'
  config.data.image_size = 224
  config.batch_size = 256
  config.num_epochs = 20.0
  config.optimizer.learning_rate = 0.1
  config.eval_every_steps = 0
  config.eval_every_epochs = 1.0  # at any label fraction: the run length is in epochs
  config.early_stopping_patience = 5
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
