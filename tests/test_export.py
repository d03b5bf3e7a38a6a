"""bigssl_med.export: a run's ResNet as a torchvision-layout safetensors file.

The round trip goes through files written by `torch.save` (tests/data) and
`bigssl_med.convert`; the classifier is checked against the float64 NumPy
torchvision forward of `reference_resnets.py`.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigssl_med import convert, export, models
from bigssl_med.errors import CheckpointError, ConfigError, UserError
from bigssl_med.models import resnet
import reference_resnets as ref

DATA = os.path.join(os.path.dirname(__file__), 'data')


def _imported(tmp_path, depth, name='run', **extra):
  """A workdir holding the torchvision fixture of `depth` (plus `extra` variables)."""
  path = os.path.join(DATA, f'torchvision_r{depth}_w32.pth')
  variables, model_config = convert.load(path)
  for collection, tree in extra.items():
    variables[collection].update(tree)
  workdir = os.fspath(tmp_path / name)
  convert.write_workdir(workdir, variables, model_config, {'checkpoint': path})
  return workdir, convert.read_torch_file(path), variables, model_config


@pytest.mark.parametrize('depth', [18, 50])
def test_export_gives_back_the_torchvision_state_dict(tmp_path, depth, capsys):
  workdir, state, _, _ = _imported(tmp_path, depth)
  out = os.fspath(tmp_path / 'out' / 'model.safetensors')
  assert export.main(['--workdir', workdir, '--out', out]) == 0
  assert 'in torchvision\'s layout from' in capsys.readouterr().out
  exported = convert.read_safetensors_file(out)
  want = {k: v for k, v in state.items() if not k.startswith('fc.')}
  assert sorted(exported) == sorted(want)
  for key, value in want.items():
    if key.endswith('num_batches_tracked'):
      assert exported[key].dtype == np.int64 and exported[key].shape == ()
    else:
      np.testing.assert_array_equal(exported[key], np.asarray(value, np.float32), err_msg=key)
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(out, 'np') as f:
    metadata = f.metadata()
  assert metadata['input_normalization'] == 'imagenet'
  assert metadata['stem_pool_padding'] == 'symmetric' and metadata['fc'] == 'false'
  # Importing the export gives the same variables.
  again, model_config = convert.load(out)
  original, _ = convert.load(os.path.join(DATA, f'torchvision_r{depth}_w32.pth'))
  jax.tree.map(np.testing.assert_array_equal, again, original)


def test_the_same_model_exports_to_the_same_bytes(tmp_path):
  workdir, _, _, _ = _imported(tmp_path, 18)
  outs = [os.fspath(tmp_path / f'model{k}.safetensors') for k in range(4)]
  for out in outs:
    export.export(workdir, out)
  contents = {open(out, 'rb').read() for out in outs}  # pylint: disable=consider-using-with
  assert len(contents) == 1
  with open(outs[0], 'rb') as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
  assert list(header['__metadata__']) == sorted(header['__metadata__'])
  assert convert.read_safetensors_metadata(outs[0])['format'] == 'torchvision_resnet'
  # A copy of the run elsewhere (another machine, another user's folder) too: the file
  # says where in the run the weights lay, not where the run lies.
  copy = os.fspath(tmp_path / 'elsewhere' / 'copy')
  shutil.copytree(workdir, copy)
  assert export.export(copy, os.fspath(tmp_path / 'copy.safetensors'))['source'] == (
      'checkpoints/0')
  with open(tmp_path / 'copy.safetensors', 'rb') as f:
    assert f.read() in contents
  assert os.fspath(tmp_path).encode() not in contents.pop()


def test_a_model_trained_here_comes_back_as_the_same_network(tmp_path):
  """Settings torchvision's layout cannot show (no input standardisation, SimCLR's
  pooling, TF's SAME padding of an imported BYOL model) survive the trip."""
  path = os.path.join(DATA, 'torchvision_r50_w32.pth')
  variables, model_config = convert.load(path)
  model_config.update(input_normalization='none', stem_pool_padding='same', conv_padding='same')
  workdir = os.fspath(tmp_path / 'run')
  convert.write_workdir(workdir, variables, model_config, {'checkpoint': path})
  out = os.fspath(tmp_path / 'model.safetensors')
  export.export(workdir, out)
  again, again_config = convert.load(out)
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  assert again_config == model_config
  images = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3)), jnp.float32)

  def features(config):
    encoder = resnet.ResNet(**models.encoder_architecture(config))
    return np.asarray(encoder.apply(
        {c: variables[c]['encoder'] for c in ('params', 'batch_stats')}, images, train=False))
  np.testing.assert_array_equal(features(again_config), features(model_config))
  # An explicit --input_normalization still wins over the metadata.
  _, told = convert.load(out, input_normalization='imagenet')
  assert (told['input_normalization'], told['stem_pool_padding']) == ('imagenet', 'same')


