"""Linear evaluation on CheXpert's 14 observations (multi-label, frozen encoder).

  python main.py --config=configs/linear_eval_chexpert.py[:r50] --workdir=... \
      --config.init_from=PRETRAINING_WORKDIR --config.init=micle

A linear layer on the standardised features of the frozen encoder of `init_from`,
U-Ones for uncertain labels, mean AUC over CheXpert's five competition
pathologies. CheXpert v1.0 has no public test split, so its official validation
split is the test split; the model is selected on 10% of the training patients held
out (`data.holdout`), as in finetune_chexpert.py.
Add `--config.shift.dataset=nih_chest_xray14 --config.shift.label_map=...` to
evaluate the same model on ChestX-ray14's shared findings.
"""

from bigssl_med import config_schema


def get_config(arg: str = 'r50'):
  config = config_schema.linear_eval()
  config_schema.set_model_variant(config, arg)
  config.dataset = 'chexpert'
  config.data.holdout = 0.1
  config.data.eval_split = ''
  config.data.test_split = 'validation'
  config.data.image_size = 224
  config.batch_size = 256
  config.num_epochs = 10.0
  config.optimizer.learning_rate = 0.1
  config.task.uncertain = 'ones'
  config.task.mean_over = 'chexpert5'
  config.eval_every_steps = 0
  config.eval_every_epochs = 1.0  # at any label fraction: the run length is in epochs
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
