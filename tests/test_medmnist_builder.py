"""Tests of the medmnist TFDS builder (generated .npz files; no network)."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from bigssl_med import build_data
from bigssl_med.data import sources
from bigssl_med.errors import DataError
import tfds_builders
from tfds_builders.medmnist import medmnist

NAME = 'medmnist'
REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_PNEUMONIAMNIST = (Path(__file__).resolve().parents[1].parent / 'shared' /
                       'data' / 'pneumoniamnist')
# Images per split in the generated files: (train, val, test).
_COUNTS = (7, 3, 4)
_PREFIXES = ('train', 'val', 'test')
_SPLIT_OF = {'train': 'train', 'val': 'validation', 'test': 'test'}


# ----------------------------------------------------------------------------
# Fixture writers: .npz files in the published layout.
# ----------------------------------------------------------------------------


def fake_arrays(config_name: str, counts=_COUNTS,
                seed: int = 0) -> dict[str, np.ndarray]:
  """Arrays of a small MedMNIST .npz for `config_name`, as published.

  Images are uint8 `[N, size, size]` (gray) or `[N, size, size, 3]` (RGB),
  labels uint8 `[N, 1]` (every class occurs when N allows) or `[N, 14]` 0/1.
  """
  config = medmnist.Medmnist.make_config(config_name)
  rng = np.random.default_rng(seed)
  arrays = {}
  for prefix, n in zip(_PREFIXES, counts):
    arrays[f'{prefix}_images'] = rng.integers(
        0, 256, (n,) + config.image_shape, dtype=np.uint8)
    k = len(config.label_names)
    if config.multi_label:
      labels = rng.integers(0, 2, (n, k), dtype=np.uint8)
    else:
      labels = (np.arange(n, dtype=np.uint8) % k)[:, None]
    arrays[f'{prefix}_labels'] = labels
  return arrays


def write_npz(directory: Path, config_name: str, arrays=None,
              **kwargs) -> tuple[Path, dict[str, np.ndarray]]:
  """Writes the config's file (its published name) under `directory`."""
  arrays = fake_arrays(config_name, **kwargs) if arrays is None else arrays
  config = medmnist.Medmnist.make_config(config_name)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / config.file_name
  with open(path, 'wb') as f:  # A file object: savez adds no '.npz' suffix.
    np.savez_compressed(f, **arrays)
  return path, arrays


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _build(config_name: str, manual_dir: Path, data_dir: Path, **kwargs) -> str:
  return build_data.build(f'{NAME}/{config_name}', data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(manual_dir), **kwargs)


def _records(config_name: str, data_dir: Path) -> dict[str, dict[str, dict]]:
  """split -> image_id -> record, read through bigssl_med.data.sources."""
  name = f'{NAME}/{config_name}'
  info = sources.dataset_info(name, os.fspath(data_dir))
  out = {}
  for split in info.splits:
    source = sources.open_split(name, split, os.fspath(data_dir))
    out[split] = {r['image_id'].decode(): r for r in source}
  return out


def _decode(png: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(png)) as image:
    assert image.format == 'PNG'
    return np.asarray(image)


def _assert_one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for part in parts:
    assert str(part) in message, (part, message)


def _check_build(config_name: str, data_dir: Path, arrays, npz: Path):
  """Every record matches its row of the file; returns the dataset info."""
  config = medmnist.Medmnist.make_config(config_name)
  name = f'{NAME}/{config_name}'
  info = sources.dataset_info(name, os.fspath(data_dir))
  records = _records(config_name, data_dir)
  assert sorted(records) == ['test', 'train', 'validation']
  for prefix in _PREFIXES:
    split = _SPLIT_OF[prefix]
    images, labels = arrays[f'{prefix}_images'], arrays[f'{prefix}_labels']
    assert info.splits[split].num_examples == len(records[split]) == len(images)
    for index, (image, label) in enumerate(zip(images, labels)):
      image_id = f'{prefix}_{index:06d}'
      record = records[split][image_id]
      assert record['case_id'].decode() == image_id
      np.testing.assert_array_equal(_decode(record['image']), image)
      if config.multi_label:
        assert record['labels'].dtype == np.float32
        np.testing.assert_array_equal(record['labels'], label)
      else:
        assert record['label'] == label[0]
  assert info.features['image'].shape == (config.size, config.size,
                                          config.channels)
  metadata = info.metadata
  assert metadata['md5'] == hashlib.md5(npz.read_bytes()).hexdigest()
  assert metadata['official_md5'] == config.md5
  assert metadata['matches_official_file'] is False
  assert metadata['task'] == config.task
  return info


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