def test_a_width_whose_layers_round_apart_comes_back_from_its_metadata(tmp_path):
  """At width 0.1 the stem has 6 channels but the next layers 13, 26, 51: 6/64 is not
  the width, the metadata is."""
  model_config = convert._model_config(depth=18, width_multiplier=0.1,
                                       stem_pool_padding='symmetric', identity_shortcuts=True,
                                       input_normalization='imagenet', head_layers=0)
  encoder = resnet.ResNet(**models.encoder_architecture(model_config))
  init = encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  variables = {c: {'encoder': init[c]} for c in ('params', 'batch_stats')}
  workdir = os.fspath(tmp_path / 'run')
  convert.write_workdir(workdir, variables, model_config, {'checkpoint': 'none'})
  out = os.fspath(tmp_path / 'w01.safetensors')
  export.export(workdir, out)
  again, again_config = convert.load(out)
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  assert again_config['width_multiplier'] == 0.1


def test_an_export_is_named_safetensors_and_read_back_whatever_its_name(tmp_path):
  workdir, *_ = _imported(tmp_path, 18)
  with pytest.raises(UserError, match=r'model\.pt: name it \*\.safetensors'):
    export.export(workdir, os.fspath(tmp_path / 'model.pt'))
  out = tmp_path / 'model.safetensors'
  export.export(workdir, os.fspath(out))
  renamed = tmp_path / 'model.bin'
  os.rename(out, renamed)
  got, got_config = convert.load(os.fspath(renamed))
  want, want_config = convert.load(os.path.join(DATA, 'torchvision_r18_w32.pth'))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert got_config == want_config


def test_linear_classifier_becomes_fc_with_feature_standardisation_folded(tmp_path):
  rng = np.random.default_rng(0)
  features, classes = resnet.feature_dim(50, 1 / 32), 3
  classifier = {'kernel': rng.normal(size=(features, classes)).astype(np.float32),
                'bias': rng.normal(size=classes).astype(np.float32)}
  feature_bn = {'mean': rng.normal(size=features).astype(np.float32),
                'var': rng.uniform(0.5, 2.0, size=features).astype(np.float32)}
  workdir, state, variables, model_config = _imported(
      tmp_path, 50, params={'classifier': classifier}, batch_stats={'feature_bn': feature_bn})
  out = os.fspath(tmp_path / 'linear.safetensors')
  metadata = export.export(workdir, out)
  assert metadata['fc'] == 'true'
  exported = convert.read_safetensors_file(out)
  images = rng.uniform(size=(2, 64, 64, 3))
  mean, std = (np.asarray(v) for v in resnet.INPUT_NORMALIZATIONS['imagenet'])
  torch_features = ref.torchvision_features(state, (images - mean) / std, 50)
  want = torch_features @ exported['fc.weight'].T.astype(np.float64) + exported['fc.bias']
  config = _config(model_config)
  model = models.classifier(config, dtype=jnp.float32, num_outputs=classes, head_layers_kept=0,
                            freeze_encoder=True, feature_bn=True)
  with jax.default_matmul_precision('highest'):
    got = model.apply({'params': {'encoder': variables['params']['encoder'],
                                  'classifier': classifier},
                       'batch_stats': {'encoder': variables['batch_stats']['encoder'],
                                       'feature_bn': feature_bn}},
                      jnp.asarray(images, jnp.float32), train=False)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())


def _config(model_config):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(model_config)


@pytest.mark.parametrize('change, message', [
    ({'sk_ratio': 0.0625}, 'sk_ratio=0.0625: torchvision\'s ResNet has no selective kernels'),
    ({'cifar_stem': True}, 'cifar_stem=True: torchvision\'s ResNet has a 7x7 stem'),
    ({'identity_shortcuts': False}, 'identity_shortcuts=False: this ResNet-18 has a projection'),
])
def test_architectures_torchvision_lacks_are_refused(tmp_path, change, message):
  workdir, _, _, _ = _imported(tmp_path, 18)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config['model'].update(change)
  with open(path, 'w') as f:
    json.dump(config, f)
  out = tmp_path / 'x.safetensors'
  with pytest.raises(ConfigError, match=message):
    export.export(workdir, os.fspath(out))
  assert not out.exists()


