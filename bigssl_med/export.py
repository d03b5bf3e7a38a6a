r"""A run's ResNet as a `.safetensors` file in torchvision's layout, for PyTorch users.

  python -m bigssl_med.export --workdir=RUN --out=micle_derm_r50.safetensors

The inverse of `bigssl_med.convert`'s torchvision import: the encoder becomes
`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ..., `layer2.0.downsample.*`
(kernels in PyTorch's OIHW order, BatchNorm `weight`, `bias`, `running_mean`,
`running_var`, `num_batches_tracked`), loadable with `safetensors.torch.load_file` into
`torchvision.models.resnet50()` and its siblings (`strict=False` without a classifier).
A fine-tuned or linearly evaluated run whose classifier reads the encoder's features
directly (`head_layers_kept=0`) also gives `fc.weight` and `fc.bias`; linear
evaluation's feature standardisation (`feature_bn`) is folded into them.

The weights come from the run's `best/` model when it has one (fine-tuning), else from
its newest checkpoint (`--checkpoint=latest` forces that). The file's metadata says what
a PyTorch user must match:
- `input_normalization`: 'none' means the network expects [0, 1] RGB images as they
  are (no ImageNet mean/std standardisation); 'imagenet' means it expects it.
- `stem_pool_padding`: 'same' means the model was trained with SimCLR's max-pooling
  windows, one pixel off torchvision's; in torchvision it computes a different
  function (the log says so).
- `conv_padding`: 'same' means the strided convolutions pad as TF's SAME (a model
  imported from BYOL), not as torchvision's; the log says so too.
`bigssl_med.convert` reads all three back from the metadata, so importing the file
gives back the same network.

Architectures torchvision's ResNet cannot express are refused with a one-line error:
selective kernels, the CIFAR stem, and SimCLR's projection in the first block of a
ResNet-18/34 (`identity_shortcuts=False`). An existing output file is replaced only with
`--overwrite`, and then only once the new file is complete. The same model always
exports to the same bytes (the metadata keys are sorted, and `source` says where in the
run the weights lay, `best` or `checkpoints/N`, not where the run lies), so a checksum
identifies it.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from bigssl_med import checkpointing, cli, files, models
from bigssl_med import workdir as workdir_lib
from bigssl_med.errors import CheckpointError, ConfigError, UserError
from bigssl_med.models import resnet

CHECKPOINTS = ('auto', 'best', 'latest')


def _run_model_config(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, 'config.json')
  config = workdir_lib.read_json(path)
  if not isinstance(config, dict) or not isinstance(config.get('model'), dict):
    raise ConfigError(f'{path}: missing, unreadable, or without a "model" section: is '
                      f'{workdir} a run of this project?')
  try:
    return models.encoder_architecture(config['model'])
  except KeyError as e:
    raise ConfigError(f'{path}: "model" lacks {e}') from None


def _check_expressible(model: Mapping[str, Any], workdir: str) -> None:
  """Fails unless torchvision's ResNet has the architecture `model` describes."""
  where = f'{workdir}: config.model'
  if model['sk_ratio']:
    raise ConfigError(f'{where}.sk_ratio={model["sk_ratio"]}: torchvision\'s ResNet has no '
                      'selective kernels')
  if model['cifar_stem']:
    raise ConfigError(f'{where}.cifar_stem=True: torchvision\'s ResNet has a 7x7 stem with '
                      'max-pooling')
  kind, _ = resnet.layout(model['depth'])
  if kind == 'basic' and not model['identity_shortcuts']:
    raise ConfigError(f'{where}.identity_shortcuts=False: this ResNet-{model["depth"]} has a '
                      'projection in its first block, which torchvision\'s lacks (train with '
                      '--config.model.identity_shortcuts=True to export one)')


