"""Writes the PyTorch files tests/test_convert.py reads (run once, with PyTorch installed).

  python tests/data/make_torch_fixtures.py

- `torchvision_r18_w32.pth`, `torchvision_r50_w32.pth`: `torch.save` of a state dict in
  torchvision's ResNet layout at 1/32 width (`reference_resnets.torchvision_state_dict`,
  seed 1, a 10-class `fc`), as torchvision's own files hold them.
- `torch_tensors.pth`: tensors that exercise the reader: a transposed view, a slice of a
  larger storage, bfloat16, float16, int64 scalar, a Parameter, nested dicts.
- `training_checkpoint_r18_w32.pth`: the ResNet-18 state dict as a training script saves
  it: under `state_dict` with DataParallel's `module.` prefix, beside the epoch, the
  optimiser's state and the script's `argparse.Namespace`.
- `legacy_checkpoint_r18_w32.pth`: the same without `args`, in the format of PyTorch
  before 1.6 (`_use_new_zipfile_serialization=False`), as older published files are.
"""

import argparse
import collections
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import reference_resnets  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  for depth in (18, 50):
    state = reference_resnets.torchvision_state_dict(depth, 1 / 32, seed=1, num_classes=10)
    torch.save(collections.OrderedDict((k, torch.from_numpy(np.asarray(v)))
                                       for k, v in state.items()),
               os.path.join(HERE, f'torchvision_r{depth}_w32.pth'))
  base = torch.arange(20, dtype=torch.float32)
  torch.save({
      'transposed': torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
      'slice': base[3:7],
      'same_storage': base.reshape(4, 5)[1:, ::2],
      'bfloat16': torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
      'float16': torch.tensor([0.5, -1.0], dtype=torch.float16),
      'int64_scalar': torch.tensor(7),
      'parameter': torch.nn.Parameter(torch.full((2,), 0.25)),
      'nested': {'inner': collections.OrderedDict(x=torch.ones(2, 2, dtype=torch.float64))},
      'epoch': 3,
  }, os.path.join(HERE, 'torch_tensors.pth'))
  training_checkpoints()


def training_checkpoints():
  state = reference_resnets.torchvision_state_dict(18, 1 / 32, seed=1, num_classes=10)
  wrapped = collections.OrderedDict((f'module.{k}', torch.from_numpy(np.asarray(v)))
                                    for k, v in state.items())
  optimizer = {'state': {}, 'param_groups': [{'lr': 0.03, 'momentum': 0.9, 'params': [0, 1]}]}
  torch.save({'epoch': 3, 'arch': 'resnet18', 'state_dict': wrapped, 'optimizer': optimizer,
              'args': argparse.Namespace(model='resnet18', lr=0.03)},
             os.path.join(HERE, 'training_checkpoint_r18_w32.pth'))
  torch.save({'epoch': 200, 'arch': 'resnet18', 'state_dict': wrapped, 'optimizer': optimizer},
             os.path.join(HERE, 'legacy_checkpoint_r18_w32.pth'),
             _use_new_zipfile_serialization=False)


if __name__ == '__main__':
  if sys.argv[1:] == ['--training_checkpoints']:  # only the two files added later
    training_checkpoints()
  else:
    main()