def test_existing_files_and_missing_runs_are_one_line_errors(tmp_path, caplog):
  workdir, _, _, _ = _imported(tmp_path, 18)
  out = tmp_path / 'taken.safetensors'
  out.write_bytes(b'keep me')
  assert export.main(['--workdir', workdir, '--out', os.fspath(out)]) == 2
  assert out.read_bytes() == b'keep me'
  with pytest.raises(UserError, match='is a folder; --out names the .safetensors file'):
    export.export(workdir, os.fspath(tmp_path), overwrite=True)
  # --overwrite replaces the file only once the new one is whole: a failed export keeps it.
  with pytest.raises(CheckpointError, match='best: no such folder'):
    export.export(workdir, os.fspath(out), checkpoint='best', overwrite=True)
  assert out.read_bytes() == b'keep me'
  assert export.main(['--workdir', workdir, '--out', os.fspath(out), '--overwrite']) == 0
  assert 'conv1.weight' in convert.read_safetensors_file(os.fspath(out))
  mask = os.umask(0o022)
  os.umask(mask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask  # as any new file, not private
  with pytest.raises(ConfigError, match='config.json: missing.*is .* a run of this project'):
    export.export(os.fspath(tmp_path / 'nothing'), os.fspath(tmp_path / 'y.safetensors'))
  with pytest.raises(CheckpointError, match='best: no such folder'):
    export.export(workdir, os.fspath(tmp_path / 'z.safetensors'), checkpoint='best')
  with pytest.raises(UserError, match="checkpoint 'newest' is not one of"):
    export.export(workdir, os.fspath(tmp_path / 'z.safetensors'), checkpoint='newest')
  # SimCLR's pooling: exported, with a warning that torchvision's differs.
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config['model']['stem_pool_padding'] = 'same'
  with open(path, 'w') as f:
    json.dump(config, f)
  with caplog.at_level(logging.WARNING):
    metadata = export.export(workdir, os.fspath(tmp_path / 'same.safetensors'))
  assert metadata['stem_pool_padding'] == 'same'
  assert 'computes a different function' in caplog.text


def test_an_output_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
  workdir, _, _, _ = _imported(tmp_path, 18)
  (tmp_path / 'file').write_text('')
  (tmp_path / 'locked').mkdir()
  os.chmod(tmp_path / 'locked', 0o500)
  try:
    for out in (tmp_path / 'file' / 'model.safetensors', tmp_path / 'locked' / 'm.safetensors'):
      if out.parent.name == 'locked' and os.access(out.parent, os.W_OK):
        continue  # root writes anywhere
      assert export.main(['--workdir', workdir, '--out', os.fspath(out)]) == 2
      err = capsys.readouterr().err
      assert err.startswith(f'error: {out}: cannot be written (') and err.count('\n') == 1
  finally:
    os.chmod(tmp_path / 'locked', 0o700)
  assert os.listdir(tmp_path / 'locked') == []
  # safetensors' own failure (here: a tensor it cannot store) leaves no file behind.
  with pytest.raises(UserError, match=r'x.safetensors: cannot be written \('):
    export._write_file(os.fspath(tmp_path / 'out' / 'x.safetensors'),  # pylint: disable=protected-access
                       {'a': np.zeros(2, object)}, {})
  assert os.listdir(tmp_path / 'out') == []


def test_a_run_without_checkpoints_is_named_by_its_workdir(tmp_path):
  workdir, _, _, _ = _imported(tmp_path, 18)
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(CheckpointError, match=f'^--workdir={workdir}: no checkpoint found'):
    export.export(workdir, os.fspath(tmp_path / 'x.safetensors'))


def test_a_damaged_checkpoint_is_one_line_on_stderr_and_nothing_more(tmp_path):
  """orbax's reads still in flight when one fails print tracebacks, up to thousands of
  lines, at random; the command's stderr is its one-line error alone."""
  workdir, _, _, _ = _imported(tmp_path, 50)
  data = os.path.join(workdir, 'checkpoints', '0', 'model', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    with open(os.path.join(data, name), 'r+b') as f:
      f.truncate(10)
  for _ in range(3):
    result = subprocess.run(
        [sys.executable, '-m', 'bigssl_med.export', f'--workdir={workdir}',
         f'--out={tmp_path / "x.safetensors"}'], capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2
    assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, (
        result.stderr[:3000])
    assert 'cannot read the checkpoint (damaged or cut short?): OUT_OF_RANGE: ' in result.stderr