def test_configs_cover_subsets_and_sizes():
  names = [c.name for c in medmnist.Medmnist.BUILDER_CONFIGS]
  assert len(names) == len(set(names)) == 12 * 4
  assert names[:5] == ['pathmnist_28', 'pathmnist_64', 'pathmnist_128',
                       'pathmnist_224', 'chestmnist_28']
  assert names[-1] == 'organsmnist_224'
  default = medmnist.Medmnist.BUILDER_CONFIGS[0]
  assert medmnist.Medmnist.make_config(None) is default
  config = medmnist.Medmnist.make_config('pneumoniamnist_28')
  assert config is medmnist.Medmnist.builder_configs['pneumoniamnist_28']
  assert (config.file_name, config.channels, config.task) == (
      'pneumoniamnist.npz', 1, 'binary-class')
  assert config.url == ('https://zenodo.org/records/10519652/files/'
                        'pneumoniamnist.npz?download=1')
  assert config.num_examples == {'train': 4708, 'validation': 524, 'test': 624}
  big = medmnist.Medmnist.make_config('dermamnist_224')
  assert (big.file_name, big.channels, big.image_shape) == (
      'dermamnist_224.npz', 3, (224, 224, 3))
  assert len(medmnist.Medmnist.make_config('chestmnist_64').label_names) == 14
  for subset in medmnist.SUBSETS.values():
    assert subset.task in medmnist.TASKS and subset.channels in (1, 3)
    assert all(len(md5) == 32 for md5 in subset.md5.values())
    assert len(set(subset.label_names)) == len(subset.label_names)
  assert len({md5 for s in medmnist.SUBSETS.values()
              for md5 in s.md5.values()}) == 48
  assert sources.version_dir_of(NAME, '/d') == '/d/medmnist/pathmnist_28/1.0.0'


def test_registered():
  assert tfds_builders.BUILDERS[NAME] is tfds_builders.Medmnist
  assert tfds_builders.Medmnist.name == NAME


def test_unknown_config(tmp_path):
  with pytest.raises(DataError) as excinfo:
    build_data.build(f'{NAME}/pneumoniamnist_32', data_dir=os.fspath(tmp_path))
  _assert_one_line_error(excinfo, "'pneumoniamnist_32'", 'pneumoniamnist',
                         '28, 64, 128, 224')


def test_max_side_is_refused(tmp_path):
  with pytest.raises(DataError) as excinfo:
    build_data.build(f'{NAME}/pneumoniamnist_28', data_dir=os.fspath(tmp_path),
                     max_side=64)
  _assert_one_line_error(excinfo, 'max_side', '64', 'pneumoniamnist_64')


# ----------------------------------------------------------------------------
# Builds from generated files.
# ----------------------------------------------------------------------------


def test_build_gray_binary(tmp_path):
  npz, arrays = write_npz(tmp_path / 'raw', 'pneumoniamnist_28')
  data_dir = tmp_path / 'data'
  version_dir = _build('pneumoniamnist_28', tmp_path / 'raw', data_dir)
  assert version_dir == os.fspath(
      data_dir / NAME / 'pneumoniamnist_28' / '1.0.0')
  info = _check_build('pneumoniamnist_28', data_dir, arrays, npz)
  assert info.features['label'].names == ['normal', 'pneumonia']
  assert info.supervised_keys == ('image', 'label')
  assert info.metadata['official_num_examples'] == {
      'train': 4708, 'validation': 524, 'test': 624}

  # One image per case: every case_index group is a single record.
  with open(os.path.join(version_dir, sources.CASE_INDEX_FILE)) as f:
    index = json.load(f)
  assert index['splits']['validation']['num_records'] == _COUNTS[1]
  groups = sources.case_index(f'{NAME}/pneumoniamnist_28', 'train',
                              os.fspath(data_dir))
  assert len(groups) == _COUNTS[0] and all(len(g) == 1 for g in groups)