def to_torchvision(variables: Mapping[str, Any], model: Mapping[str, Any]
                   ) -> dict[str, np.ndarray]:
  """The torchvision state dict (float32 NumPy; `fc.*` when there is a direct classifier)."""
  params, stats = variables['params']['encoder'], variables['batch_stats']['encoder']
  out, used = {}, set()

  def get(tree, path, collection):
    node = tree
    for name in path:
      node = node[name]
    used.add((collection,) + tuple(path))
    return np.asarray(node, np.float32)

  def conv(ours, theirs):
    out[f'{theirs}.weight'] = get(params, ours + ('kernel',), 'params').transpose(3, 2, 0, 1)

  def bn(ours, theirs):
    out[f'{theirs}.weight'] = get(params, ours + ('scale',), 'params')
    out[f'{theirs}.bias'] = get(params, ours + ('bias',), 'params')
    out[f'{theirs}.running_mean'] = get(stats, ours + ('mean',), 'batch_stats')
    out[f'{theirs}.running_var'] = get(stats, ours + ('var',), 'batch_stats')
    out[f'{theirs}.num_batches_tracked'] = np.zeros((), np.int64)

  conv(('stem_conv', 'conv'), 'conv1')
  bn(('stem_bn', 'bn'), 'bn1')
  kind, blocks_per_group = resnet.layout(model['depth'])
  convs = 3 if kind == 'bottleneck' else 2
  for g, blocks in enumerate(blocks_per_group):
    for b in range(blocks):
      ours, theirs = (f'group{g + 1}_block{b}',), f'layer{g + 1}.{b}'
      for k in range(1, convs + 1):
        conv(ours + (f'conv{k}', 'conv'), f'{theirs}.conv{k}')
        bn(ours + (f'bn{k}', 'bn'), f'{theirs}.bn{k}')
      if 'shortcut' in params[ours[0]]:
        conv(ours + ('shortcut', 'proj', 'conv'), f'{theirs}.downsample.0')
        bn(ours + ('shortcut', 'proj_bn', 'bn'), f'{theirs}.downsample.1')
  for collection, tree in (('params', params), ('batch_stats', stats)):
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = (collection,) + tuple(str(getattr(k, 'key', k)) for k in path)
      if names not in used:
        raise CheckpointError(f'{"/".join(names[:1] + ("encoder",) + names[1:])} has no place '
                              'in torchvision\'s ResNet')
  fc = _classifier(variables)
  if fc is not None:
    out['fc.weight'], out['fc.bias'] = fc
  return out


