"""Importing published ResNets (`bigssl_med.convert`) against float64 NumPy references.

The references (`reference_resnets.py`) implement torchvision's and SimCLR's TF1
ResNets from their own definitions; the PyTorch files in `tests/data` were written by
`torch.save` (`tests/data/make_torch_fixtures.py`); the TF checkpoints are written
here with TensorFlow's name-based saver op, under SimCLR's variable names.
"""

import collections
import fcntl
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigssl_med import checkpointing, convert, models, parallel
from bigssl_med.errors import CheckpointError
from bigssl_med.models import heads, resnet
from bigssl_med.trainers import finetune
import reference_resnets as ref
from test_finetune import colours, tiny_config  # noqa: F401  pylint: disable=unused-import

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
WIDTH = 1 / 32  # of the torchvision fixtures


def _encoder_features(variables, model_config, images, train=False, **overrides):
  kwargs = dict(depth=model_config['depth'], width_multiplier=model_config['width_multiplier'],
                sk_ratio=model_config['sk_ratio'], cifar_stem=model_config['cifar_stem'],
                stem_pool_padding=model_config['stem_pool_padding'],
                identity_shortcuts=model_config['identity_shortcuts'],
                input_normalization=model_config['input_normalization'],
                conv_padding=model_config['conv_padding'])
  kwargs.update(overrides)
  encoder = models.ResNet(**kwargs)
  with jax.default_matmul_precision('highest'):
    out = encoder.apply({c: variables[c]['encoder'] for c in ('params', 'batch_stats')},
                        jnp.asarray(images, jnp.float32), train=train,
                        mutable=['batch_stats'] if train else False)
  return np.asarray(out[0] if train else out, np.float64)


