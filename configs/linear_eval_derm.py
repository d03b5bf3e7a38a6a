"""Linear evaluation on HAM10000's 7 diagnoses: a linear classifier on the frozen encoder.

  python main.py --config=configs/linear_eval_derm.py[:r50] --workdir=... \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle

The encoder of `init_from` runs in inference mode and stays fixed; its pooled
features, standardised, feed a linear layer trained for 90 epochs on random
crops and flips with Nesterov momentum at 0.1 x B / 256 (SimCLR's protocol).
Top-1 on the lesion-disjoint validation split selects the model; the test split
is evaluated once, by ten-crop test-time augmentation.
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.linear_eval()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'ham10000'
  config.data.image_size = 224
  config.data.test_ten_crop = True
  config.batch_size = 256
  config.num_epochs = 90.0
  config.optimizer.learning_rate = 0.1
  config.eval_every_steps = 0
  config.eval_every_epochs = 5.0  # at any label fraction: the run length is in epochs
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
