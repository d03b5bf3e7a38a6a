r"""Published ImageNet ResNets as a workdir that `config.init_from` accepts.

  python -m bigssl_med.convert --checkpoint=resnet50-11ad3fa6.pth --workdir=imported/tv_r50
  python -m bigssl_med.convert --checkpoint=r50_1x_sk1/model.ckpt-250228 --workdir=imported/v2

Formats (`--format`; found from the file when left out):
- `torchvision`: a PyTorch or `.safetensors` file holding a state dict in torchvision's
  ResNet layout (torchvision's weights, timm's plain ResNets, and many self-supervised
  models): `conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ...,
  `layer2.0.downsample.0.weight`. Keys beside the ResNet, such as the classifier
  `fc.*` or SwAV's `projection_head.*` and `prototypes.*`, are left out and listed in
  the log. The state dict may sit alone or inside a dict (under 'state_dict',
  'model', ...), its keys with or without a prefix such as 'module.' (found, or
  `--prefix` where a file holds several networks, e.g. MoCo's 'module.encoder_q.').
  The depth and width are read off the weights. torchvision's max-pooling pads one
  pixel each side: the imported model has `stem_pool_padding='symmetric'`.
  torchvision's ResNet-18/34 have an identity shortcut in their first block where
  SimCLR's have a projection: the imported model has `identity_shortcuts=True` there,
  so it is torchvision's network in training mode too. torchvision's models (and most
  published in its layout) were trained on images standardised with ImageNet's mean
  and std: the imported model has `input_normalization='imagenet'`, so it standardises
  the [0, 1] images it gets (`--input_normalization=none` for a model trained on [0, 1]
  images, such as SimCLR's converted to PyTorch).
  Files written by `torch.save` since PyTorch 1.6 (zip) are read without PyTorch;
  older ones need PyTorch installed; `.safetensors` files are read with safetensors.
  A file written by `bigssl_med.export` keeps the input normalization and max-pooling
  its metadata records, so export followed by import gives back the same network.
- `simclr_tf1`: SimCLR's TensorFlow 1 checkpoints (v1: ResNet50_1x/2x/4x; v2:
  r50_1x_sk0 ... r152_3x_sk1, pretrained or fine-tuned). The encoder lives under
  `base_model/` (with `--ema`, the moving averages under `ema_model/base_model/`), its
  layers named in creation order (`conv2d`, `conv2d_1`, ..., `batch_normalization_N`);
  depth, width and selective kernels are found by matching those shapes against this
  project's ResNets, whose layers run in the same order. A SimCLRv2 projection head
  (`head_contrastive/nl_J/...`) comes along when present. Needs TensorFlow (part of
  the normal install).
- `byol`: BYOL's checkpoints (`pretrain_res50x1.pkl`, `pretrain_res200x2.pkl`): a pickle
  of `{'experiment_state': (online_params, target_params, online_state, target_state,
  opt_state), ...}` holding Haiku's ResNet (`res_net50/~/block_group_0/~/block_0/~/
  conv_0`, ...). The online network's encoder is imported (`--ema`: the target
  network's); the projector, predictor and classifier are left out. Read without
  Haiku, dill or BYOL's code, and without running any code from the file: NumPy
  rebuilds the arrays, Haiku's mappings become dicts and every other object a stand-in.
  Haiku pads strided convolutions as TF's SAME, so the imported model has
  `conv_padding='same'`, and `input_normalization='imagenet'` as BYOL trained.

Writes `WORKDIR/checkpoints/0/model` (orbax; `{'params', 'batch_stats'}` with
`encoder` and, when imported, `head`: the layout of a pretraining checkpoint) and
`WORKDIR/config.json` (`trainer: 'imported'`, the `model` config of the imported
architecture, and where it came from), both at once: WORKDIR is written beside its
place and then renamed, so an import cut off half-way leaves nothing. A WORKDIR that
already holds a run, or any file, is left untouched.
"""

import argparse
import collections
import io
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bigssl_med import checkpointing, cli, config_schema, files, haiku_pickle, models
from bigssl_med import staging as staging_lib
from bigssl_med import workdir as workdir_lib
from bigssl_med.errors import CheckpointError, UserError
from bigssl_med.models import heads, resnet

FORMATS = ('torchvision', 'simclr_tf1', 'byol')
EXPORT_FORMAT = 'torchvision_resnet'  # the metadata `format` of bigssl_med.export's files

# ------------------------------------------------------------------ PyTorch files.

_TORCH_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(size), tuple(stride)
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  # The last element's index: a damaged file may declare more than its storage holds.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or min(stride, default=0) < 0 or last >= len(storage):
    raise ValueError(f'a tensor of shape {size} at offset {offset} needs {last + 1} elements '
                     f'of its storage, which has {len(storage)}')
  flat = storage[offset:]
  if not size:
    return np.array(flat[0])
  return np.lib.stride_tricks.as_strided(
      flat, shape=size, strides=tuple(s * storage.dtype.itemsize for s in stride)).copy()


def _rebuild_parameter(data, *unused):
  del unused
  return data


class Opaque:
  """Stands for an object of any other class in a `torch.save` file (a training
  checkpoint's `args`, its scheduler, ...): built from nothing the file says, so no
  code of the file runs. A state dict that holds one is an error (`find_state_dict`)."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


def _opaque_class(module: str, name: str) -> type:
  return type(f'{module}.{name}', (Opaque,), {})


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a `torch.save` zip archive's `data.pkl` into NumPy arrays.

  Tensors and the dicts around them become NumPy arrays and dicts; any other class or
  function the file names becomes an `Opaque` stand-in (never the real one: no code
  of the file runs, as with `torch.load`'s `weights_only`), so a training checkpoint
  holding `args` or a scheduler beside its state dict is read.
  """

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._root, self._path = archive, root, path
    self._storages = {}  # key -> array: views of one storage read it once
    self._big_endian = False
    if f'{root}/byteorder' in archive.namelist():
      self._big_endian = archive.read(f'{root}/byteorder').strip() == b'big'

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    if module == 'torch' and name in _TORCH_DTYPES:
      return _StorageType(_TORCH_DTYPES[name])
    return _opaque_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise CheckpointError(f'{self._path}: unknown storage reference {pid!r:.60}')
    storage_type, key = pid[1], pid[2]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f'{self._path}: unsupported storage {storage_type!r:.60}')
    if key not in self._storages:
      dtype = storage_type.dtype.newbyteorder('>') if self._big_endian else storage_type.dtype
      raw = self._archive.read(f'{self._root}/data/{key}')
      self._storages[key] = np.frombuffer(raw, dtype).astype(storage_type.dtype)
    return self._storages[key]


