"""Self-distillation on HAM10000 (SimCLRv2's third step).

  python main.py --config=configs/distill_derm.py[:r50] --workdir=... \
      --config.teacher=FINETUNE_WORKDIR

The teacher is the best model of a finished `finetune_derm` run (any label
fraction); it labels every training image, and the student (the encoder named
by the argument, the teacher's size or smaller; from random weights, or from
`--config.init_from`) learns `CE(softmax(teacher/τ), softmax(student/τ))` with
τ = 1, without labels. Validation top-1 selects the student; the test split is
evaluated once. Reports list it as `distilled from INIT` (or `--config.init`).
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.distill()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'ham10000'
  config.data.image_size = 224
  config.batch_size = 256
  config.num_epochs = 50.0
  config.optimizer.learning_rate = 0.1
  config.distill_temperature = 1.0
  config.eval_every_steps = 0
  config.eval_every_epochs = 2.0  # at any label fraction: the run length is in epochs
  config.early_stopping_patience = 10
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
