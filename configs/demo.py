"""Demo: pretrain → fine-tune → evaluate → report on the real HAM10000 files, on a CPU.

  python main.py --config=configs/demo.py --workdir=/tmp/demo

Builds `ham10000/side96` from ../shared/data/ham10000 (beside this checkout) into
the TFDS data dir if it is not built yet (seconds), then runs three stages in
WORKDIR/NAME and a report:

1. `pretrain`: MICLe (positive pairs from two images of one lesion) on the
   training split, a ResNet-18 of width 1/4 at 64x64, 200 steps of batch 128;
2. `micle`: fine-tunes every layer from that encoder on 10% of the training
   lesions' labels, best of 3 validation evaluations, tested once;
3. `scratch`: the same fine-tuning from random weights;
4. the report: WORKDIR/report.md (+ CSV and plots) comparing the two on the
   lesion-disjoint test split.

The settings are those of configs/ham10000_small.py: the demo is one cell of
the comparison in docs/results.md. Running it again on the same workdir (moved or
not) resumes where it stopped and does not redo finished stages. Any key can be
overridden, e.g. `--config.stages.pretrain.total_steps=50`; pretraining extended
after `micle` trained from it stops at `micle` with a one-line error (remove
WORKDIR/micle to fine-tune again from the new encoder).
"""

import importlib.util
import os

import ml_collections

from bigssl_med import config_schema

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED_HAM10000 = os.path.normpath(os.path.join(_HERE, '..', '..', 'shared', 'data',
                                                 'ham10000'))


def _small_config(arg: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('ham10000_small',
                                                os.path.join(_HERE, 'ham10000_small.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.data.manual_dir = _SHARED_HAM10000
  return config


def get_config():
  config = config_schema.stages()
  config.order = ('pretrain', 'micle', 'scratch')
  config.stages.pretrain = _small_config('micle')
  for name, init_from in (('micle', '@pretrain'), ('scratch', '')):
    finetune = _small_config('finetune')
    finetune.init = name
    finetune.init_from = init_from
    finetune.data.label_fraction = 0.1
    config.stages[name] = finetune
  config.report = True
  return config