def read_torch_file(path: str) -> Any:
  """The object a `torch.save` file holds, tensors as NumPy arrays.

  Zip files (PyTorch >= 1.6) are read here; older files through PyTorch when it is
  installed.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
        if len(pickles) != 1:
          raise CheckpointError(f'{path}: a zip file but not one written by torch.save '
                                '(no single */data.pkl)')
        root = pickles[0][:-len('/data.pkl')]
        return _TorchUnpickler(archive.read(pickles[0]), archive, root, path).load()
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError,
            zipfile.BadZipFile, OSError) as e:
      if isinstance(e, UserError):
        raise
      raise CheckpointError(f'{path}: cannot read its tensors (damaged or cut short?): '
                            f'{e}') from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'{path}: not a complete zip file written by torch.save (PyTorch '
                          '>= 1.6; a download cut short?); reading older PyTorch files needs '
                          'PyTorch installed') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    unsafe = re.search(r'GLOBAL ([\w.]+)', str(e))
    if unsafe:  # torch.load reads other objects only by running the file's code
      raise CheckpointError(
          f'{path}: an older PyTorch file (before 1.6) that holds a {unsafe.group(1)} beside '
          'its tensors, which torch.load reads only by running code from the file; if you '
          'trust it, save its state dict alone: torch.save(torch.load(FILE, '
          'weights_only=False)["state_dict"], NEW_FILE)') from e
    raise CheckpointError(f'{path}: torch.load failed: {str(e).splitlines()[0]}') from e
  def to_numpy(leaf):
    if not isinstance(leaf, torch.Tensor):
      return leaf  # an epoch, an architecture's name, an optimiser's settings
    return leaf.float().numpy() if leaf.is_floating_point() else leaf.numpy()

  return jax.tree.map(to_numpy, obj, is_leaf=lambda t: isinstance(t, torch.Tensor))


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file (the format of the Hugging Face hub), as NumPy."""
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  import safetensors  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors_numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f'{path}: not a readable safetensors file: {e}') from e


def read_safetensors_metadata(path: str) -> dict[str, str]:
  """The string metadata of a `.safetensors` file's header ({} when it has none)."""
  import safetensors  # pylint: disable=g-import-not-at-top
  try:
    with safetensors.safe_open(path, 'np') as f:
      return dict(f.metadata() or {})
  except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f'{path}: not a readable safetensors file: {e}') from e


def is_safetensors_file(path: str) -> bool:
  """Whether `path` is named `*.safetensors` or starts as a safetensors file does (an
  8-byte header length, then the JSON header), whatever its name."""
  if path.lower().endswith('.safetensors'):
    return True
  try:
    with open(path, 'rb') as f:
      start = f.read(9)
      size = os.fstat(f.fileno()).st_size
  except OSError:
    return False
  return (len(start) == 9 and start[8:] == b'{'
          and int.from_bytes(start[:8], 'little') <= size - 8)


def exported_architecture(path: str) -> dict[str, Any]:
  """`input_normalization`, `stem_pool_padding`, `conv_padding` and `width_multiplier`
  of a file `bigssl_med.export` wrote (`conv_padding` 'fixed' where an older export's
  metadata lacks it).

  Empty for other files. Export records them in the file's metadata (`format:
  torchvision_resnet`) because torchvision's layout cannot show them, and a model
  trained here has this project's defaults (no input standardisation, SimCLR's
  max-pooling windows) where a torchvision model has others; the width multiplier
  because one such as 0.1 rounds each layer's channels on its own (`64 x 0.1` is
  6 but `128 x 0.1` is 13), which the stem's channels alone do not give back.
  """
  if not is_safetensors_file(path):
    return {}
  metadata = read_safetensors_metadata(path)
  if metadata.get('format') != EXPORT_FORMAT:
    return {}
  found = {}
  for key, allowed in (('input_normalization', tuple(resnet.INPUT_NORMALIZATIONS)),
                       ('stem_pool_padding', resnet.STEM_POOL_PADDINGS),
                       ('conv_padding', resnet.CONV_PADDINGS)):
    value = metadata.get(key, 'fixed' if key == 'conv_padding' else None)  # older exports
    if value not in allowed:
      raise CheckpointError(f'{path}: metadata {key}={value!r} is not one of {allowed}')
    found[key] = value
  if 'width_multiplier' in metadata:
    try:
      found['width_multiplier'] = float(metadata['width_multiplier'])
    except ValueError:
      raise CheckpointError(f'{path}: metadata width_multiplier='
                            f'{metadata["width_multiplier"]!r} is not a number') from None
  return found


def read_weights_file(path: str) -> Any:
  """A safetensors file's tensors, or the object a `torch.save` file holds (a
  safetensors file is told apart by its contents too, whatever its name)."""
  if is_safetensors_file(path):
    return read_safetensors_file(path)
  return read_torch_file(path)


# ---------------------------------------------------------- torchvision's layout.


def find_state_dict(obj: Any, path: str, prefix: str | None = None
                    ) -> dict[str, np.ndarray]:
  """The torchvision-layout ResNet state dict inside `obj`, its keys without `prefix`.

  Looks through nested dicts (a training checkpoint's 'state_dict', 'model', ...) for
  keys `P + 'conv1.weight'` with `P + 'layer1.0.conv1.weight'` beside them. With
  several such P (e.g. MoCo's query and key encoders), `prefix` picks one: P itself,
  or P after the path of the dicts that hold it, `/`-separated (`state_dict_ema/` for
  a file with the same network under 'state_dict' and 'state_dict_ema').
  """
  found = {}

  def visit(d, where):
    if not isinstance(d, Mapping):
      return
    keys = [k for k in d if isinstance(k, str)]
    for k in keys:
      p = k[:-len('conv1.weight')]
      if k.endswith('conv1.weight') and f'{p}layer1.0.conv1.weight' in d:
        found[(where, p)] = d
    for k in keys:
      if isinstance(d[k], Mapping):
        visit(d[k], where + (k,))

  def full(key):
    where, p = key
    return ''.join(f'{w}/' for w in where) + p

  visit(obj, ())
  if prefix is not None:
    found = {key: d for key, d in found.items() if prefix in (key[1], full(key))}
  if not found:
    wanted = f"'{prefix}conv1.weight'" if prefix is not None else "'conv1.weight'"
    raise CheckpointError(f'{path}: no ResNet state dict in torchvision\'s layout ({wanted} '
                          'with layer1.0.conv1.weight beside it)')
  if len(found) > 1:
    prefixes = [p for _, p in found]
    names = sorted(repr(full(key) if prefixes.count(key[1]) > 1 else key[1]) for key in found)
    raise CheckpointError(f'{path}: holds several ResNets, key prefixes {", ".join(names)}: '
                          'choose one with --prefix')
  (where, p), d = next(iter(found.items()))
  beside = sorted(k for k in d if isinstance(k, str) and not k.startswith(p))
  if beside:
    logging.info('%s: left out %d keys outside the prefix %r: %s', path, len(beside),
                 full((where, p)), ', '.join(beside[:3]) + (', ...' if len(beside) > 3 else ''))
  for k, v in d.items():
    if isinstance(k, str) and k.startswith(p) and isinstance(v, Opaque):
      raise CheckpointError(f'{path}: {k} holds a {type(v).__name__}, not a tensor')
  return {k[len(p):]: np.asarray(v) for k, v in d.items()
          if isinstance(k, str) and k.startswith(p)}