def _relative_error(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def _images(n=2, size=64, seed=0):
  # 64 pixels: the stem's output is even-sized, where the two max-pool paddings differ.
  return np.random.default_rng(seed).normal(size=(n, size, size, 3))


def _rgb(n=2, size=64, seed=0):
  """[0, 1] images, and the same standardised as torchvision's training did."""
  images = np.random.default_rng(seed).uniform(size=(n, size, size, 3))
  mean, std = (np.asarray(v, np.float64) for v in resnet.INPUT_NORMALIZATIONS['imagenet'])
  return images, (images - mean) / std


# ------------------------------------------------------------------- PyTorch files.


def test_torch_reader_reads_views_dtypes_and_nesting_without_pytorch(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` fails: the zip path only
  obj = convert.read_torch_file(os.path.join(DATA, 'torch_tensors.pth'))
  np.testing.assert_array_equal(obj['transposed'], np.arange(12.0).reshape(3, 4).T)
  np.testing.assert_array_equal(obj['slice'], [3.0, 4.0, 5.0, 6.0])
  np.testing.assert_array_equal(obj['same_storage'], np.arange(20.0).reshape(4, 5)[1:, ::2])
  assert obj['bfloat16'].dtype.name == 'bfloat16'
  np.testing.assert_array_equal(obj['bfloat16'].astype(np.float32), [1.5, -2.25, 3.0])
  assert obj['float16'].dtype == np.float16 and list(obj['float16']) == [0.5, -1.0]
  assert obj['int64_scalar'].shape == () and obj['int64_scalar'].dtype == np.int64
  assert int(obj['int64_scalar']) == 7
  np.testing.assert_array_equal(obj['parameter'], [0.25, 0.25])
  assert obj['nested']['inner']['x'].dtype == np.float64 and obj['epoch'] == 3


def test_torch_reader_reads_a_state_dict_exactly():
  state = convert.read_torch_file(os.path.join(DATA, 'torchvision_r50_w32.pth'))
  want = ref.torchvision_state_dict(50, WIDTH, seed=1, num_classes=10)
  assert list(state) == list(want)
  for key, value in want.items():
    assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
    np.testing.assert_array_equal(state[key], value, err_msg=key)


class _MakesAFolder:
  """Unpickled by pickle itself, this would call os.makedirs(folder)."""

  def __init__(self, folder):
    self.folder = folder

  def __reduce__(self):
    return os.makedirs, (self.folder,)


def test_torch_reader_runs_no_code_and_refuses_old_files_without_pytorch(tmp_path, monkeypatch):
  evil = tmp_path / 'evil.pth'
  made = tmp_path / 'made_by_the_file'
  with zipfile.ZipFile(evil, 'w') as z:
    z.writestr('evil/data.pkl', pickle.dumps(
        {'run': _MakesAFolder(os.fspath(made)), 'counts': collections.Counter('ab')},
        protocol=2))
  obj = convert.read_torch_file(os.fspath(evil))
  assert not made.exists()
  assert isinstance(obj['run'], convert.Opaque) and isinstance(obj['counts'], convert.Opaque)
  assert type(obj['counts']).__name__ == 'collections.Counter'
  old = tmp_path / 'old.pth'
  old.write_bytes(pickle.dumps({'conv1.weight': 1}))
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(CheckpointError, match=r'old\.pth: not a complete zip file .* cut short'
                                            r'.* needs PyTorch'):
    convert.read_torch_file(os.fspath(old))
  with pytest.raises(CheckpointError, match='no such file'):
    convert.read_torch_file(os.fspath(tmp_path / 'missing.pth'))


def test_a_damaged_torch_file_is_a_one_line_error(tmp_path):
  data = bytearray(open(os.path.join(DATA, 'torchvision_r18_w32.pth'), 'rb').read())
  with zipfile.ZipFile(os.path.join(DATA, 'torchvision_r18_w32.pth')) as archive:
    entry = next(i for i in archive.infolist() if i.filename.endswith('/data/0'))
  name_length, extra_length = struct.unpack(
      '<HH', data[entry.header_offset + 26:entry.header_offset + 30])  # the local header's
  start = entry.header_offset + 30 + name_length + extra_length
  data[start + 10] ^= 0xFF  # one byte of a tensor: the zip's CRC no longer matches
  damaged = tmp_path / 'damaged.pth'
  damaged.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=r'damaged\.pth: cannot read its tensors \(damaged '
                                            r'or cut short\?\): Bad CRC-32') as e:
    convert.read_torch_file(os.fspath(damaged))
  assert '\n' not in str(e.value)


def test_a_tensor_larger_than_its_stored_data_is_a_one_line_error(tmp_path):
  source = os.path.join(DATA, 'torchvision_r18_w32.pth')
  damaged = tmp_path / 'cut.pth'
  with zipfile.ZipFile(source) as archive, zipfile.ZipFile(damaged, 'w') as out:
    largest = max((i for i in archive.infolist() if '/data/' in i.filename),
                  key=lambda i: i.file_size).filename
    for info in archive.infolist():  # a valid zip whose largest tensor lost its data
      data = archive.read(info.filename)
      out.writestr(info, data[:8] if info.filename == largest else data)
  with pytest.raises(CheckpointError, match=r'cut\.pth: cannot read its tensors .* needs '
                                            r'\d+ elements of its storage, which has 2') as e:
    convert.read_torch_file(os.fspath(damaged))
  assert '\n' not in str(e.value)


def test_a_training_checkpoint_with_args_beside_its_state_dict_is_read(monkeypatch, caplog):
  """As timm's and torchvision's training scripts save: `args`, epoch and optimiser
  beside a `module.`-prefixed state dict."""
  monkeypatch.setitem(sys.modules, 'torch', None)
  path = os.path.join(DATA, 'training_checkpoint_r18_w32.pth')
  obj = convert.read_torch_file(path)
  assert type(obj['args']).__name__ == 'argparse.Namespace' and obj['epoch'] == 3
  got, model_config = convert.load(path, prefix='module.')
  want, want_config = convert.load(os.path.join(DATA, 'torchvision_r18_w32.pth'))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert model_config == want_config


def test_an_object_inside_the_state_dict_is_an_error_naming_its_key():
  state = {'conv1.weight': convert.Opaque(), 'layer1.0.conv1.weight': np.zeros(1)}
  with pytest.raises(CheckpointError, match=r'f\.pth: conv1\.weight holds a .*Opaque, not a '
                                            'tensor'):
    convert.find_state_dict(state, 'f.pth')


def test_an_old_pytorch_training_checkpoint_is_read_with_pytorch():
  pytest.importorskip('torch', reason='PyTorch reads files older than PyTorch 1.6')
  path = os.path.join(DATA, 'legacy_checkpoint_r18_w32.pth')
  obj = convert.read_torch_file(path)
  assert (obj['epoch'], obj['arch']) == (200, 'resnet18')
  got, _ = convert.load(path, prefix='module.')
  want, _ = convert.load(os.path.join(DATA, 'torchvision_r18_w32.pth'))
  jax.tree.map(np.testing.assert_array_equal, got, want)


# ------------------------------------------------------------- torchvision's layout.


@pytest.mark.parametrize('depth', [18, 50])
def test_torchvision_import_computes_torchvisions_features(depth):
  path = os.path.join(DATA, f'torchvision_r{depth}_w32.pth')
  variables, model_config = convert.load(path)
  assert (model_config['depth'], model_config['width_multiplier']) == (depth, WIDTH)
  assert model_config['stem_pool_padding'] == 'symmetric' and model_config['head_layers'] == 0
  assert model_config['input_normalization'] == 'imagenet'
  images, standardised = _rgb()
  want = ref.torchvision_features(convert.read_torch_file(path), standardised, depth)
  assert _relative_error(_encoder_features(variables, model_config, images), want) < 1e-5
  # SimCLR's max-pooling windows sit one pixel off torchvision's: a different function.
  shifted = _encoder_features(variables, model_config, images, stem_pool_padding='same')
  assert _relative_error(shifted, want) > 1e-2
  # So do [0, 1] images fed to a model trained on standardised ones.
  raw = _encoder_features(variables, model_config, images, input_normalization='none')
  assert _relative_error(raw, want) > 1e-2


def test_torchvision_import_reads_safetensors_files(tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  state = ref.torchvision_state_dict(18, WIDTH, seed=3, num_classes=5)
  path = os.fspath(tmp_path / 'model.safetensors')
  safetensors_numpy.save_file(state, path)
  variables, model_config = convert.load(path)
  expected, _ = convert.import_torchvision(state)
  jax.tree.map(np.testing.assert_array_equal, variables, expected)
  assert model_config['depth'] == 18
  (tmp_path / 'bad.safetensors').write_text('not tensors')
  with pytest.raises(CheckpointError, match=r'bad\.safetensors: not a readable safetensors'):
    convert.load(os.fspath(tmp_path / 'bad.safetensors'))


def test_the_command_shows_what_an_import_leaves_out(tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  state = ref.torchvision_state_dict(18, WIDTH, seed=3, num_classes=5)  # with fc.*
  path = os.fspath(tmp_path / 'model.safetensors')
  safetensors_numpy.save_file(state, path)
  result = subprocess.run([sys.executable, '-m', 'bigssl_med.convert', '--checkpoint', path,
                           '--workdir', os.fspath(tmp_path / 'imported')],
                          capture_output=True, text=True, check=False, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(DATA)))  # the repository
  assert result.returncode == 0, result.stderr
  assert 'model.safetensors: left out 2 tensors beside the ResNet: fc.* (2)' in result.stderr


def test_torchvision_import_finds_wrapped_and_prefixed_state_dicts():
  state = ref.torchvision_state_dict(18, WIDTH, seed=3)
  plain, _ = convert.import_torchvision(state)
  wrapped = {'epoch': 90, 'state_dict': {f'module.{k}': v for k, v in state.items()}}
  found = convert.find_state_dict(wrapped, 'ckpt.pth')
  assert list(found) == list(state)
  moco = {'state_dict': {f'module.encoder_{q}.{k}': v for q in 'qk' for k, v in state.items()}}
  with pytest.raises(CheckpointError, match=r"several ResNets.*'module.encoder_k.'.*--prefix"):
    convert.find_state_dict(moco, 'moco.pth')
  chosen = convert.find_state_dict(moco, 'moco.pth', prefix='module.encoder_q.')
  variables, _ = convert.import_torchvision(chosen)
  jax.tree.map(np.testing.assert_array_equal, variables, plain)
  with pytest.raises(CheckpointError, match="no ResNet state dict.*'trunk.conv1.weight'"):
    convert.find_state_dict(moco, 'moco.pth', prefix='trunk.')
  # The same network twice without a key prefix: the dict path tells them apart.
  ema = {k: v + 1.0 for k, v in state.items()}
  twice = {'state_dict': state, 'state_dict_ema': ema}
  with pytest.raises(CheckpointError, match=r"key prefixes 'state_dict/', 'state_dict_ema/'"):
    convert.find_state_dict(twice, 'timm.pth')
  chosen = convert.find_state_dict(twice, 'timm.pth', prefix='state_dict_ema/')
  np.testing.assert_array_equal(chosen['conv1.weight'], ema['conv1.weight'])


def test_torchvision_import_leaves_out_and_logs_what_sits_beside_the_resnet(caplog):
  state = ref.torchvision_state_dict(18, WIDTH, seed=3)
  plain, _ = convert.import_torchvision(state)
  rng = np.random.default_rng(1)
  swav = {'module.' + k: v for k, v in state.items()}  # SwAV's layout: head and prototypes
  swav.update({'module.projection_head.0.weight': rng.normal(size=(8, 16)),
               'module.projection_head.0.bias': rng.normal(size=8),
               'module.projection_head.1.running_mean': rng.normal(size=8),
               'module.prototypes.weight': rng.normal(size=(30, 8)),
               'module.fc.weight': rng.normal(size=(10, 16))})
  with caplog.at_level(logging.INFO):
    variables, _ = convert.import_torchvision(convert.find_state_dict(swav, 'swav.pth'),
                                              'swav.pth')
  jax.tree.map(np.testing.assert_array_equal, variables, plain)
  assert ('swav.pth: left out 5 tensors beside the ResNet: fc.* (1), projection_head.* (3), '
          'prototypes.* (1)') in caplog.text


@pytest.mark.parametrize('depth', [18, 50])
def test_torchvision_import_is_torchvisions_network_in_training_mode_too(depth):
  path = os.path.join(DATA, f'torchvision_r{depth}_w32.pth')
  variables, model_config = convert.load(path)
  # ResNet-18's first block has torchvision's identity shortcut, not a projection.
  assert model_config['identity_shortcuts'] == (depth == 18)
  assert ('shortcut' in variables['params']['encoder']['group1_block0']) == (depth == 50)
  images, standardised = _rgb()
  want = ref.torchvision_features(convert.read_torch_file(path), standardised, depth, train=True)
  got = _encoder_features(variables, model_config, images, train=True)
  assert _relative_error(got, want) < 1e-4


@pytest.mark.parametrize('edit, message', [
    (lambda s: s.pop('layer2.0.bn1.running_var'), 'lacks layer2.0.bn1.running_var'),
    (lambda s: s.update({'layer2.0.se.weight': np.ones(3)}), 'has layer2.0.se.weight'),
    (lambda s: s.update({'conv1.weight': np.ones((2, 3, 3, 3), np.float32)}), '7x7 stem'),
    (lambda s: s.update({'layer3.0.conv2.weight': np.ones((16, 8, 3, 3), np.float32)}),
     r'group3_block0.*conv2.*has shape \(3, 3, 8, 16\)'),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith('layer4.1.')], 'match no ResNet'),
])
def test_torchvision_import_names_what_does_not_fit(edit, message):
  state = ref.torchvision_state_dict(18, WIDTH, seed=3)
  edit(state)
  with pytest.raises(CheckpointError, match=message):
    convert.import_torchvision(state, 'r18.pth')


# ------------------------------------------------------------- SimCLR's TF1 layout.


@pytest.mark.parametrize('change, message', [
    ('wide', r'layer1\.0\.conv1\.weight has 4 channels where the stem has 2: a wide ResNet'),
    ('grouped', r'layer1\.0\.conv2\.weight has shape \(2, 1, 3, 3\), a grouped convolution '
                r'\(ResNeXt\)')])
def test_wide_resnets_and_resnext_are_named(change, message):
  state = ref.torchvision_state_dict(50, WIDTH, seed=1)
  if change == 'wide':  # wide_resnet50_2: twice the bottleneck channels
    state['layer1.0.conv1.weight'] = np.zeros((4, 2, 1, 1), np.float32)
  else:
    state['layer1.0.conv2.weight'] = np.zeros((2, 1, 3, 3), np.float32)
  with pytest.raises(CheckpointError, match=message):
    convert.import_torchvision(state, 'f.pth')


def _save_tf_checkpoint(variables, prefix):
  tf = pytest.importorskip('tensorflow', reason='TensorFlow writes the SimCLR fixtures')
  names = sorted(variables)
  tf.raw_ops.SaveV2(prefix=os.fspath(prefix), tensor_names=names,
                    shape_and_slices=[''] * len(names), tensors=[variables[n] for n in names])
  return os.fspath(prefix)


@pytest.mark.parametrize('depth, width, sk_ratio, cifar_stem', [
    (50, 1 / 16, 0.0, False),      # SimCLR v1 / v2 without selective kernels
    (50, 1 / 8, 0.0625, False),    # SimCLRv2 with SK: ResNet-D stem and shortcuts
    (18, 1 / 8, 0.0, True),        # a CIFAR stem
])
def test_simclr_tf1_import_computes_simclrs_features_and_head(tmp_path, depth, width, sk_ratio,
                                                              cifar_stem):
  tf_vars = ref.simclr_tf1_variables(depth, width, sk_ratio, seed=2, cifar_stem=cifar_stem,
                                     head_out_dim=16)
  _save_tf_checkpoint(tf_vars, tmp_path / 'model.ckpt-250228')
  variables, model_config = convert.load(os.fspath(tmp_path))  # the folder finds the prefix
  assert (model_config['depth'], model_config['width_multiplier'], model_config['sk_ratio'],
          model_config['cifar_stem']) == (depth, width, sk_ratio, cifar_stem)
  assert (model_config['stem_pool_padding'], model_config['input_normalization']) == ('same',
                                                                                  'none')
  assert (model_config['head_layers'], model_config['head_out_dim'],
          model_config['head_hidden_dim']) == (3, 16, 0)
  images = _images()
  want = ref.simclr_tf1_features(tf_vars, images, depth, sk_ratio, cifar_stem=cifar_stem)
  features = _encoder_features(variables, model_config, images)
  assert _relative_error(features, want) < 1e-4
  head = heads.ProjectionHead(num_layers=3, out_dim=16)
  with jax.default_matmul_precision('highest'):
    outputs = head.apply({c: variables[c]['head'] for c in ('params', 'batch_stats')},
                         jnp.asarray(features, jnp.float32), train=False)
  for got, expected in zip(outputs[1:], ref.simclr_tf1_head(tf_vars, features)[1:]):
    assert _relative_error(np.asarray(got, np.float64), expected) < 1e-5


def test_simclr_tf1_import_logs_what_it_leaves_out(caplog):
  variables = ref.simclr_tf1_variables(50, 1 / 16, seed=2, head_layers=2)  # with extras
  with caplog.at_level(logging.INFO):
    imported, _ = convert.import_simclr_tf1(variables, 'model.ckpt-1')
  assert sorted(imported['params']) == ['encoder', 'head']
  assert ('model.ckpt-1: left out 3 variables beside the imported encoder and head: '
          'global_step, head_supervised/* (2)') in caplog.text


@pytest.mark.parametrize('extra, found', [
    ('head_contrastive/nl_1/batch_normalization/beta', 'nl_1/batch_normalization/beta'),
    ('head_contrastive/nl_0/extra/kernel', 'nl_0/extra/kernel'),
])
def test_simclr_tf1_head_with_other_variables_is_left_out_with_a_warning(caplog, extra, found):
  variables = ref.simclr_tf1_variables(50, 1 / 16, seed=2, extras=False, head_layers=2)
  variables[extra] = np.ones(4, np.float32)
  with caplog.at_level(logging.INFO):
    imported, model_config = convert.import_simclr_tf1(variables, 'model.ckpt-1')
  assert 'head' not in imported['params'] and model_config['head_layers'] == 0
  assert f'is not a SimCLRv2 projection head (it has head_contrastive/{found}' in caplog.text
  assert 'left out' in caplog.text and 'head_contrastive/*' in caplog.text


def test_simclr_tf1_linear_head_is_left_out_with_a_warning(caplog):
  variables = ref.simclr_tf1_variables(50, 1 / 16, seed=2, extras=False, head_layers=0)
  variables['head_contrastive/l_0/dense/kernel'] = np.ones((128, 128), np.float32)
  with caplog.at_level(logging.WARNING):
    imported, _ = convert.import_simclr_tf1(variables, 'model.ckpt-1')
  assert 'head' not in imported['params']
  assert 'head_contrastive is not a SimCLRv2 projection head (it has ' \
         'head_contrastive/l_0/dense/kernel)' in caplog.text


def test_simclr_tf1_index_and_data_files_name_the_checkpoint(tmp_path):
  variables = ref.simclr_tf1_variables(18, 1 / 8, seed=2, extras=False, head_layers=0,
                                       cifar_stem=True)
  prefix = _save_tf_checkpoint(variables, tmp_path / 'model.ckpt-7')
  expected, _ = convert.load(prefix)
  for path in (f'{prefix}.index', f'{prefix}.data-00000-of-00001'):
    assert convert.detect_format(path) == 'simclr_tf1'
    got, _ = convert.load(path)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
  data = tmp_path / 'model.ckpt-7.data-00000-of-00001'
  data.write_bytes(data.read_bytes()[:100])  # a download cut short
  with pytest.raises(CheckpointError, match=r'model\.ckpt-7: not a readable TensorFlow '
                                            r'checkpoint') as e:
    convert.load(prefix)
  assert '\n' not in str(e.value)


def test_a_tf_folder_without_its_checkpoint_file_gives_its_highest_step(tmp_path, capsys):
  for step, seed in ((9, 1), (10, 2)):
    variables = ref.simclr_tf1_variables(18, 1 / 8, seed=seed, extras=False, head_layers=0,
                                         cifar_stem=True)
    _save_tf_checkpoint(variables, tmp_path / 'ckpts' / f'model.ckpt-{step}')
  folder = os.fspath(tmp_path / 'ckpts')
  assert convert.resolve_tf_checkpoint(folder) == os.path.join(folder, 'model.ckpt-10')
  got, _ = convert.load(folder)
  want, _ = convert.load(os.path.join(folder, 'model.ckpt-10'))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  workdir = tmp_path / 'imported'
  assert convert.main([f'--checkpoint={folder}', f'--workdir={workdir}']) == 0
  config = json.loads((workdir / 'config.json').read_text())
  assert config['source']['checkpoint'] == os.path.join(folder, 'model.ckpt-10')


def test_simclr_tf1_ema_weights_and_encoder_only_checkpoints(tmp_path):
  online = ref.simclr_tf1_variables(50, 1 / 16, seed=4, extras=False, head_layers=2)
  average = ref.simclr_tf1_variables(50, 1 / 16, seed=5, extras=False, head_layers=2)
  both = dict(online)
  both.update({f'ema_model/{k}': v for k, v in average.items()})
  prefix = _save_tf_checkpoint(both, tmp_path / 'model.ckpt-1')
  ema, model_config = convert.load(prefix, ema=True)
  assert model_config['head_layers'] == 2
  np.testing.assert_array_equal(ema['params']['encoder']['stem_conv']['conv']['kernel'],
                                average['base_model/conv2d/kernel'])
  plain, _ = convert.load(prefix)
  np.testing.assert_array_equal(plain['params']['encoder']['stem_conv']['conv']['kernel'],
                                online['base_model/conv2d/kernel'])
  encoder_only = {k: v for k, v in online.items() if k.startswith('base_model/')}
  prefix = _save_tf_checkpoint(encoder_only, tmp_path / 'encoder' / 'model.ckpt-1')
  variables, model_config = convert.load(prefix)
  assert 'head' not in variables['params'] and model_config['head_layers'] == 0


@pytest.mark.parametrize('edit, kwargs, message', [
    (lambda v: v.pop('base_model/batch_normalization_7/moving_mean'), {},
     'lacks base_model/batch_normalization_7/moving_mean'),
    (lambda v: v.pop('base_model/conv2d_5/kernel'), {}, 'conv2d_5 is missing'),
    (lambda v: v.update({'base_model/dense/kernel': np.ones(2)}), {},
     'has base_model/dense/kernel'),
    (lambda v: v.update({'base_model/conv2d_3/bias': np.ones(2)}), {},
     'has base_model/conv2d_3/bias'),
    (lambda v: v.update({'base_model/batch_normalization_2/renorm_mean': np.ones(2)}), {},
     'has base_model/batch_normalization_2/renorm_mean'),
    (lambda v: None, {'ema': True}, r"no variables under 'ema_model/base_model/'"),
    (lambda v: None, {'sk_ratio': 1.0}, 'match no ResNet .* sk_ratio 1'),
])
def test_simclr_tf1_import_names_what_does_not_fit(edit, kwargs, message):
  variables = ref.simclr_tf1_variables(50, 1 / 8, 0.0625, seed=6)
  edit(variables)
  with pytest.raises(CheckpointError, match=message):
    convert.import_simclr_tf1(variables, 'model.ckpt-1', **kwargs)


# ----------------------------------------------------------- The command and init_from.


def test_command_writes_a_workdir_that_init_from_accepts(tmp_path, capsys):
  out = tmp_path / 'imported'
  path = os.path.join(DATA, 'torchvision_r18_w32.pth')
  assert convert.main(['--checkpoint', path, '--workdir', os.fspath(out)]) == 0
  printed = capsys.readouterr().out
  assert 'ResNet-18 x0.03125 encoder' in printed
  assert '--config.model.stem_pool_padding=symmetric' in printed
  assert '--config.model.input_normalization=imagenet' in printed
  config = json.loads((out / 'config.json').read_text())
  assert config['trainer'] == 'imported' and config['source']['format'] == 'torchvision'
  assert config['model']['stem_pool_padding'] == 'symmetric'
  assert config['model']['input_normalization'] == 'imagenet'
  unscaled = tmp_path / 'unscaled'
  assert convert.main(['--checkpoint', path, '--workdir', os.fspath(unscaled),
                       '--input_normalization', 'none']) == 0
  assert 'input_normalization' not in capsys.readouterr().out
  config = json.loads((unscaled / 'config.json').read_text())
  assert config['model']['input_normalization'] == 'none'
  expected, _ = convert.load(path)
  loaded = checkpointing.load_model_variables(os.fspath(out),
                                              parallel.replicated(parallel.data_mesh()))
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  # A second import into the same workdir leaves the first untouched.
  before = sorted(p.relative_to(out) for p in out.rglob('*'))
  assert convert.main(['--checkpoint', path, '--workdir', os.fspath(out)]) == 2
  assert 'already holds a run' in capsys.readouterr().err
  assert sorted(p.relative_to(out) for p in out.rglob('*')) == before
  assert convert.main(['--checkpoint', os.fspath(tmp_path / 'nothing'),
                       '--workdir', os.fspath(tmp_path / 'x')]) == 2
  assert 'no such file' in capsys.readouterr().err


def test_an_import_cut_off_before_its_config_leaves_no_workdir(tmp_path, monkeypatch):
  class Killed(BaseException):
    pass

  def dying(path, value):
    raise Killed  # after the checkpoint, before config.json
  variables, model_config = convert.load(os.path.join(DATA, 'torchvision_r18_w32.pth'))
  workdir = tmp_path / 'imported'
  workdir.mkdir()  # an empty folder is fine
  monkeypatch.setattr(convert.workdir_lib, 'write_json', dying)
  with pytest.raises(Killed):
    convert.write_workdir(os.fspath(workdir), variables, model_config, {})
  monkeypatch.undo()
  # Nothing in the workdir: init_from finds no checkpoint without its config, and a
  # second import goes ahead.
  assert list(workdir.iterdir()) == []
  convert.write_workdir(os.fspath(workdir), variables, model_config, {})
  assert sorted(p.name for p in workdir.iterdir()) == ['checkpoints', 'config.json']
  assert oct(workdir.stat().st_mode & 0o777) != oct(0o700)
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'README').write_text('mine')
  with pytest.raises(CheckpointError, match='exists and is not an empty folder'):
    convert.write_workdir(os.fspath(tmp_path / 'notes'), variables, model_config, {})


def test_workdir_paths_that_cannot_be_written_are_one_line_errors(tmp_path, capsys):
  source = os.path.join(DATA, 'torchvision_r18_w32.pth')
  (tmp_path / 'afile').write_text('')
  assert convert.main([f'--checkpoint={source}', f'--workdir={tmp_path}/afile/sub']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: ') and 'afile/sub: cannot write the import' in err[-1]
  # A link to an empty folder is written through.
  (tmp_path / 'target').mkdir()
  os.symlink(tmp_path / 'target', tmp_path / 'link')
  assert convert.main([f'--checkpoint={source}', f'--workdir={tmp_path}/link']) == 0
  assert (tmp_path / 'target' / 'config.json').is_file()


def test_staging_left_by_a_killed_import_is_removed_and_a_live_one_kept(tmp_path):
  variables, model_config = convert.load(os.path.join(DATA, 'torchvision_r18_w32.pth'))
  dead, live = tmp_path / '.imported.import-dead', tmp_path / '.imported.import-live'
  for staging in (dead, live):  # what SIGKILL leaves: no finally ran
    (staging / 'checkpoints' / '0').mkdir(parents=True)
    (staging / '.lock').touch()
  other = tmp_path / '.other.import-dead'
  other.mkdir()
  (other / '.lock').touch()
  with open(live / '.lock', 'r+') as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an import still running
    convert.write_workdir(os.fspath(tmp_path / 'imported'), variables, model_config, {})
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      '.imported.import-live', '.other.import-dead', 'imported']
  assert sorted(p.name for p in (tmp_path / 'imported').iterdir()) == [
      'checkpoints', 'config.json']  # no lock file arrives with the import


def test_an_import_of_an_earlier_convert_is_refused_by_init_from(tmp_path):
  imported = tmp_path / 'imported'
  assert convert.main(['--checkpoint', os.path.join(DATA, 'torchvision_r50_w32.pth'),
                       '--workdir', os.fspath(imported)]) == 0
  config = json.loads((imported / 'config.json').read_text())
  model = dict(config['model'])
  checkpointing.check_encoder_architecture(os.fspath(imported), model)  # as imported: fine
  del config['model']['input_normalization'], config['model']['identity_shortcuts']
  (imported / 'config.json').write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r'by an earlier bigssl_med.convert.*import it again'):
    checkpointing.check_encoder_architecture(os.fspath(imported), model)


def test_fine_tuning_starts_from_an_imported_torchvision_model(colours, tmp_path):  # noqa: F811
  imported = tmp_path / 'imported'
  assert convert.main(['--checkpoint', os.path.join(DATA, 'torchvision_r18_w32.pth'),
                       '--workdir', os.fspath(imported)]) == 0
  overrides = {'init_from': os.fspath(imported), 'total_steps': 2, 'eval_every_steps': 2,
               'model.cifar_stem': False, 'model.width_multiplier': WIDTH,
               'model.stem_pool_padding': 'symmetric', 'model.identity_shortcuts': True,
               'model.input_normalization': 'imagenet'}
  with pytest.raises(CheckpointError, match='encoder alone.*head_layers_kept=0'):
    finetune.train_and_evaluate(tiny_config(colours, head_layers_kept=1, **overrides),
                                os.fspath(tmp_path / 'with_head'))
  results = finetune.train_and_evaluate(tiny_config(colours, **overrides),
                                        os.fspath(tmp_path / 'finetuned'))
  assert results['init'] == 'imported' and results['test']['num_examples'] == 16


# -------------------------------------------------------------------- BYOL's pickles.


def _byol_classes(mapping='frozendict'):
  """Classes as BYOL's pickles name them: its experiment state (a named tuple in
  `byol.byol_experiment`) and Haiku's immutable mapping, which pickles as its class
  called with a dict (`frozendict`; later Haiku versions' `FlatMapping`). Defined here,
  never imported by the reader."""
  state = collections.namedtuple('_ByolExperimentState', convert._BYOL_STATE_FIELDS)
  state.__module__, state.__qualname__ = 'byol.byol_experiment', '_ByolExperimentState'

  class frozendict(dict):  # noqa: N801  pylint: disable=invalid-name
    def __reduce__(self):
      return type(self), (dict(self),)

  frozendict.__module__ = 'haiku._src.data_structures'
  frozendict.__qualname__ = frozendict.__name__ = mapping

  lars_state = collections.namedtuple('LarsState', ['trace'])
  lars_state.__module__ = 'byol.utils.optimizers'
  return state, frozendict, lars_state


def _write_byol_pickle(path, params, state, *, target_params=None, monkeypatch,
                       mapping='frozendict'):
  """A BYOL checkpoint: `{'experiment_state', 'step', 'rng'}` pickled with protocol 2
  (as `dill.dump(..., protocol=2)` writes these types), Haiku mappings as frozendicts."""
  experiment_state, frozendict, lars_state = _byol_classes(mapping)
  modules = {name: type(sys)(name) for name in (
      'byol', 'byol.byol_experiment', 'byol.utils', 'byol.utils.optimizers', 'haiku',
      'haiku._src', 'haiku._src.data_structures')}
  modules['byol.byol_experiment']._ByolExperimentState = experiment_state
  setattr(modules['haiku._src.data_structures'], mapping, frozendict)
  modules['byol.utils.optimizers'].LarsState = lars_state
  for name, module in modules.items():  # pickle checks a class is where it says
    monkeypatch.setitem(sys.modules, name, module)

  def frozen(tree):
    return frozendict({k: frozendict(v) for k, v in tree.items()})

  target = target_params if target_params is not None else jax.tree.map(np.zeros_like, params)
  checkpoint = {'experiment_state': experiment_state(
      frozen(params), frozen(target), frozen(state), frozen(state),
      lars_state(trace=frozen(jax.tree.map(np.zeros_like, params)))),
      'step': 1000, 'rng': np.array([0, 42], np.uint32)}
  with open(path, 'wb') as f:
    pickle.dump(checkpoint, f, protocol=2)
  for name in modules:
    monkeypatch.delitem(sys.modules, name)  # the reader must not need them


@pytest.mark.parametrize('depth, mapping', [(18, 'frozendict'), (50, 'FlatMapping')])
def test_byol_import_computes_byols_features(tmp_path, monkeypatch, depth, mapping):
  params, state = ref.byol_network(depth, WIDTH, seed=depth)
  path = os.fspath(tmp_path / 'pretrain_res50x1.pkl')
  _write_byol_pickle(path, params, state, monkeypatch=monkeypatch, mapping=mapping)
  assert convert.detect_format(path) == 'byol'
  variables, model_config = convert.load(path)
  assert (model_config['depth'], model_config['width_multiplier']) == (depth, WIDTH)
  assert model_config['conv_padding'] == 'same' and model_config['stem_pool_padding'] == 'same'
  assert model_config['input_normalization'] == 'imagenet' and model_config['head_layers'] == 0
  assert not model_config['identity_shortcuts']
  images, _ = _rgb()
  want = ref.byol_features(params, state, images, depth)
  assert _relative_error(_encoder_features(variables, model_config, images), want) < 1e-5
  # Haiku pads strided convolutions as TF's SAME; SimCLR's fixed padding is another function.
  fixed = _encoder_features(variables, model_config, images, conv_padding='fixed')
  assert _relative_error(fixed, want) > 1e-2


def test_byol_import_takes_the_online_network_or_with_ema_the_target(tmp_path, monkeypatch):
  params, state = ref.byol_network(18, WIDTH, seed=1)
  target, _ = ref.byol_network(18, WIDTH, seed=2, projector=False)
  path = os.fspath(tmp_path / 'byol.pkl')
  _write_byol_pickle(path, params, state, target_params=target, monkeypatch=monkeypatch)
  online, _ = convert.load(path)
  np.testing.assert_array_equal(online['params']['encoder']['stem_conv']['conv']['kernel'],
                                params['res_net18/~/initial_conv']['w'])
  ema, _ = convert.load(path, ema=True)
  np.testing.assert_array_equal(ema['params']['encoder']['stem_conv']['conv']['kernel'],
                                target['res_net18/~/initial_conv']['w'])
  # The moving statistics are Haiku's zero-debiased 'average', not its 'hidden' value.
  np.testing.assert_array_equal(
      online['batch_stats']['encoder']['stem_bn']['bn']['var'],
      state['res_net18/~/initial_batchnorm/~/var_ema']['average'].reshape(-1))


def test_byol_import_logs_what_it_leaves_out(tmp_path, monkeypatch, caplog):
  params, state = ref.byol_network(18, WIDTH)
  path = os.fspath(tmp_path / 'byol.pkl')
  _write_byol_pickle(path, params, state, monkeypatch=monkeypatch)
  with caplog.at_level(logging.INFO):
    convert.load(path)
  assert ('left out 7 modules beside the ResNet: classifier (1), predictor (3), projector (3)'
          in caplog.text)


def test_byol_pickles_run_no_code(tmp_path):
  path = tmp_path / 'evil.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'experiment_state': _MakesAFolder(os.fspath(tmp_path / 'made'))}, f,
                protocol=2)
  with pytest.raises(CheckpointError, match='experiment_state is not BYOL'):
    convert.load(os.fspath(path))
  assert not (tmp_path / 'made').exists()


@pytest.mark.parametrize('edit, message', [
    (lambda p, s: p.pop('res_net18/~/block_group_1/~/block_1/~/conv_1'),
     r"lacks the module 'res_net18/~/block_group_1/~/block_1/~/conv_1'"),
    (lambda p, s: p.update({'res_net18/~/extra_conv': {'w': np.zeros((1, 1, 2, 2), 'f4')}}),
     r'has res_net18/~/extra_conv, which BYOL\'s ResNet-18 lacks'),
    (lambda p, s: s.pop('res_net18/~/initial_batchnorm/~/mean_ema'),
     r"lacks the state 'res_net18/~/initial_batchnorm/~/mean_ema'"),
    (lambda p, s: p['res_net18/~/initial_conv'].update(w=np.zeros((7, 7, 3, 5), 'f4')),
     r'has shape \(2,\), this model expects \(5,\): the file is not in the layout'),
    (lambda p, s: p.update({'res_net9/~/initial_conv': p['res_net18/~/initial_conv']}),
     'several Haiku ResNets in it: res_net18, res_net9'),
])
def test_byol_import_names_what_does_not_fit(tmp_path, monkeypatch, edit, message):
  params, state = ref.byol_network(18, WIDTH)
  edit(params, state)
  path = os.fspath(tmp_path / 'byol.pkl')
  _write_byol_pickle(path, params, state, monkeypatch=monkeypatch)
  with pytest.raises(CheckpointError, match=message):
    convert.load(path)


def test_damaged_and_other_pickles_are_one_line_errors(tmp_path, monkeypatch):
  params, state = ref.byol_network(18, WIDTH)
  path = tmp_path / 'byol.pkl'
  _write_byol_pickle(os.fspath(path), params, state, monkeypatch=monkeypatch)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=r'byol\.pkl: not a readable pickle \(damaged or '):
    convert.load(os.fspath(path))
  path.write_bytes(pickle.dumps({'state_dict': {}}, protocol=2))
  with pytest.raises(CheckpointError, match=r'no experiment_state \(it holds state_dict\)'):
    convert.load(os.fspath(path))
  # A PyTorch file from before 1.6 starts with its magic number: not taken for BYOL's.
  path.write_bytes(b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.')
  assert convert.detect_format(os.fspath(path)) == 'torchvision'
  # Nor is a safetensors file whose header's length (640: 80 02 00 ...) opens as a pickle.
  path.write_bytes(struct.pack('<Q', 640) + b'{' + b' ' * 638 + b'}')
  assert convert.detect_format(os.fspath(path)) == 'torchvision'


def test_the_command_imports_byol_and_gives_the_flags(tmp_path, monkeypatch, capsys):
  params, state = ref.byol_network(18, WIDTH)
  path = os.fspath(tmp_path / 'pretrain_res50x1.pkl')
  _write_byol_pickle(path, params, state, monkeypatch=monkeypatch)
  workdir = os.fspath(tmp_path / 'byol_r18')
  assert convert.main(['--checkpoint', path, '--workdir', workdir]) == 0
  out = capsys.readouterr().out
  assert '--config.model.conv_padding=same' in out
  assert '--config.model.input_normalization=imagenet' in out
  config = json.loads((tmp_path / 'byol_r18' / 'config.json').read_text())
  assert config['source']['format'] == 'byol' and config['model']['conv_padding'] == 'same'


def test_byol_pickles_written_by_numpy_1_are_read(tmp_path, monkeypatch):
  # NumPy 1 (which BYOL's checkpoints were written with) names its array rebuild
  # numpy.core.multiarray._reconstruct; NumPy 2 names it numpy._core.multiarray.
  params, state = ref.byol_network(18, WIDTH)
  path = tmp_path / 'byol.pkl'
  _write_byol_pickle(os.fspath(path), params, state, monkeypatch=monkeypatch)
  data = path.read_bytes()
  old = data.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
  assert old != data or b'cnumpy.core.multiarray\n' in data
  path.write_bytes(old)
  variables, _ = convert.load(os.fspath(path))
  np.testing.assert_array_equal(variables['params']['encoder']['stem_conv']['conv']['kernel'],
                                params['res_net18/~/initial_conv']['w'])


def test_fine_tuning_starts_from_an_imported_byol_model(colours, tmp_path,  # noqa: F811
                                                         monkeypatch):
  params, state = ref.byol_network(18, WIDTH)
  path = os.fspath(tmp_path / 'pretrain_res18.pkl')
  _write_byol_pickle(path, params, state, monkeypatch=monkeypatch)
  imported = tmp_path / 'imported'
  assert convert.main(['--checkpoint', path, '--workdir', os.fspath(imported)]) == 0
  overrides = {'init_from': os.fspath(imported), 'total_steps': 2, 'eval_every_steps': 2,
               'model.cifar_stem': False, 'model.width_multiplier': WIDTH,
               'model.input_normalization': 'imagenet', 'head_layers_kept': 0}
  # Without Haiku's padding the run would compute another function than the import's.
  with pytest.raises(CheckpointError, match=r'config.model.conv_padding=\'same\'.*'
                                            r'set --config.model.conv_padding=same$'):
    finetune.train_and_evaluate(tiny_config(colours, **overrides), os.fspath(tmp_path / 'x'))
  results = finetune.train_and_evaluate(
      tiny_config(colours, **overrides, **{'model.conv_padding': 'same'}),
      os.fspath(tmp_path / 'finetuned'))
  assert results['init'] == 'imported' and results['test']['num_examples'] == 16


def test_the_pickle_reader_rebuilds_dills_arrays_and_numpy_scalars(tmp_path, monkeypatch):
  from bigssl_med import haiku_pickle  # pylint: disable=g-import-not-at-top
  array = np.arange(6, dtype=np.float32).reshape(2, 3)

  def _create_array(f, args, state, npdict=None):  # dill's, for ndarray subclasses
    del npdict
    out = f(*args)
    out.__setstate__(state)
    return out

  _create_array.__module__, _create_array.__qualname__ = 'dill._dill', '_create_array'
  dill = type(sys)('dill._dill')
  dill._create_array = _create_array
  monkeypatch.setitem(sys.modules, 'dill', type(sys)('dill'))
  monkeypatch.setitem(sys.modules, 'dill._dill', dill)

  class AsDill:
    def __reduce__(self):
      reconstruct, args, state = array.__reduce__()
      return _create_array, (reconstruct, args, state, None)

  path = tmp_path / 'dill.pkl'
  path.write_bytes(pickle.dumps({'a': AsDill(), 'step': np.int64(7), 'x': np.float32(2.5)},
                                protocol=2))
  monkeypatch.delitem(sys.modules, 'dill._dill')
  monkeypatch.delitem(sys.modules, 'dill')
  assert haiku_pickle.is_plain_pickle(os.fspath(path))
  got = haiku_pickle.read(os.fspath(path))
  np.testing.assert_array_equal(got['a'], array)
  assert got['a'].dtype == np.float32 and got['step'] == 7 and got['x'] == np.float32(2.5)


def test_a_haiku_mapping_pickled_by_its_slots_is_read_as_a_dict(tmp_path, monkeypatch):
  from bigssl_med import haiku_pickle  # pylint: disable=g-import-not-at-top

  class frozendict:  # noqa: N801  pylint: disable=invalid-name
    __slots__ = ('_storage', '_keys')  # no __reduce__: protocol 2 writes the slots' state

    def __init__(self, storage):
      self._storage, self._keys = storage, tuple(storage)

  frozendict.__module__ = 'haiku._src.data_structures'
  frozendict.__qualname__ = 'frozendict'
  module = type(sys)('haiku._src.data_structures')
  module.frozendict = frozendict
  for name in ('haiku', 'haiku._src'):
    monkeypatch.setitem(sys.modules, name, type(sys)(name))
  monkeypatch.setitem(sys.modules, 'haiku._src.data_structures', module)
  path = tmp_path / 'slots.pkl'
  path.write_bytes(pickle.dumps(frozendict({'w': np.ones(2, np.float32)}), protocol=2))
  for name in ('haiku', 'haiku._src', 'haiku._src.data_structures'):
    monkeypatch.delitem(sys.modules, name)
  got = haiku_pickle.read(os.fspath(path))
  assert isinstance(got, dict) and list(got) == ['w']
  np.testing.assert_array_equal(got['w'], np.ones(2))
