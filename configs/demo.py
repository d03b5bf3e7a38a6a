"""Demo: MICLe pretraining on the real HAM10000 files, end to end on a CPU in minutes.

  python main.py --config=configs/demo.py --workdir=/tmp/demo

Builds the `ham10000` data set from ../shared/data/ham10000 (beside this checkout)
into the TFDS data dir if it is not built yet, pretrains a small ResNet-18 (width
1/4) at 64x64 with MICLe (positive pairs from two images of one lesion) and
SimCLR's linear probe, evaluates on the lesion-disjoint validation split and
writes WORKDIR/results.json. Running it again on the same workdir resumes from the
newest checkpoint and, once finished, does not retrain.
"""

import os

from bigssl_med import config_schema

_SHARED_HAM10000 = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                                'shared', 'data', 'ham10000')


def get_config():
  config = config_schema.pretrain()
  config.dataset = 'ham10000'
  config.micle = True
  config.data.manual_dir = os.path.normpath(_SHARED_HAM10000)
  config.data.image_size = 64
  config.data.num_workers = 2
  config.model.depth = 18
  config.model.width_multiplier = 0.25
  config.model.head_out_dim = 64
  config.compute_dtype = 'float32'   # bfloat16 is slow on CPUs
  config.augment.color_strength = 0.5  # SimCLR's strength for small images
  config.batch_size = 128
  config.total_steps = 300
  config.num_epochs = 0.0
  config.optimizer.learning_rate = 0.075  # SimCLR's small-batch rule: 0.075 x sqrt(B)
  config.optimizer.lr_scaling = 'sqrt'
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.warmup_steps = 30
  config.log_every_steps = 25
  config.checkpoint_every_steps = 100
  config.temperature = 0.2
  return config