def _torchvision_layout(sd: Mapping[str, np.ndarray], path: str,
                        width_multiplier: float | None = None) -> tuple[int, float]:
  """(depth, width_multiplier) of a torchvision-layout state dict; the width from the
  stem's channels unless given (an export's metadata), which they must then match."""
  stem = sd['conv1.weight']
  if stem.ndim != 4 or stem.shape[2:] != (7, 7) or stem.shape[1] != 3:
    raise CheckpointError(f'{path}: conv1.weight has shape {stem.shape}; torchvision\'s '
                          'ResNets have a 7x7 stem on RGB images, (64 x width, 3, 7, 7)')
  first = sd.get('layer1.0.conv1.weight')
  middle = sd.get('layer1.0.conv2.weight')
  if middle is not None and middle.ndim == 4 and middle.shape[1] != middle.shape[0]:
    raise CheckpointError(f'{path}: layer1.0.conv2.weight has shape {middle.shape}, a grouped '
                          'convolution (ResNeXt), which this importer does not read')
  if ('layer1.0.conv3.weight' in sd and first is not None and first.ndim == 4
      and first.shape[0] != stem.shape[0]):
    raise CheckpointError(f'{path}: layer1.0.conv1.weight has {first.shape[0]} channels where '
                          f'the stem has {stem.shape[0]}: a wide ResNet\'s bottlenecks '
                          '(wide_resnet50_2), which this importer does not read')
  if width_multiplier is not None and resnet.channels(64, width_multiplier) != stem.shape[0]:
    raise CheckpointError(f'{path}: width_multiplier={width_multiplier:g} in the metadata, but '
                          f'conv1.weight has {stem.shape[0]} channels')
  kind = 'bottleneck' if 'layer1.0.conv3.weight' in sd else 'basic'
  depth = _depth_from_blocks(
      sd, lambda g: (f'layer{g + 1}', rf'layer{g + 1}\.(\d+)\.'), kind, path, 'layer')
  return depth, (stem.shape[0] / 64 if width_multiplier is None else width_multiplier)


def _depth_from_blocks(names, group, kind: str, path: str, unit: str) -> int:
  """The ResNet depth of `kind` blocks whose numbers `names` hold, group by group.

  `group(g)` gives block group g's name (for errors) and a regex whose one group
  captures a block's number in a name of that group; each group's blocks must be
  numbered 0..N-1.
  """
  counts = []
  for g in range(4):
    label, pattern = group(g)
    blocks = {int(m.group(1)) for k in names for m in [re.match(pattern, str(k))] if m}
    if not blocks or blocks != set(range(len(blocks))):
      raise CheckpointError(f'{path}: {label} has blocks {sorted(blocks)}, not 0..N-1')
    counts.append(len(blocks))
  depths = [d for d in resnet.DEPTHS if resnet.layout(d) == (kind, tuple(counts))]
  if not depths:
    raise CheckpointError(f'{path}: {kind} blocks {tuple(counts)} per {unit} match no ResNet '
                          f'depth of {resnet.DEPTHS}')
  return depths[0]