def test_build_rgb_at_64(tmp_path):
  npz, arrays = write_npz(tmp_path / 'raw' / 'nested', 'dermamnist_64')
  _build('dermamnist_64', tmp_path / 'raw', tmp_path / 'data')
  info = _check_build('dermamnist_64', tmp_path / 'data', arrays, npz)
  assert info.features['label'].num_classes == 7
  records = _records('dermamnist_64', tmp_path / 'data')['test']
  record = next(iter(records.values()))
  assert _decode(record['image']).shape == (64, 64, 3)


def test_build_multi_label(tmp_path):
  npz, arrays = write_npz(tmp_path / 'raw', 'chestmnist_28')
  _build('chestmnist_28', tmp_path / 'raw', tmp_path / 'data')
  info = _check_build('chestmnist_28', tmp_path / 'data', arrays, npz)
  assert 'label' not in info.features
  assert info.features['labels'].shape == (14,)
  assert info.metadata['label_names'][:2] == ['atelectasis', 'cardiomegaly']
  assert len(info.metadata['label_names']) == 14
  assert info.supervised_keys == ('image', 'labels')


def test_build_and_read_without_tensorflow(tmp_path):
  npz, arrays = write_npz(tmp_path / 'raw', 'chestmnist_28')
  script = textwrap.dedent('''
      import sys
      sys.path.insert(0, 'tests')
      from no_tensorflow import is_tensorflow as _is_tf

      from bigssl_med import build_data
      from bigssl_med.data import sources
      manual_dir, data_dir = sys.argv[1:]
      name = 'medmnist/chestmnist_28'
      build_data.build(name, data_dir=data_dir, manual_dir=manual_dir)
      source = sources.open_split(name, 'train', data_dir)
      assert source[0]['image'][:4] == b'\\x89PNG', 'not PNG bytes'
      print('labels', sum(float(r['labels'].sum()) for r in source))
      loaded = [m for m in sys.modules if _is_tf(m) and sys.modules[m]]
      assert not loaded, loaded
  ''')
  result = subprocess.run(
      [sys.executable, '-c', script, os.fspath(npz.parent),
       os.fspath(tmp_path / 'data')],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"labels {float(arrays['train_labels'].sum())}" in result.stdout


def test_missing_file_lists_what_is_there(tmp_path):
  write_npz(tmp_path / 'raw', 'pneumoniamnist_28')
  with pytest.raises(DataError) as excinfo:
    _build('pneumoniamnist_64', tmp_path / 'raw', tmp_path / 'data')
  _assert_one_line_error(excinfo, 'pneumoniamnist_64.npz', tmp_path / 'raw',
                         'pneumoniamnist.npz (config pneumoniamnist_28)')


# Bad files: each a one-line DataError naming the file and the key.


def _break_missing_key(a):
  del a['val_labels']
  return 'val_labels'


def _break_image_dtype(a):
  a['train_images'] = a['train_images'].astype(np.float32)
  return 'train_images'


def _break_label_dtype(a):
  a['test_labels'] = a['test_labels'].astype(np.float64)
  return 'test_labels'


def _break_image_shape_rgb(a):  # Gray subset, RGB arrays.
  a['val_images'] = np.repeat(a['val_images'][..., None], 3, axis=-1)
  return 'val_images'


def _break_image_size(a):  # 28 config, 32x32 images.
  a['test_images'] = np.zeros((_COUNTS[2], 32, 32), np.uint8)
  return 'test_images'


def _break_label_shape(a):
  a['train_labels'] = a['train_labels'][:, 0]
  return 'train_labels'


def _break_label_range(a):
  a['val_labels'][1, 0] = 2  # Binary: 0 or 1.
  return 'val_labels'


def _break_count(a):
  a['test_labels'] = a['test_labels'][:-1]
  return 'test_labels'


@pytest.mark.parametrize('breaker, words', [
    (_break_missing_key, ['missing key']),
    (_break_image_dtype, ['float32', 'uint8']),
    (_break_label_dtype, ['float64', 'integer']),
    (_break_image_shape_rgb, ['[3, 28, 28, 3]', 'gray']),
    (_break_image_size, ['[4, 32, 32]', '[N, 28, 28]']),
    (_break_label_shape, ['[7]', '[N, 1]']),
    (_break_label_range, ['row 1', 'holds 2', '0..1']),
    (_break_count, ['3 rows', 'test_images has 4 images']),
])
def test_schema_errors(tmp_path, breaker, words):
  arrays = fake_arrays('pneumoniamnist_28')
  key = breaker(arrays)
  npz, _ = write_npz(tmp_path / 'raw', 'pneumoniamnist_28', arrays)
  data_dir = tmp_path / 'data'
  with pytest.raises(DataError) as excinfo:
    _build('pneumoniamnist_28', tmp_path / 'raw', data_dir)
  _assert_one_line_error(excinfo, npz, key, *words)
  assert not (data_dir / NAME / 'pneumoniamnist_28').exists()


def test_multi_label_values_must_be_0_or_1(tmp_path):
  arrays = fake_arrays('chestmnist_28')
  arrays['train_labels'][2, 5] = 3
  npz, _ = write_npz(tmp_path / 'raw', 'chestmnist_28', arrays)
  with pytest.raises(DataError) as excinfo:
    _build('chestmnist_28', tmp_path / 'raw', tmp_path / 'data')
  _assert_one_line_error(excinfo, npz, 'train_labels', 'row 2', '0 or 1')


def test_not_an_npz(tmp_path):
  path = tmp_path / 'raw' / 'pneumoniamnist.npz'
  path.parent.mkdir()
  path.write_bytes(b'<html>Zenodo is down</html>')
  with pytest.raises(DataError) as excinfo:
    _build('pneumoniamnist_28', tmp_path / 'raw', tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'not a valid .npz')


def test_corrupt_image_array(tmp_path):
  # Large enough that the damage is found while images are streamed, after the
  # checks (which read only the array's header) have passed.
  npz, _ = write_npz(tmp_path / 'raw', 'pneumoniamnist_28', counts=(7, 3, 200))
  data = bytearray(npz.read_bytes())
  at = data.find(b'test_images.npy') + 100_000  # Inside the image data.
  data[at:at + 64] = bytes(64)
  npz.write_bytes(bytes(data))
  data_dir = tmp_path / 'data'
  with pytest.raises(DataError) as excinfo:
    _build('pneumoniamnist_28', tmp_path / 'raw', data_dir)
  _assert_one_line_error(excinfo, npz, 'test_images',
                         'cannot be read from image')
  assert not (data_dir / NAME / 'pneumoniamnist_28').exists()


# ----------------------------------------------------------------------------
# The download path (no network: a stand-in download manager).
# ----------------------------------------------------------------------------


class _OfflineDownloadManager:
  """Stands in for tfds' DownloadManager with no manual_dir and no network."""

  def __init__(self, path=None):
    self.path = path
    self.requested = []

  @property
  def manual_dir(self):
    raise AssertionError('Manual directory not enabled.')

  def download(self, url):
    self.requested.append(url)
    if self.path is None:
      raise ConnectionError('Failed to resolve zenodo.org\nsecond line')
    return self.path


def test_verify_md5(tmp_path):
  path = tmp_path / 'pneumoniamnist.npz'
  path.write_bytes(b'not the official file')
  actual = hashlib.md5(b'not the official file').hexdigest()
  official = medmnist.SUBSETS['pneumoniamnist'].md5[28]
  with pytest.raises(DataError) as excinfo:
    medmnist.verify_md5(os.fspath(path), official, name='pneumoniamnist.npz')
  _assert_one_line_error(excinfo, path, official, actual, 'pneumoniamnist.npz')
  assert medmnist.verify_md5(os.fspath(path), actual) == actual


def test_download_with_wrong_md5_is_an_error(tmp_path):
  npz, _ = write_npz(tmp_path / 'dl', 'pneumoniamnist_28')
  config = medmnist.Medmnist.make_config('pneumoniamnist_28')
  builder = medmnist.Medmnist(data_dir=os.fspath(tmp_path / 'data'),
                              config=config)
  manager = _OfflineDownloadManager(npz)
  with pytest.raises(DataError) as excinfo:
    builder._split_generators(manager)  # pylint: disable=protected-access
  assert manager.requested == [config.url]
  _assert_one_line_error(excinfo, npz, config.md5,
                         hashlib.md5(npz.read_bytes()).hexdigest())


def test_download_failure_says_how_to_download(tmp_path):
  config = medmnist.Medmnist.make_config('dermamnist_128')
  builder = medmnist.Medmnist(data_dir=os.fspath(tmp_path), config=config)
  with pytest.raises(DataError) as excinfo:
    # pylint: disable-next=protected-access
    builder._split_generators(_OfflineDownloadManager())
  _assert_one_line_error(excinfo, 'could not download', 'dermamnist_128.npz',
                         config.url, '--manual_dir')


def test_download_with_official_md5_builds(tmp_path, monkeypatch):
  npz, arrays = write_npz(tmp_path / 'dl', 'breastmnist_28')
  config = medmnist.Medmnist.make_config('breastmnist_28')
  monkeypatch.setattr(config, 'md5', hashlib.md5(npz.read_bytes()).hexdigest())
  builder = medmnist.Medmnist(data_dir=os.fspath(tmp_path / 'data'),
                              config=config)
  # pylint: disable-next=protected-access
  generators = builder._split_generators(_OfflineDownloadManager(npz))
  assert builder.info.metadata['matches_official_file'] is True
  counts = {split: len(list(g)) for split, g in generators.items()}
  assert counts == {'train': 7, 'validation': 3, 'test': 4}
  assert arrays['train_images'].shape == (7, 28, 28)


# ----------------------------------------------------------------------------
# The real data (../shared/data/pneumoniamnist); skipped when absent.
# ----------------------------------------------------------------------------


def test_real_pneumoniamnist(tmp_path):
  if not (REAL_PNEUMONIAMNIST / 'pneumoniamnist.npz').is_file():
    pytest.skip('../shared/data/pneumoniamnist is absent: no real '
                'PneumoniaMNIST file to build')
  data_dir = tmp_path / 'data'
  name = f'{NAME}/pneumoniamnist_28'
  _build('pneumoniamnist_28', REAL_PNEUMONIAMNIST, data_dir)
  info = sources.dataset_info(name, os.fspath(data_dir))
  counts = {split: s.num_examples for split, s in info.splits.items()}
  assert counts == {'train': 3882, 'validation': 524, 'test': 624}
  assert info.features['label'].num_classes == 2
  assert info.features['image'].shape == (28, 28, 1)
  # The shared copy is a subset of the official training split.
  assert info.metadata['matches_official_file'] is False
  with np.load(REAL_PNEUMONIAMNIST / 'pneumoniamnist.npz') as npz:
    labels = npz['train_labels'][:, 0]
    expected = collections.Counter(labels.tolist())
    source = sources.open_split(name, 'train', os.fspath(data_dir))
    got = collections.Counter(
        int(r['label']) for r in source.__getitems__(list(range(len(source)))))
    assert got == expected
    record = source[0]
    index = int(record['image_id'].decode().split('_')[1])
    np.testing.assert_array_equal(_decode(record['image']),
                                  npz['train_images'][index])