def _classifier(variables: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
  """(fc.weight, fc.bias) of a classifier on the encoder's features, or None."""
  params = variables['params']
  if 'classifier' not in params:
    return None
  if jax.tree.leaves(params.get('head', {})):
    logging.warning('the classifier reads projection-head layers torchvision\'s ResNet lacks '
                    '(head_layers_kept > 0): exporting the encoder without fc')
    return None
  kernel = np.asarray(params['classifier']['kernel'], np.float64)
  bias = np.asarray(params['classifier']['bias'], np.float64)
  feature_bn = variables.get('batch_stats', {}).get('feature_bn')
  if feature_bn is not None:  # linear evaluation: y = W·(x − mean)/√(var + ε) + b
    inv = 1.0 / np.sqrt(np.asarray(feature_bn['var'], np.float64) + resnet.BN_EPSILON)
    bias = bias - (np.asarray(feature_bn['mean'], np.float64) * inv) @ kernel
    kernel = kernel * inv[:, None]
  return kernel.T.astype(np.float32), bias.astype(np.float32)


def export(workdir: str, out: str, checkpoint: str = 'auto',
           overwrite: bool = False) -> dict[str, str]:
  """Writes `out` (safetensors, torchvision layout) from the run in `workdir`.

  Returns the metadata written with it. Refuses an existing `out` unless `overwrite`;
  the file is written aside and renamed, so a failed export leaves `out` as it was.
  """
  if checkpoint not in CHECKPOINTS:
    raise UserError(f'checkpoint {checkpoint!r} is not one of {CHECKPOINTS}')
  if os.path.isdir(out):
    raise UserError(f'{out}: is a folder; --out names the .safetensors file to write')
  if not out.lower().endswith('.safetensors'):
    raise UserError(f'{out}: name it *.safetensors: the file is written in the safetensors '
                    'format (torch.load does not read it; safetensors.torch.load_file does)')
  if os.path.exists(out) and not overwrite:
    raise UserError(f'{out}: already exists; export to a new file, or pass --overwrite')
  model = _run_model_config(workdir)
  _check_expressible(model, workdir)
  best = os.path.join(workdir, 'best')
  if checkpoint == 'best' and not os.path.isdir(best):
    raise CheckpointError(f'{best}: no such folder (only fine-tuning runs keep a best model)')
  device = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  # `source`: where in the run the weights lie ('best', 'checkpoints/1200'), not where
  # the run lies on this machine: the bytes are the model's alone, and a shared file
  # names no local folder.
  if checkpoint != 'latest' and os.path.isdir(best):
    item, source = best, 'best'
  else:
    item = checkpointing.find_model_item(workdir, f'--workdir={workdir}')
    source = os.path.relpath(item.parent, checkpointing.absolute(workdir))
  variables = checkpointing.restore_model_item(item, device)
  tensors = to_torchvision(variables, model)
  if model['stem_pool_padding'] != 'symmetric':
    logging.warning('%s: trained with SimCLR\'s max-pooling windows (stem_pool_padding=%r); '
                    'torchvision\'s sit one pixel off, so in torchvision this network computes '
                    'a different function (bigssl_med.convert reads the file back as it is)',
                    workdir, model['stem_pool_padding'])
  if model['conv_padding'] != 'fixed':
    logging.warning('%s: its strided convolutions pad as TF\'s SAME (conv_padding=%r), one '
                    'pixel off torchvision\'s, so in torchvision this network computes a '
                    'different function (bigssl_med.convert reads the file back as it is)',
                    workdir, model['conv_padding'])
  metadata = {'format': 'torchvision_resnet', 'source': source,
              'depth': str(model['depth']), 'width_multiplier': str(model['width_multiplier']),
              'input_normalization': model['input_normalization'],
              'stem_pool_padding': model['stem_pool_padding'],
              'conv_padding': model['conv_padding'],
              'fc': str('fc.weight' in tensors).lower()}
  # safetensors writes an array's buffer as it lies in memory: transposed views must be copied.
  tensors = {k: np.array(v, order='C') for k, v in tensors.items()}  # 0-d stays 0-d
  _write_file(out, tensors, metadata)
  return metadata


def _write_file(out: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """Writes the safetensors file `out` aside in its folder, then renames it over `out`.

  Raises:
    UserError: `out` cannot be written (no such folder possible, disk full, no
      permission), naming it and why; nothing is left behind.
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    with files.written_whole(out) as tmp:
      safetensors_numpy.save_file(tensors, tmp, metadata=metadata)
      _sort_metadata(tmp)
  except Exception as e:  # pylint: disable=broad-except  (OSError, and safetensors' own)
    reason = e.strerror if isinstance(e, OSError) and e.strerror else checkpointing.first_line(e)
    raise UserError(f'{out}: cannot be written ({reason})') from None


def _sort_metadata(path: str) -> None:
  """Rewrites the header of the safetensors file `path` with its metadata keys sorted.

  safetensors writes the metadata in the order of a hash map, which changes from run to
  run; sorted, the same model exports to the same bytes (a checksum can name it). The
  header keeps its length (padded with spaces, as safetensors pads it), so the tensors
  stay where they are.
  """
  with open(path, 'r+b') as f:
    size = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(size), object_pairs_hook=dict)
    if '__metadata__' in header:
      header['__metadata__'] = dict(sorted(header['__metadata__'].items()))
    text = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode('utf-8')
    if len(text) > size:  # cannot happen for the same content; keep the file as written
      return
    f.seek(8)
    f.write(text.ljust(size, b' '))


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status."""
  parser = argparse.ArgumentParser(
      prog='python -m bigssl_med.export',
      description='Writes the ResNet of a run as a torchvision-layout .safetensors file.')
  parser.add_argument('--workdir', required=True, help='the run (pretrain, finetune, ...)')
  parser.add_argument('--out', required=True, help='the .safetensors file to write')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing --out (once the new file is complete)')
  parser.add_argument('--checkpoint', choices=CHECKPOINTS, default='auto',
                      help="'best' (a fine-tuning run's selected model), 'latest' (the newest "
                           "checkpoint) or 'auto': best where there is one")
  args = parser.parse_args(argv)
  cli.log_info_to_stderr()
  try:
    metadata = export(args.workdir, args.out, args.checkpoint, overwrite=args.overwrite)
  except UserError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  print(f'{args.out}: ResNet-{metadata["depth"]} x{float(metadata["width_multiplier"]):g} in '
        f'torchvision\'s layout{" with fc" if metadata["fc"] == "true" else ""} from '
        f'{os.path.join(args.workdir, metadata["source"])}\n{json.dumps(metadata, sort_keys=True)}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main))