def _put(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


# The modules of torchvision's ResNet that the encoder is made of (`fc` is its classifier).
_TORCHVISION_MODULES = ('conv1.', 'bn1.', 'layer1.', 'layer2.', 'layer3.', 'layer4.')


def import_torchvision(sd: Mapping[str, np.ndarray], path: str = 'state dict', *,
                       input_normalization: str = 'imagenet',
                       stem_pool_padding: str = 'symmetric',
                       conv_padding: str = 'fixed',
                       width_multiplier: float | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`({'params': {'encoder': ...}, 'batch_stats': {...}}, model config)` of a state dict.

  Every key of the ResNet's own modules (`conv1`, `bn1`, `layer1` ... `layer4`) is
  used but the BatchNorm counters `num_batches_tracked`; one there that torchvision's
  ResNet lacks, or one missing, is an error naming it. Keys outside those modules
  (the classifier `fc`, or what a self-supervised method keeps beside the encoder:
  SwAV's `projection_head` and `prototypes`, ...) are left out, and the log says which.
  `input_normalization` is what the model expects of its input (see
  `resnet.INPUT_NORMALIZATIONS`): ImageNet's standardisation unless it was trained on
  [0, 1] images. `stem_pool_padding`: torchvision's max-pooling ('symmetric') unless
  the file says otherwise (`exported_architecture`); `conv_padding` likewise
  (torchvision's, 'fixed', unless an export of a model with TF's SAME padding).
  `width_multiplier`: found from
  the stem unless given (an export's metadata).
  """
  depth, width = _torchvision_layout(sd, path, width_multiplier)
  params, stats = {}, {}
  used = set()

  def take(key):
    if key not in sd:
      raise CheckpointError(f'{path}: lacks {key}, which torchvision\'s ResNet-{depth} has')
    used.add(key)
    return np.asarray(sd[key], np.float32)

  def conv(name, ours):
    _put(params, ours + ('kernel',), take(f'{name}.weight').transpose(2, 3, 1, 0))

  def bn(name, ours):
    _put(params, ours + ('scale',), take(f'{name}.weight'))
    _put(params, ours + ('bias',), take(f'{name}.bias'))
    _put(stats, ours + ('mean',), take(f'{name}.running_mean'))
    _put(stats, ours + ('var',), take(f'{name}.running_var'))

  conv('conv1', ('stem_conv', 'conv'))
  bn('bn1', ('stem_bn', 'bn'))
  kind, blocks_per_group = resnet.layout(depth)
  convs = 3 if kind == 'bottleneck' else 2
  for g, blocks in enumerate(blocks_per_group):
    for b in range(blocks):
      tv, ours = f'layer{g + 1}.{b}', (f'group{g + 1}_block{b}',)
      for k in range(1, convs + 1):
        conv(f'{tv}.conv{k}', ours + (f'conv{k}', 'conv'))
        bn(f'{tv}.bn{k}', ours + (f'bn{k}', 'bn'))
      if b == 0 and f'{tv}.downsample.0.weight' in sd:
        conv(f'{tv}.downsample.0', ours + ('shortcut', 'proj', 'conv'))
        bn(f'{tv}.downsample.1', ours + ('shortcut', 'proj_bn', 'bn'))
  unused = sorted(k for k in sd if k not in used and not k.endswith('num_batches_tracked'))
  left_out = [k for k in unused if not k.startswith(_TORCHVISION_MODULES)]
  unused = [k for k in unused if k.startswith(_TORCHVISION_MODULES)]
  if left_out:
    groups = collections.Counter(k.split('.')[0] for k in left_out)
    logging.info('%s: left out %d tensors beside the ResNet: %s', path, len(left_out),
                 ', '.join(f'{name}.* ({n})' for name, n in sorted(groups.items())))
  if unused:
    raise CheckpointError(f'{path}: has {unused[0]}, which torchvision\'s ResNet-{depth} lacks '
                          f'({len(unused)} such keys)')
  # Only the first block of ResNet-18/34 can go without a projection (64 -> 64, stride 1);
  # where one is missing elsewhere, the check against the model names it.
  model = _model_config(depth=depth, width_multiplier=width, stem_pool_padding=stem_pool_padding,
                        conv_padding=conv_padding,
                        identity_shortcuts='layer1.0.downsample.0.weight' not in sd,
                        input_normalization=input_normalization, head_layers=0)
  variables = {'params': {'encoder': params}, 'batch_stats': {'encoder': stats}}
  _check_against_model(variables, model, path)
  return variables, model


# ------------------------------------------------------ SimCLR's TF1 checkpoints.

_TF_LAYER = re.compile(r'^(conv2d|batch_normalization)(?:_(\d+))?/(\w+)$')
# SimCLR's convolutions have a kernel and no bias; its BatchNorms these four variables.
_TF_VARIABLES = {'conv2d': ('kernel',),
                 'batch_normalization': ('gamma', 'beta', 'moving_mean', 'moving_variance')}


def _tf_layer(name: str) -> re.Match | None:
  """`name` (below the encoder prefix) as a SimCLR layer's variable, or None."""
  m = _TF_LAYER.match(name)
  return m if m and m.group(3) in _TF_VARIABLES[m.group(1)] else None
_SLOTS = ('/Momentum', '/ExponentialMovingAverage', '/LARSOptimizer')


def read_tf_checkpoint(path: str) -> dict[str, np.ndarray]:
  """The variables of a TF checkpoint (a prefix such as `model.ckpt-250228`, or its folder).

  Optimiser slots (`.../Momentum`, ...) are left out: they double the memory and are
  never imported.
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'{path}: reading a TensorFlow checkpoint needs TensorFlow '
                          '(pip install tensorflow-cpu)') from None
  prefix = resolve_tf_checkpoint(path)
  logging.info('Reading the TensorFlow checkpoint %s', prefix)
  try:
    reader = tf.train.load_checkpoint(prefix)
    names = [n for n in reader.get_variable_to_shape_map() if not n.endswith(_SLOTS)]
    return {name: np.asarray(reader.get_tensor(name)) for name in names}
  except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: a shard cut short
    raise CheckpointError(f'{prefix}: not a readable TensorFlow checkpoint: '
                          f'{str(e).splitlines()[0]}') from e


def resolve_tf_checkpoint(path: str) -> str:
  """The checkpoint prefix `path` names: itself (or the prefix of its `.index` or
  `.data-*` file), or for a folder the checkpoint its `checkpoint` file names, else
  the one of the highest step (`model.ckpt-10` after `model.ckpt-9`)."""
  if not os.path.isdir(path):
    return tf_checkpoint_prefix(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  prefix = tf.train.latest_checkpoint(path)
  if prefix is not None:
    return prefix
  prefixes = [f[:-len('.index')] for f in os.listdir(path) if f.endswith('.index')]
  if not prefixes:
    raise CheckpointError(f'{path}: no TensorFlow checkpoint (*.index) in this folder')

  def step(name):
    found = re.search(r'-(\d+)$', name)
    return (int(found.group(1)) if found else -1, name)

  return os.path.join(path, max(prefixes, key=step))


def _tf_layers(variables: Mapping[str, np.ndarray], prefix: str
               ) -> tuple[list[str], list[str]]:
  """Names of the conv2d and batch_normalization layers under `prefix`, in creation order."""
  convs, bns = {}, {}
  for name in variables:
    if not name.startswith(prefix) or name.endswith(_SLOTS):
      continue
    m = _tf_layer(name[len(prefix):])
    if m:
      layer, index = m.group(1), int(m.group(2) or 0)
      (convs if layer == 'conv2d' else bns)[index] = f'{prefix}{layer}' + (
          f'_{m.group(2)}' if m.group(2) else '')
  for kind, found in (('conv2d', convs), ('batch_normalization', bns)):
    if sorted(found) != list(range(len(found))):
      missing = sorted(set(range(max(found, default=-1) + 1)) - set(found))
      raise CheckpointError(f'{prefix}{kind}_{missing[0]} is missing: the layers are not '
                            'numbered 0..N-1')
  return [convs[i] for i in sorted(convs)], [bns[i] for i in sorted(bns)]


def _layer_order(model: nn.Module, image_size: int = 64
                 ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]], dict[str, Any]]:
  """Paths of `model`'s convolutions and BatchNorms in the order they run, and its variables."""
  convs, bns = [], []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      if isinstance(context.module, nn.Conv):
        convs.append(context.module.scope.path)
      elif isinstance(context.module, nn.BatchNorm):
        bns.append(context.module.scope.path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=True))
  return convs, bns, variables


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _simclr_stem(variables, convs: list[str], path: str) -> tuple[float, bool, bool]:
  """(width_multiplier, selective kernels, cifar stem) from SimCLR's first convolutions."""
  if len(convs) < 2:
    raise CheckpointError(f'{path}: {len(convs)} conv2d layers under the encoder prefix: '
                          'not a SimCLR ResNet')
  first, second = variables[f'{convs[0]}/kernel'].shape, variables[f'{convs[1]}/kernel'].shape
  if first[:3] == (7, 7, 3):
    return first[3] / 64, False, False
  if first[:3] == (3, 3, 3) and second[:2] == (3, 3):  # ResNet-D stem: SimCLRv2 with SK
    return 2 * first[3] / 64, True, False
  if first[:3] == (3, 3, 3):
    return first[3] / 64, False, True
  raise CheckpointError(f'{path}: first kernel {convs[0]} has shape {first}: not a SimCLR '
                        'ResNet stem (7x7x3 or 3x3x3)')


def import_simclr_tf1(variables: Mapping[str, np.ndarray], path: str = 'checkpoint', *,
                      ema: bool = False, sk_ratio: float = 0.0625
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`({'params', 'batch_stats'}, model config)` of a SimCLR TF1 checkpoint's variables.

  `sk_ratio` is used when the checkpoint has selective kernels (SimCLRv2 always used
  0.0625; its value cannot be read off a checkpoint whose SK layers are clamped at 32
  channels). The SimCLRv2 projection head comes along when it is there.
  """
  top = 'ema_model/' if ema else ''
  encoder_prefix = f'{top}base_model/'
  if not any(name.startswith(encoder_prefix) for name in variables):
    have = sorted({n.split('/')[0] + '/' for n in variables})
    raise CheckpointError(f'{path}: no variables under {encoder_prefix!r} (it has '
                          f'{", ".join(have[:6])}); is it a SimCLR TF1 checkpoint?'
                          + ('' if ema else ' For the moving averages, --ema.'))
  tf_convs, tf_bns = _tf_layers(variables, encoder_prefix)
  width, sk, cifar_stem = _simclr_stem(variables, tf_convs, path)
  tf_shapes = [variables[f'{c}/kernel'].shape for c in tf_convs]
  match = None
  for depth in resnet.DEPTHS:
    if depth < 50 and sk:
      continue
    model = resnet.ResNet(depth=depth, width_multiplier=width, sk_ratio=sk_ratio if sk else 0.0,
                          cifar_stem=cifar_stem)
    convs, bns, abstract = _layer_order(model)
    shapes = [_get(abstract['params'], c)['kernel'].shape for c in convs]
    if len(convs) == len(tf_convs) and len(bns) == len(tf_bns) and shapes == tf_shapes:
      match = depth, convs, bns
      break
  if match is None:
    raise CheckpointError(
        f'{path}: its {len(tf_convs)} convolutions and {len(tf_bns)} BatchNorms under '
        f'{encoder_prefix!r} (stem {tf_shapes[0]}) match no ResNet of depth {resnet.DEPTHS} '
        f'at width {width:g}' + (f' with sk_ratio {sk_ratio:g}' if sk else ''))
  depth, convs, bns = match
  params, stats = {}, {}
  for ours, theirs in zip(convs, tf_convs):
    _put(params, ours + ('kernel',), np.asarray(variables[f'{theirs}/kernel'], np.float32))
  for ours, theirs in zip(bns, tf_bns):
    for name, tree, key in (('gamma', params, 'scale'), ('beta', params, 'bias'),
                            ('moving_mean', stats, 'mean'),
                            ('moving_variance', stats, 'var')):
      if f'{theirs}/{name}' not in variables:
        raise CheckpointError(f'{path}: lacks {theirs}/{name}')
      _put(tree, ours + (key,), np.asarray(variables[f'{theirs}/{name}'], np.float32))
  unused = sorted(n for n in variables if n.startswith(encoder_prefix) and not n.endswith(_SLOTS)
                  and not _tf_layer(n[len(encoder_prefix):]))
  if unused:
    raise CheckpointError(f'{path}: has {unused[0]}, which SimCLR\'s ResNet lacks '
                          f'({len(unused)} such variables)')
  imported = {'params': {'encoder': params}, 'batch_stats': {'encoder': stats}}
  head_prefix = f'{top}head_contrastive/'
  head = _simclr_head(variables, head_prefix, path)
  head_config = {'head_layers': 0}
  if head is not None:
    head_params, head_stats, head_config = head
    imported['params']['head'] = head_params
    imported['batch_stats']['head'] = head_stats
  imported_prefixes = (encoder_prefix,) + ((head_prefix,) if head is not None else ())
  left_out = [n for n in variables if not n.startswith(imported_prefixes)
              and not n.endswith(_SLOTS)]
  if left_out:  # the ImageNet classifier head_supervised/, global_step, the other weights
    scopes = collections.Counter(
        '/'.join(n.split('/')[:2 if n.startswith('ema_model/') else 1]) for n in left_out)
    logging.info('%s: left out %d variables beside the imported %s: %s', path, len(left_out),
                 'encoder and head' if head is not None else 'encoder',
                 ', '.join(scope if scope in variables else f'{scope}/* ({k})'
                           for scope, k in sorted(scopes.items())))
  model_config = _model_config(depth=depth, width_multiplier=width,
                               sk_ratio=sk_ratio if sk else 0.0, cifar_stem=cifar_stem,
                               **head_config)
  _check_against_model(imported, model_config, path)
  return imported, model_config


def _simclr_head(variables, prefix: str, path: str):
  """SimCLRv2's projection head (`nl_J/dense`, `nl_J/batch_normalization`), or None."""
  under = sorted(n for n in variables if n.startswith(prefix) and not n.endswith(_SLOTS))
  layers = sorted({int(m.group(1)) for n in under
                   for m in [re.match(rf'^{re.escape(prefix)}nl_(\d+)/', n)] if m})
  if not layers:
    if under:
      logging.warning('%s: %s is not a SimCLRv2 projection head (it has %s); importing the '
                      'encoder only', path, prefix.rstrip('/'), under[0])
    return None
  if layers != list(range(len(layers))):
    raise CheckpointError(f'{path}: head layers {prefix}nl_{layers} are not numbered 0..N-1')
  params, stats, consumed = {}, {}, set()
  for j in layers:
    base = f'{prefix}nl_{j}'
    last = j == len(layers) - 1
    needed = ['dense/kernel', 'batch_normalization/gamma', 'batch_normalization/moving_mean',
              'batch_normalization/moving_variance']
    if not last:
      needed.append('batch_normalization/beta')
    consumed.update(f'{base}/{n}' for n in needed)
    missing = [n for n in needed if f'{base}/{n}' not in variables]
    if missing or f'{base}/dense/bias' in variables:
      logging.warning('%s: %s is not a SimCLRv2 projection head (%s); importing the encoder '
                      'only', path, prefix.rstrip('/'),
                      f'lacks {base}/{missing[0]}' if missing else f'has {base}/dense/bias')
      return None
    params[f'dense{j}'] = {'kernel': np.asarray(variables[f'{base}/dense/kernel'], np.float32)}
    bn = {'scale': np.asarray(variables[f'{base}/batch_normalization/gamma'], np.float32)}
    if not last:
      bn['bias'] = np.asarray(variables[f'{base}/batch_normalization/beta'], np.float32)
    params[f'bn{j}'] = bn
    stats[f'bn{j}'] = {
        'mean': np.asarray(variables[f'{base}/batch_normalization/moving_mean'], np.float32),
        'var': np.asarray(variables[f'{base}/batch_normalization/moving_variance'], np.float32)}
  extra = [n for n in under if n not in consumed]
  if extra:
    logging.warning('%s: %s is not a SimCLRv2 projection head (it has %s, %d such '
                    'variables); importing the encoder only', path, prefix.rstrip('/'),
                    extra[0], len(extra))
    return None
  features = params['dense0']['kernel'].shape[0]
  hidden = params['dense0']['kernel'].shape[1] if len(layers) > 1 else 0
  config = {'head_layers': len(layers),
            'head_out_dim': int(params[f'dense{len(layers) - 1}']['kernel'].shape[1]),
            'head_hidden_dim': 0 if hidden in (0, features) else int(hidden)}
  return params, stats, config


# --------------------------------------------------------- BYOL's Haiku pickles.

_BYOL_STATE_FIELDS = ('online_params', 'target_params', 'online_state', 'target_state',
                      'opt_state')  # BYOL's experiment state, a named tuple in this order


def byol_network(checkpoint: Any, path: str, target: bool = False
                 ) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
  """(params, state) of the online network (the target network's with `target`) in a
  BYOL checkpoint: `{'experiment_state': (online_params, target_params, online_state,
  target_state, opt_state), 'step', 'rng'}`."""
  if not isinstance(checkpoint, Mapping) or 'experiment_state' not in checkpoint:
    have = sorted(map(str, checkpoint))[:6] if isinstance(checkpoint, Mapping) else [
        type(checkpoint).__name__]
    raise CheckpointError(f'{path}: no experiment_state (it holds {", ".join(have)}); is it '
                          'a checkpoint of BYOL\'s pretraining (pretrain_res50x1.pkl)?')
  state = checkpoint['experiment_state']
  if isinstance(state, haiku_pickle.Kept) and len(state.args) == len(_BYOL_STATE_FIELDS):
    state = dict(zip(_BYOL_STATE_FIELDS, state.args))
  which = 'target' if target else 'online'
  if not isinstance(state, Mapping) or f'{which}_params' not in state:
    raise CheckpointError(f'{path}: experiment_state is not BYOL\'s (online_params, '
                          'target_params, online_state, target_state, opt_state)')
  params, net_state = state[f'{which}_params'], state[f'{which}_state']
  for name, value in ((f'{which}_params', params), (f'{which}_state', net_state)):
    if not isinstance(value, Mapping):
      raise CheckpointError(f'{path}: experiment_state.{name} is a {type(value).__name__}, '
                            'not a mapping of Haiku modules')
  return params, net_state


def import_byol(params: Mapping[str, Any], state: Mapping[str, Any], path: str = 'checkpoint'
                ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`({'params', 'batch_stats'}, model config)` of BYOL's Haiku ResNet (`ResNetTorso`).

  Module names: `ROOT/~/initial_conv`, `ROOT/~/initial_batchnorm`,
  `ROOT/~/block_group_G/~/block_B/~/{conv_K, batchnorm_K, shortcut_conv,
  shortcut_batchnorm}` (ROOT `res_net50`, `res_net200`, ...), kernels HWIO; a
  BatchNorm's moving statistics are the zero-debiased `average` of its state
  `.../~/mean_ema` and `.../~/var_ema`. The projector, predictor and classifier
  beside the encoder are left out, and the log says so. Haiku pads every convolution
  and the max-pooling as TF's SAME: the model has `conv_padding='same'` (and SimCLR's
  max-pooling, also SAME); BYOL standardises its [0, 1] input with ImageNet's mean
  and std: `input_normalization='imagenet'`.
  """
  roots = sorted({k[:-len('/~/initial_conv')] for k in params
                  if isinstance(k, str) and k.endswith('/~/initial_conv')})
  if len(roots) != 1:
    raise CheckpointError(f'{path}: ' + ('no Haiku ResNet in it (a module ROOT/~/initial_conv)'
                                         if not roots else
                                         f'several Haiku ResNets in it: {", ".join(roots)}'))
  root = roots[0]
  used = set()

  def module(name, tree, where):
    if name not in tree or not isinstance(tree[name], Mapping):
      raise CheckpointError(f'{path}: lacks the {where} {name!r}, which BYOL\'s ResNet has')
    return tree[name]

  def array(name, tree, key, where='module'):
    values = module(name, tree, where)
    if key not in values:
      raise CheckpointError(f'{path}: {name} lacks {key!r}')
    value = values[key]
    if not isinstance(value, np.ndarray) or value.dtype.kind != 'f':
      raise CheckpointError(f'{path}: {name}/{key} is a {type(value).__name__}, not an array '
                            'of floats')
    return np.asarray(value, np.float32)

  def conv(name):
    used.add(name)
    kernel = array(name, params, 'w')
    if kernel.ndim != 4:
      raise CheckpointError(f'{path}: {name}/w has shape {kernel.shape}, not a 2D convolution\'s')
    return kernel

  def bn(name):
    """(params, batch_stats) of our `bn` module from Haiku's BatchNorm `name`."""
    used.add(name)
    stats = {ours: array(f'{name}/~/{ema}', state, 'average', 'state').reshape(-1)
             for ema, ours in (('mean_ema', 'mean'), ('var_ema', 'var'))}
    return ({'bn': {'scale': array(name, params, 'scale').reshape(-1),
                    'bias': array(name, params, 'offset').reshape(-1)}}, {'bn': stats})

  kind = ('bottleneck' if f'{root}/~/block_group_0/~/block_0/~/conv_2' in params
          else 'basic')
  # A block group past the fourth is named below, as a module the ResNet lacks.
  depth = _depth_from_blocks(
      params, lambda g: (f'{root}/~/block_group_{g}',
                         rf'{re.escape(root)}/~/block_group_{g}/~/block_(\d+)/~/'),
      kind, path, 'group')
  ours, stats = {}, {}
  stem = conv(f'{root}/~/initial_conv')
  if stem.shape[:3] != (7, 7, 3):
    raise CheckpointError(f'{path}: {root}/~/initial_conv/w has shape {stem.shape}; BYOL\'s '
                          'ResNets have a 7x7 stem on RGB images, (7, 7, 3, 64 x width)')
  ours['stem_conv'] = {'conv': {'kernel': stem}}
  ours['stem_bn'], stats['stem_bn'] = bn(f'{root}/~/initial_batchnorm')
  convs = 3 if kind == 'bottleneck' else 2
  for g, blocks in enumerate(resnet.layout(depth)[1]):
    for b in range(blocks):
      theirs = f'{root}/~/block_group_{g}/~/block_{b}/~/'
      block, block_stats = {}, {}
      for k in range(convs):
        block[f'conv{k + 1}'] = {'conv': {'kernel': conv(f'{theirs}conv_{k}')}}
        block[f'bn{k + 1}'], block_stats[f'bn{k + 1}'] = bn(f'{theirs}batchnorm_{k}')
      if b == 0:
        proj_bn, proj_bn_stats = bn(f'{theirs}shortcut_batchnorm')
        block['shortcut'] = {'proj': {'conv': {'kernel': conv(f'{theirs}shortcut_conv')}},
                             'proj_bn': proj_bn}
        block_stats['shortcut'] = {'proj_bn': proj_bn_stats}
      ours[f'group{g + 1}_block{b}'], stats[f'group{g + 1}_block{b}'] = block, block_stats
  under = sorted(str(k) for k in params if str(k).startswith(f'{root}/'))
  unused = [k for k in under if k not in used]
  if unused:
    raise CheckpointError(f'{path}: has {unused[0]}, which BYOL\'s ResNet-{depth} lacks '
                          f'({len(unused)} such modules)')
  left_out = sorted(str(k) for k in params if not str(k).startswith(f'{root}/'))
  if left_out:  # the projector, predictor and classifier
    scopes = collections.Counter(k.split('/')[0] for k in left_out)
    logging.info('%s: left out %d modules beside the ResNet: %s', path, len(left_out),
                 ', '.join(f'{scope} ({n})' for scope, n in sorted(scopes.items())))
  width = stem.shape[3] / 64
  model = _model_config(depth=depth, width_multiplier=width, conv_padding='same',
                        stem_pool_padding='same', identity_shortcuts=False,
                        input_normalization='imagenet', head_layers=0)
  variables = {'params': {'encoder': ours}, 'batch_stats': {'encoder': stats}}
  _check_against_model(variables, model, path)
  return variables, model


# ------------------------------------------------------------------- Both formats.


def _model_config(**overrides) -> dict[str, Any]:
  """`config.model` (the defaults of `config_schema`) with the imported architecture."""
  config = config_schema.pretrain().model.to_dict()
  config.update(overrides)
  config['width_multiplier'] = float(config['width_multiplier'])
  return config


_NOT_THIS_LAYOUT = 'the file is not in the layout this importer reads'


def _check_against_model(variables: dict[str, Any], model_config: dict[str, Any],
                         path: str) -> None:
  """Fails unless `variables` has exactly the shapes of the model `model_config` describes."""
  encoder = resnet.ResNet(**models.encoder_architecture(model_config))
  _, _, expected = _layer_order(encoder)
  for collection in ('params', 'batch_stats'):
    checkpointing.check_same_structure(expected[collection], variables[collection]['encoder'],
                                       f'{collection}/encoder', path, _NOT_THIS_LAYOUT)
  if 'head' in variables['params']:
    head = heads.ProjectionHead(num_layers=model_config['head_layers'],
                                out_dim=model_config['head_out_dim'],
                                hidden_dim=model_config['head_hidden_dim'])
    features = resnet.feature_dim(model_config['depth'], model_config['width_multiplier'])
    expected = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((2, features))))
    for collection in ('params', 'batch_stats'):
      checkpointing.check_same_structure(expected[collection], variables[collection]['head'],
                                         f'{collection}/head', path, _NOT_THIS_LAYOUT)


def tf_checkpoint_prefix(path: str) -> str:
  """`model.ckpt-N` for `model.ckpt-N.index` or `model.ckpt-N.data-00000-of-00001`."""
  prefix = re.sub(r'\.(index|data-\d+-of-\d+)$', '', path)
  return prefix if prefix != path and os.path.exists(f'{prefix}.index') else path


def detect_format(path: str) -> str:
  """'simclr_tf1' for a TF checkpoint (prefix, its `.index` or `.data-*` file, or a
  folder), 'byol' for a pickle that is not a PyTorch file, else 'torchvision'."""
  if os.path.isdir(path) or os.path.exists(f'{tf_checkpoint_prefix(path)}.index'):
    return 'simclr_tf1'
  if os.path.isfile(path):
    if is_safetensors_file(path):  # its header's length may start like a pickle
      return 'torchvision'
    return 'byol' if haiku_pickle.is_plain_pickle(path) else 'torchvision'
  raise CheckpointError(f'{path}: no such file, TF checkpoint prefix ({path}.index) or folder')


def load(path: str, kind: str | None = None, *, prefix: str | None = None, ema: bool = False,
         sk_ratio: float = 0.0625, input_normalization: str | None = None
         ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(variables, model config)` of the published model at `path`.

  `kind` is one of `FORMATS` (see the module doc), found from `path` when None.
  `input_normalization` overrides the format's ('imagenet' for torchvision's layout and
  BYOL, 'none' for SimCLR's [0, 1] inputs, what the metadata says for a file of
  `bigssl_med.export`). `ema`: SimCLR's moving averages, or BYOL's target network.
  """
  kind = kind or detect_format(path)
  if input_normalization is not None and input_normalization not in resnet.INPUT_NORMALIZATIONS:
    raise UserError(f'input normalization {input_normalization!r} is not one of '
                    f'{tuple(resnet.INPUT_NORMALIZATIONS)}')
  if kind == 'torchvision':
    exported = exported_architecture(path)
    if exported:
      logging.info('%s: written by bigssl_med.export: input_normalization=%s, '
                   'stem_pool_padding=%s', path, exported['input_normalization'],
                   exported['stem_pool_padding'])
    return import_torchvision(
        find_state_dict(read_weights_file(path), path, prefix), path,
        input_normalization=(input_normalization or exported.get('input_normalization')
                             or 'imagenet'),
        stem_pool_padding=exported.get('stem_pool_padding', 'symmetric'),
        conv_padding=exported.get('conv_padding', 'fixed'),
        width_multiplier=exported.get('width_multiplier'))
  if kind == 'simclr_tf1':
    variables, model_config = import_simclr_tf1(read_tf_checkpoint(path), path, ema=ema,
                                                sk_ratio=sk_ratio)
    model_config['input_normalization'] = input_normalization or 'none'
    return variables, model_config
  if kind == 'byol':
    variables, model_config = import_byol(
        *byol_network(haiku_pickle.read(path), path, target=ema), path)
    model_config['input_normalization'] = input_normalization or 'imagenet'
    return variables, model_config
  raise UserError(f'format {kind!r} is not one of {FORMATS}')


def write_workdir(workdir: str, variables: dict[str, Any], model_config: dict[str, Any],
                  source: dict[str, Any]) -> str:
  """Writes the imported model as `WORKDIR/checkpoints/0/model` and `WORKDIR/config.json`.

  Refuses a workdir that already holds checkpoints or a config.json, or any other
  file: nothing there is overwritten. Both are written into a folder beside the
  workdir, which then takes its name, so an import cut off half-way leaves no
  checkpoint without the config that describes it; such a folder, left by an import that
  was killed, is removed by the next import into the same workdir. Returns the checkpoint
  item's path.
  """
  workdir = os.path.realpath(workdir)  # a link to an empty folder: written through
  try:
    return _write_workdir(workdir, variables, model_config, source)
  except OSError as e:
    raise CheckpointError(f'{workdir}: cannot write the import: '
                          f'{checkpointing.first_line(e)}') from e


def _write_workdir(workdir: str, variables: dict[str, Any], model_config: dict[str, Any],
                   source: dict[str, Any]) -> str:
  if (os.path.isdir(os.path.join(workdir, 'checkpoints'))
      or os.path.exists(os.path.join(workdir, 'config.json'))):
    raise CheckpointError(f'{workdir}: already holds a run (checkpoints/ or config.json); '
                          'import into a new workdir')
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise CheckpointError(f'{workdir}: exists and is not an empty folder; import into a new '
                          'workdir')
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  prefix = f'.{os.path.basename(workdir)}.import-'
  staging_lib.remove_dead(parent, prefix, 'an import')
  staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
  lock = staging_lib.hold(staging)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, 'checkpoints', '0', 'model'),
                      jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    checkpointer.close()
    workdir_lib.write_json(os.path.join(staging, 'config.json'),
                           {'trainer': 'imported', 'seed': 0, 'model': model_config,
                            'source': source})
    files.usual_mode(staging, folder=True)
    files.sync_tree(staging)  # on disk before it takes the workdir's name
    if os.path.isdir(workdir):
      os.rmdir(workdir)  # empty (checked above)
    staging_lib.release(staging, lock)
    lock = None
    os.rename(staging, workdir)
  finally:
    if lock is not None:
      lock.close()
    shutil.rmtree(staging, ignore_errors=True)
  return os.path.join(workdir, 'checkpoints', '0', 'model')


def describe(model_config: Mapping[str, Any]) -> str:
  """'ResNet-50 x1 SK' and the like."""
  text = f'ResNet-{model_config["depth"]} x{model_config["width_multiplier"]:g}'
  if model_config['sk_ratio']:
    text += ' SK'
  if model_config['cifar_stem']:
    text += ' (CIFAR stem)'
  return text


def model_flags(model_config: Mapping[str, Any]) -> str:
  """The `--config.model.KEY=VALUE` flags that give a run the imported architecture."""
  keys = models.ARCHITECTURE_KEYS
  defaults = config_schema.pretrain().model
  return ' '.join(f'--config.model.{k}={model_config[k]}' for k in keys
                  if model_config[k] != defaults[k] or k in ('depth', 'width_multiplier'))


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status."""
  parser = argparse.ArgumentParser(
      prog='python -m bigssl_med.convert',
      description='Imports a published ImageNet ResNet (torchvision layout, SimCLR TF1 or '
                  'BYOL) as a workdir that --config.init_from accepts.')
  parser.add_argument('--checkpoint', required=True,
                      help='a PyTorch or .safetensors file, a BYOL .pkl file, or a TF '
                           'checkpoint prefix (model.ckpt-N) or folder')
  parser.add_argument('--workdir', required=True, help='new folder to write the model into')
  parser.add_argument('--format', choices=FORMATS, default=None,
                      help='default: simclr_tf1 for a TF checkpoint, byol for a pickle, '
                           'torchvision for other files')
  parser.add_argument('--prefix', default=None,
                      help="torchvision: the state dict's key prefix, where the file holds "
                           "several networks (e.g. 'module.encoder_q.')")
  parser.add_argument('--ema', action='store_true',
                      help='simclr_tf1: the moving-average weights (ema_model/); byol: the '
                           'target network (the online network\'s moving average) instead of '
                           'the online network')
  parser.add_argument('--input_normalization', choices=tuple(resnet.INPUT_NORMALIZATIONS),
                      default=None,
                      help="how the model's input was standardised (default: 'imagenet' for "
                           "torchvision's layout and BYOL, 'none' for SimCLR's [0, 1] images)")
  parser.add_argument('--sk_ratio', type=float, default=0.0625,
                      help='simclr_tf1: the selective-kernel ratio, where there are SK layers '
                           '(default: SimCLRv2\'s 0.0625)')
  args = parser.parse_args(argv)
  cli.log_info_to_stderr()
  try:
    format_ = args.format or detect_format(args.checkpoint)
    variables, model_config = load(args.checkpoint, format_, prefix=args.prefix, ema=args.ema,
                                   sk_ratio=args.sk_ratio,
                                   input_normalization=args.input_normalization)
    checkpoint = (resolve_tf_checkpoint(args.checkpoint) if format_ == 'simclr_tf1'
                  else args.checkpoint)  # a folder's: the checkpoint read
    source = {'checkpoint': os.path.abspath(checkpoint), 'format': format_,
              'prefix': args.prefix, 'ema': args.ema}
    write_workdir(args.workdir, variables, model_config, source)
  except UserError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  parts = 'encoder + projection head' if 'head' in variables['params'] else 'encoder'
  print(f'{args.workdir}: {describe(model_config)} {parts} from {args.checkpoint}\n'
        f'use it with: --config.init_from={args.workdir} {model_flags(model_config)}'
        + ('' if 'head' in variables['params'] else
           ' and a fresh head: --config.head_layers_kept=0 (finetune) or '
           '--config.init_head=False (pretrain)'))
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main))
