"""SimCLR continual pretraining on chest X-rays: two crops of one image per pair.

  python main.py --config=configs/simclr_cxr.py[:r50] --workdir=... \
      --config.init_from=WORKDIR_OF_AN_IMAGENET_RUN

As `micle_cxr.py` but each positive pair is two augmentations of a single image
(SimCLR); images of one patient in a batch are each other's negatives.
"""

import importlib.util
import os


def get_config(arg: str = 'r50'):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'micle_cxr.py')
  spec = importlib.util.spec_from_file_location('micle_cxr', path)
  micle_cxr = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(micle_cxr)
  config = micle_cxr.get_config(arg)
  config.micle = False
  return config
